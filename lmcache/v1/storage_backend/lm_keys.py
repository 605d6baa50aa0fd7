"""Our chunk keys in the shape upstream's `lm://` server parses.

Upstream's server turns each request's key field back into its key object, so
every key we send must read as
    model@world_size@worker_id@chunk_hash_hex@dtype_str[@tag%value]
with upstream's dtype names (half, bfloat16, float, ...). Ours:
    {model}@{world_size}@{worker_id}@{chunk_hash}@{dtype}@lm%{layout}
model and layout %-escaped (so neither holds '@', and the escaping is one-to-one);
`lm` is a tag, so the layout part is part of the key on upstream's server too.
A dtype upstream has no name for is sent as `uint8` plus a tag `dt%{dtype}`.
The chunk hash is written as upstream writes it (lowercase hex without leading
zeros, as it prints the parsed integer), so a key object upstream parses from
ours prints back to the same bytes: our server compares keys as bytes.

The key field is 150 bytes. A key that would not fit (long model names) is sent
instead as
    %h{blake2b-128 of model and layout}@{world_size}@{worker_id}@{chunk_hash}@{dtype}
'%h' never begins an escaped model name (escapes are '%' + two hex digits), so
the short form cannot be mistaken for a long one; collisions between digests are
as unlikely as between chunk hashes (the same 128-bit blake2b).
"""

from __future__ import annotations

import functools
import hashlib
import urllib.parse

from lmcache.v1.server.protocol import KEY_FIELD
from lmcache.v1.token_database import CacheEngineKey

UPSTREAM_DTYPE_NAMES = {
    "float16": "half", "bfloat16": "bfloat16", "float32": "float", "float64": "double",
    "int8": "int8", "uint8": "uint8", "int16": "int16", "int32": "int32", "int64": "int64", "bool": "bool",
    "float8_e4m3fn": "fp8_e4m3fn", "float8_e4m3fnuz": "fp8_e4m3fnuz",
    "float8_e5m2": "fp8_e5m2", "float8_e5m2fnuz": "fp8_e5m2fnuz",
}  # fmt: skip
DIGEST_MARK = "%h"


class KeyEncodingError(ValueError):
    """A key that cannot be written in the shape upstream's server parses."""


@functools.lru_cache(maxsize=256)
def _frame(model: str, world: int, worker: int, dtype: str, layout: str) -> tuple[str, str]:
    """(text before the chunk hash, text after it) for one engine's keys."""
    quoted_model = urllib.parse.quote(model, safe="-_.+/")
    quoted_layout = urllib.parse.quote(layout, safe="-_.+")
    head, tail = f"{quoted_model}@{world}@{worker}@", f"@{_upstream_dtype(dtype)}@lm%{quoted_layout}"
    if dtype not in UPSTREAM_DTYPE_NAMES:  # no upstream name: a tag names it
        tail += f"@dt%{urllib.parse.quote(dtype, safe='-_.+')}"
    return head, tail


def _upstream_dtype(dtype: str) -> str:
    return UPSTREAM_DTYPE_NAMES.get(dtype, "uint8")


def _hash_text(chunk_hash: str) -> str:
    return chunk_hash.lower().lstrip("0") or "0"


def wire_key(key: CacheEngineKey) -> bytes:
    """The key field text for `key` (at most 150 bytes)."""
    head, tail = _frame(key.model_name, key.world_size, key.worker_id, key.dtype, key.fingerprint)
    text = f"{head}{_hash_text(key.chunk_hash)}{tail}".encode()
    if len(text) <= KEY_FIELD:
        return text
    return _digested(key).encode()


def _digested(key: CacheEngineKey) -> str:
    head, tail = _frame(key.model_name, key.world_size, key.worker_id, key.dtype, key.fingerprint)
    up_dtype = _upstream_dtype(key.dtype)
    named = f"{head}\0{tail}".encode()  # model, world, worker, dtype and layout, one-to-one
    digest = hashlib.blake2b(named, digest_size=16).hexdigest()
    text = f"{DIGEST_MARK}{digest}@{key.world_size}@{key.worker_id}@{_hash_text(key.chunk_hash)}@{up_dtype}"
    if len(text.encode()) > KEY_FIELD:
        raise KeyEncodingError(f"key {key} does not fit the {KEY_FIELD}-byte key field even digested")
    return text


def is_digested(wire: bytes) -> bool:
    return wire.startswith(DIGEST_MARK.encode())
