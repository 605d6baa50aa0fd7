"""Tokens -> chunk keys.

A prompt is cut into `chunk_size`-token chunks. Chunk i's hash is
blake2b(hash of chunk i-1 || token ids of chunk i as little-endian int32), so a
key names the whole prefix up to the end of its chunk, and equal prefixes give
equal keys in any process, after a restart and on any rank (no Python `hash`,
no PYTHONHASHSEED). A request whose KV depends on more than its tokens (media,
a LoRA adapter, a cache salt) gives per chunk a digest of that "key material", hashed
into that chunk (lmcache/integration/vllm/request_keys.py says what it holds).

Besides the tokens, a key names what else decides the KV: the model, world size
and rank, the KV dtype and layout (layout_key), and an identity tag
(identity_tag): a digest of what the integration knows changes KV for the same
model name (revision, weights, quantization, KV cache dtype, overrides; see
lmcache/integration/vllm/model_identity.py) and the optional `cache_namespace`.
All key material beyond the tokens goes through material_digest(), one stable
encoding (canonical JSON, blake2b) that new material can join.
"""

from __future__ import annotations

import array
import hashlib
import json
import struct
import sys
import urllib.parse
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

# Changing how chunks are hashed must change every key: the seed names the scheme.
_HASH_SEED = hashlib.blake2b(b"lmcache chunk hash v1 int32le", digest_size=16).digest()
_DIGEST_SIZE = 16
_EMPTY_HASH = hashlib.blake2b(digest_size=_DIGEST_SIZE)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_BIG_ENDIAN = sys.byteorder == "big"
_SEP = "@"
_SAFE = "-_.+"  # kept as is by the escaping; everything else (/, @, %, spaces) is %XX


def _escape(text: str) -> str:
    return urllib.parse.quote(text, safe=_SAFE)


class CacheEngineKey(NamedTuple):
    """Names one chunk of KV: whose model, which shard, which dtype and layout,
    and which token prefix (chunk_hash, hex)."""

    model_name: str
    world_size: int
    worker_id: int
    chunk_hash: str
    dtype: str
    fingerprint: str

    def to_string(self) -> str:
        """`model@world_size@worker_id@chunk_hash@dtype@fingerprint`, with model
        and fingerprint %-escaped, so the string holds no '/' and is safe as a
        file name and a Redis key."""
        return _SEP.join(
            (
                _escape(self.model_name),
                str(self.world_size),
                str(self.worker_id),
                self.chunk_hash,
                _escape(self.dtype),
                _escape(self.fingerprint),
            )
        )

    @classmethod
    def from_string(cls, text: str) -> "CacheEngineKey":
        parts = text.split(_SEP)
        if len(parts) != 6:
            raise ValueError(
                f"not a cache key: {text!r}; expected model@world_size@worker_id@chunk_hash@dtype@fingerprint"
            )
        model, world, worker, chunk_hash, dtype, fingerprint = parts
        if not (world.isdigit() and worker.isdigit()):
            raise ValueError(f"not a cache key: {text!r}; world_size and worker_id must be integers")
        try:
            bytes.fromhex(chunk_hash)
        except ValueError:
            raise ValueError(f"not a cache key: {text!r}; chunk_hash must be hex") from None
        unquote = urllib.parse.unquote
        return cls(unquote(model), int(world), int(worker), chunk_hash, unquote(dtype), unquote(fingerprint))


def material_digest(*material, size: int = 8) -> str:
    """A stable hex digest of key material: str, int, float, bool, None and lists or
    dicts of them (dict keys sorted), the same in every process and Python."""
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.blake2b(text.encode(), digest_size=size, person=b"lmcache-ident").hexdigest()


def identity_tag(model_identity: str = "", namespace: str | None = None, *extra) -> str:
    """The identity part of a key: '' when nothing is given (keys as before any
    identity existed), else 'm' + a digest of everything given. `extra`: further
    material that must separate keys (it joins the digest as is)."""
    if not model_identity and not namespace and not extra:
        return ""
    return "m" + material_digest(model_identity or "", namespace or "", *extra)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layout_key(metadata) -> str:
    """The KV layout part of a key, from the engine metadata alone (a scheduler
    without KV tensors must compute the same keys as the workers): memory format
    and per-token shape, plus metadata.layout_fingerprint when one is given
    (ChunkedTokenDatabase adds the identity tag after it)."""
    num_layers, _, _, num_heads, head_size = metadata.kv_shape
    if getattr(metadata, "use_mla", False):
        text = f"mla.L{num_layers}.D{head_size}"
    else:
        text = f"kv.L{num_layers}.H{num_heads}.D{head_size}"
    extra = getattr(metadata, "layout_fingerprint", "") or ""
    return f"{text}.{extra}" if extra else text


def token_bytes(tokens) -> memoryview:
    """The token ids as little-endian int32 bytes (the hashed representation)."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().reshape(-1)
        if tokens.device.type != "cpu":
            tokens = tokens.cpu()
        tokens = tokens.numpy()
    if isinstance(tokens, np.ndarray):
        return _array_bytes(tokens)
    if not isinstance(tokens, (list, tuple)):
        tokens = list(tokens)
    # A list is what vLLM's scheduler holds. array('I') unboxes Python ints about
    # three times faster than struct.pack, array('i') or numpy (the signed array
    # codes parse every item through PyArg_Parse): ~8 ns per id. Negative ids do
    # not fit it and take the slower exact path.
    try:
        unsigned = array.array("I", tokens)
    except OverflowError:
        return _signed_list_bytes(tokens)
    except TypeError as exc:
        raise ValueError(f"token ids must be a sequence of int32 integers: {exc}") from None
    if unsigned.itemsize != 4:  # a platform whose C int is not 32-bit
        return _signed_list_bytes(tokens)
    ids = np.frombuffer(unsigned, dtype=np.uint32)
    if ids.size and ids.max() > _INT32_MAX:
        raise ValueError("token ids must fit in int32")
    if _BIG_ENDIAN:
        ids = ids.astype("<u4")
    return memoryview(ids).cast("B")


def _array_bytes(tokens: np.ndarray) -> memoryview:
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got an array of {tokens.dtype}")
    if tokens.size and (tokens.min() < _INT32_MIN or tokens.max() > _INT32_MAX):
        raise ValueError("token ids must fit in int32")
    return memoryview(np.ascontiguousarray(tokens.reshape(-1), dtype="<i4")).cast("B")


def _signed_list_bytes(tokens) -> memoryview:
    try:
        return memoryview(struct.pack(f"<{len(tokens)}i", *tokens))
    except struct.error as exc:
        raise ValueError(f"token ids must be a sequence of int32 integers: {exc}") from None


def chunk_hashes(tokens, chunk_size: int, num_tokens: int | None = None,
                 key_material: Sequence[bytes | None] | None = None) -> list[str]:
    """Hex hashes of the prefix chain, one per chunk (the last may be partial), of
    the first `num_tokens` tokens (default: all). `key_material`: what besides the
    tokens names each chunk's KV (media, LoRA, salt), one entry per chunk, None for
    none (`_hashes_with_key_material`)."""
    data = token_bytes(tokens)
    if num_tokens is not None and num_tokens * 4 < len(data):
        data = data[: num_tokens * 4]  # slicing the bytes, not a long list, is free
    step = chunk_size * 4
    if key_material is not None:
        return _hashes_with_key_material(data, step, key_material)
    fresh = _EMPTY_HASH.copy  # cheaper than the constructor with its keyword parsing
    prev = _HASH_SEED
    digests = []
    append = digests.append
    for offset in range(0, len(data), step):
        h = fresh()
        h.update(prev)
        h.update(data[offset : offset + step])
        prev = h.digest()
        append(prev)
    return [d.hex() for d in digests]


# A chunk with key material hashes in its own domain (the personalisation), the material
# length-prefixed before the tokens: no chunk with material can share a plain chunk's hash.
_KEYED_HASH = hashlib.blake2b(digest_size=_DIGEST_SIZE, person=b"lmcache+keys")


def _hashes_with_key_material(data: memoryview, step: int, key_material: Sequence[bytes | None]) -> list[str]:
    num_chunks = -(-len(data) // step)
    if len(key_material) < num_chunks:
        raise ValueError(f"key material for {len(key_material)} chunks, the tokens make {num_chunks}")
    prev = _HASH_SEED
    out = []
    for index, offset in enumerate(range(0, len(data), step)):
        material = key_material[index]
        h = (_KEYED_HASH if material else _EMPTY_HASH).copy()
        h.update(prev)
        if material:
            h.update(len(material).to_bytes(4, "little"))
            h.update(material)
        h.update(data[offset : offset + step])
        prev = h.digest()
        out.append(prev.hex())
    return out


class Chunk(NamedTuple):
    start: int
    end: int
    key: CacheEngineKey


class ChunkedTokenDatabase:
    def __init__(self, chunk_size: int, metadata, save_unfull_chunk: bool = False,
                 namespace: str | None = None):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.save_unfull_chunk = save_unfull_chunk
        self.metadata = metadata
        self._key_prefix = (
            metadata.model_name,
            int(metadata.world_size),
            int(metadata.worker_id),
        )
        tag = identity_tag(getattr(metadata, "model_identity", "") or "", namespace)
        layout = layout_key(metadata)
        self._key_suffix = (dtype_name(metadata.kv_dtype), f"{layout}.{tag}" if tag else layout)

    def owns(self, key: CacheEngineKey) -> bool:
        """`key` is one this database makes (same model, shard, dtype and layout)."""
        return (key.model_name, key.world_size, key.worker_id) == self._key_prefix and \
            (key.dtype, key.fingerprint) == self._key_suffix

    def chunks(self, tokens, num_tokens: int | None = None,
               key_material: Sequence[bytes | None] | None = None) -> list[Chunk]:
        """Every chunk of the first `num_tokens` tokens (default: all); the
        trailing partial chunk only with save_unfull_chunk. `key_material`: see chunk_hashes."""
        total = len(tokens) if num_tokens is None else min(num_tokens, len(tokens))
        if not self.save_unfull_chunk:
            total -= total % self.chunk_size
        if total <= 0:
            return []
        hashes = chunk_hashes(tokens, self.chunk_size, total, key_material)
        # tuple.__new__ skips the NamedTuple constructors' Python-level calls: a 131k-token
        # prompt has 512 chunks and lookups must stay in the low milliseconds.
        new, cs = tuple.__new__, self.chunk_size
        model, world, worker = self._key_prefix
        dtype, fingerprint = self._key_suffix
        ends = list(range(cs, total, cs))
        ends.append(total)
        return [
            new(Chunk, (start, end, new(CacheEngineKey, (model, world, worker, h, dtype, fingerprint))))
            for start, end, h in zip(range(0, total, cs), ends, hashes)
        ]

    def process_tokens(self, tokens, mask: torch.Tensor | None = None,
                       key_material: Sequence[bytes | None] | None = None) -> Iterator[tuple[int, int, CacheEngineKey]]:
        """(start, end, key) per chunk, skipping the chunk-aligned prefix that
        `mask` marks False (tokens the caller already holds)."""
        skip = mask_skip(mask, len(tokens), self.chunk_size)
        for chunk in self.chunks(tokens, key_material=key_material):
            if chunk.end > skip:
                yield chunk.start, chunk.end, chunk.key


def mask_skip(mask: torch.Tensor | Sequence[bool] | None, num_tokens: int, chunk_size: int) -> int:
    """How many leading tokens a mask skips: it must be False for a chunk-aligned
    prefix and True after it."""
    if mask is None:
        return 0
    m = torch.as_tensor(mask, dtype=torch.bool).reshape(-1).cpu()
    if m.numel() != num_tokens:
        raise ValueError(f"mask has {m.numel()} entries for {num_tokens} tokens; it needs one per token")
    true_at = torch.nonzero(m)
    skip = int(true_at[0]) if true_at.numel() else num_tokens
    if not bool(m[skip:].all()):
        raise ValueError("mask must be False for a prefix and True after it (no gaps)")
    if skip % chunk_size and skip != num_tokens:
        raise ValueError(f"mask skips {skip} tokens, which is not a multiple of chunk_size={chunk_size}")
    return skip
