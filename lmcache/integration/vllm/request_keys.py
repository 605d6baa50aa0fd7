"""What besides its token ids names a request's KV, read from vLLM's scheduler `Request`.

vLLM's own prefix cache hashes "extra keys" into its block hashes
(vllm/v1/core/kv_cache_utils.py): for a block, the content hash (`identifier`) and the
offset within the block of every media item whose placeholder tokens overlap it, the
LoRA adapter, and the request's `cache_salt`. Placeholder tokens do not name the image
and a token-only key would hand one adapter's or tenant's KV to another, so LMCache's
chunk keys carry the same distinctions:

* per chunk [start, end): one 16-byte digest ("key material", token_database.py) over
  the LoRA adapter (name and path), the cache salt, and (identifier, offset - start) of
  each media item overlapping the chunk. Items before the chunk are in its key through
  the chain (a key names its whole prefix); a chunk of a media request before the first
  item has no material and keeps its plain-text key, as vLLM's blocks do.
* text-only requests have no material at all: their keys are unchanged.

Media identifiers are vLLM's content hashes (blake3/sha256 of the pixels and processor
options, or the client's multi_modal_uuids): stable across processes and restarts, no
Python `hash`. Requests that stay uncacheable: prompt embeddings (no token ids name
them), and any kind whose fields the installed vLLM does not hand over
(`vllm_extra_key_support`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

KIND_TEXT, KIND_MULTIMODAL, KIND_LORA, KIND_SALTED = "text", "multimodal", "lora", "salted"
KINDS = (KIND_TEXT, KIND_MULTIMODAL, KIND_LORA, KIND_SALTED)
KEY_MATERIAL_SIZE = 16
_PERSON = b"lmcache-xkeys-v1"  # names the material's scheme: a change must change every digest


@dataclass(frozen=True, slots=True)
class MediaItem:
    identifier: str  # vLLM's content hash of the item
    offset: int  # its first placeholder token
    length: int  # its placeholder tokens


@dataclass(frozen=True, slots=True)
class RequestKeys:
    lora_name: str | None = None
    lora_path: str | None = None
    cache_salt: str | None = None
    media: tuple[MediaItem, ...] = ()

    @property
    def is_plain(self) -> bool:
        return self.lora_name is None and not self.cache_salt and not self.media

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds this request counts under in the metrics (text: none of the others)."""
        kinds = tuple(kind for kind, has in ((KIND_MULTIMODAL, bool(self.media)), (KIND_LORA, self.lora_name is not None),
                                             (KIND_SALTED, bool(self.cache_salt))) if has)
        return kinds or (KIND_TEXT,)

    def _common(self) -> list[bytes]:
        parts = []
        if self.lora_name is not None:
            parts += [b"lora", _field(self.lora_name), _field(self.lora_path or "")]
        if self.cache_salt:
            parts += [b"salt", _field(self.cache_salt)]
        return parts

    def chunk_key_material(self, chunk_size: int, num_tokens: int) -> list[bytes | None] | None:
        """One digest per chunk of the first `num_tokens` tokens (the last may be partial),
        None where a chunk has none; None for a plain request (keys as for text)."""
        if self.is_plain or num_tokens <= 0:
            return None
        common = self._common()
        out: list[bytes | None] = []
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            parts = list(common)
            for item in self.media:
                if item.offset < end and item.offset + item.length > start:
                    parts += [b"media", _field(item.identifier), _field(str(item.offset - start))]
            out.append(_digest(parts) if parts else None)
        return out

    def event_extra_keys(self, start: int, end: int) -> tuple | None:
        """vLLM's KV-event extra keys of block [start, end), as its own events publish
        them (untagged, in order: LoRA name, (identifier, offset) pairs, the salt on the
        first block); None where the block has none."""
        keys: list = []
        if self.lora_name is not None:
            keys.append(self.lora_name)
        for item in self.media:
            if item.offset < end and item.offset + item.length > start:
                keys.append((item.identifier, item.offset - start))
        if self.cache_salt and start == 0:
            keys.append(self.cache_salt)
        return tuple(keys) if keys else None


PLAIN = RequestKeys()


def _field(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(4, "little") + raw


def _digest(parts: list[bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_MATERIAL_SIZE, person=_PERSON)
    for part in parts:
        h.update(part)
    return h.digest()


# -- the installed vLLM --------------------------------------------------------------
@functools.cache
def vllm_extra_key_support() -> dict[str, str | None]:
    """Which request kinds the installed vLLM hands the connector with the fields their
    keys need: {kind: None if supported, else why not}. (Feature detection, to move
    into vllm_compat.py.)"""
    out: dict[str, str | None] = {KIND_MULTIMODAL: None, KIND_LORA: None, KIND_SALTED: None}
    try:
        import inspect

        from vllm.v1.request import Request

        params = set(inspect.signature(Request.__init__).parameters)
    except Exception as exc:  # noqa: BLE001 - no vLLM, or one we cannot read
        reason = f"vllm.v1.request.Request could not be inspected ({exc})"
        return {kind: reason for kind in out}
    if "cache_salt" not in params:
        out[KIND_SALTED] = "this vLLM's Request has no cache_salt"
    if "lora_request" not in params:
        out[KIND_LORA] = "this vLLM's Request has no lora_request"
    if "mm_features" not in params:
        out[KIND_MULTIMODAL] = "this vLLM's Request has no mm_features"
    else:
        try:
            import dataclasses

            from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

            spec_fields = {f.name for f in dataclasses.fields(MultiModalFeatureSpec)}
            range_fields = {f.name for f in dataclasses.fields(PlaceholderRange)}
            if not {"identifier", "mm_position"} <= spec_fields or not {"offset", "length"} <= range_fields:
                out[KIND_MULTIMODAL] = ("this vLLM's MultiModalFeatureSpec lacks identifier/mm_position "
                                        "(offset, length)")
        except Exception as exc:  # noqa: BLE001
            out[KIND_MULTIMODAL] = f"vllm.multimodal.inputs could not be inspected ({exc})"
    return out


def kv_event_extra_keys_supported() -> bool:
    """vLLM's BlockStored carries per-block `extra_keys` (else only `lora_name`)."""
    try:
        from vllm.distributed.kv_events import BlockStored

        return "extra_keys" in getattr(BlockStored, "__struct_fields__", ())
    except Exception:  # noqa: BLE001
        return False


# -- reading a request ---------------------------------------------------------------
class Uncacheable(Exception):
    """The request's KV cannot be named by a chunk key (the message says why)."""


def request_keys(request) -> RequestKeys:
    """The extra keys of a scheduler `Request`; raises Uncacheable when LMCache must not
    share its KV."""
    if getattr(request, "prompt_token_ids", None) is None:
        raise Uncacheable("it has no prompt token ids (prompt embeddings: no token ids name its KV)")
    if getattr(request, "prompt_embeds", None) is not None:
        raise Uncacheable("it carries prompt embeddings (no token ids name their KV)")
    support = vllm_extra_key_support()
    media = _media(request, support[KIND_MULTIMODAL])
    lora_name = lora_path = None
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        if support[KIND_LORA]:
            raise Uncacheable(f"it uses a LoRA adapter and {support[KIND_LORA]}")
        lora_name = getattr(lora, "lora_name", None)
        if not isinstance(lora_name, str):
            raise Uncacheable("it uses a LoRA adapter without a lora_name")
        lora_path = str(getattr(lora, "lora_path", "") or "")
    salt = getattr(request, "cache_salt", None)
    if salt is not None and not isinstance(salt, str):
        raise Uncacheable(f"its cache_salt is a {type(salt).__name__}, not a string")
    if not media and lora_name is None and not salt:
        return PLAIN
    return RequestKeys(lora_name, lora_path, salt or None, media)


_OLD_MEDIA_FIELDS = ("mm_inputs", "mm_hashes", "mm_positions", "mm_kwargs")


def _media(request, unsupported: str | None) -> tuple[MediaItem, ...]:
    features = getattr(request, "mm_features", None)
    if unsupported is not None:
        if features or any(getattr(request, name, None) for name in _OLD_MEDIA_FIELDS):
            raise Uncacheable(f"it has multimodal inputs and {unsupported}")
        return ()
    if not features:
        return ()
    items = []
    for feature in features:
        identifier = getattr(feature, "identifier", None)
        position = getattr(feature, "mm_position", None)
        offset, length = getattr(position, "offset", None), getattr(position, "length", None)
        if not isinstance(identifier, str) or not identifier or not isinstance(offset, int) \
                or not isinstance(length, int):
            raise Uncacheable("it has a multimodal input without a content hash or placeholder position")
        items.append(MediaItem(identifier, offset, length))
    return tuple(sorted(items, key=lambda item: item.offset))


def uncacheable_reason(request) -> str | None:
    """Why a request's KV must not be shared through chunk keys, if so."""
    try:
        request_keys(request)
    except Uncacheable as exc:
        return str(exc)
    return None
