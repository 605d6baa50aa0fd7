"""The one blob format of the disk and remote tiers: a fixed header, then raw bytes.

Header (128 bytes, little-endian):
  magic "LMKV" | version u16 | memory format u8 | dtype u8 | ndim u8 | flags u8 | 6 pad
  | shape 4 x u64 | payload length u64 | xxh3-64 checksum of the payload u64
  | key digest 16 bytes | MAC 32 bytes (zeros without a secret) | 8 pad
  | xxh3-64 of the 120 bytes before it u64 (the header check)

The header check covers the header (and through it the payload checksum), so a
header edited or damaged on its own is corrupt, not a chunk of another shape.
The key digest names the key the chunk was stored under: a chunk read under
any other key (a file copied, renamed or linked, a value SET under another
name) is refused. With a shared secret (`chunk_secret`) the MAC binds key,
header and payload; a reader with the secret refuses any chunk whose MAC does
not verify, so whoever can write the directory or the server but lacks the
secret cannot choose what is loaded (see Integrity).

Nothing is ever unpickled: a blob whose header or checksum does not add up is
rejected with SerdeError (RefusedChunk when it is a valid blob that fails the
key or MAC check), which the tiers turn into a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import xxhash

from lmcache.v1.memory import MemoryFormat, MemoryObj, check_shape

MAGIC = b"LMKV"
VERSION = 2
_HEADER = struct.Struct("<4sHBBBB6x4QQQ16s32s8xQ")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 128
_CHECKED = HEADER_SIZE - 8  # the header check covers the bytes before it
_MAC_AT = 80  # offset of the MAC field (zeroed in the bytes the MAC covers)
MAC_SIZE = 32
KEY_DIGEST_SIZE = 16
_FLAG_MAC = 1

_FORMAT_CODES = {MemoryFormat.KV_2LTD: 1, MemoryFormat.KV_MLA_FMT: 2}
_FORMATS = {code: fmt for fmt, code in _FORMAT_CODES.items()}

_DTYPE_NAMES = {
    1: "float32",
    2: "float16",
    3: "bfloat16",
    4: "float8_e4m3fn",
    5: "float8_e5m2",
    6: "uint8",
    7: "int8",
    8: "float64",
    9: "float8_e4m3fnuz",
    10: "float8_e5m2fnuz",
}
_DTYPES = {code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class SerdeError(ValueError):
    """Bytes that are not a valid blob (foreign, truncated, corrupt, other version)."""


class RefusedChunk(SerdeError):
    """A well-formed blob that may not be loaded under this key: it names another
    key, or its MAC is missing or wrong (a secret is configured)."""


def miss_cause(exc: SerdeError) -> str:
    """The stats cause for a rejected blob: "refused" (wrong key / MAC) or "corrupt"."""
    return "refused" if isinstance(exc, RefusedChunk) else "corrupt"


@dataclass(frozen=True)
class BlobHeader:
    shape: torch.Size
    dtype: torch.dtype
    fmt: MemoryFormat
    payload_nbytes: int
    checksum: int
    key_digest: bytes = bytes(KEY_DIGEST_SIZE)
    mac: bytes | None = None  # None: written without a secret
    raw: bytes = b""  # the header's bytes (what the MAC covers, MAC field zeroed)


def payload_view(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array, without copying."""
    return tensor.view(torch.uint8).reshape(-1).numpy()


def checksum(payload) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def new_checksum():
    """A streaming checksum: .update(block) in order, then .intdigest() == checksum(payload).
    (The disk tier hashes block by block while the bytes are cache-hot: chunk_file.py.)"""
    return xxhash.xxh3_64()


def key_digest(key) -> bytes:
    """16 bytes naming a key (a CacheEngineKey, or its string form)."""
    text = key if isinstance(key, str) else key.to_string()
    return hashlib.blake2b(text.encode(), digest_size=KEY_DIGEST_SIZE, person=b"lmcache-key").digest()


_LEAF_BYTES = 4 << 20  # the payload digest hashes 4 MiB leaves, on several cores for big chunks
_HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()


def _leaf_digest(leaf) -> bytes:
    return hashlib.sha256(leaf).digest()  # hashlib drops the GIL: leaves hash in parallel


def payload_digest(payload) -> bytes:
    """SHA-256 over the payload's length and the SHA-256 of each 4 MiB leaf (a chunk's
    leaves are hashed on up to 4 threads). What the MAC covers of the payload."""
    global _hash_pool
    view = memoryview(payload).cast("B")
    leaves = [view[i:i + _LEAF_BYTES] for i in range(0, len(view), _LEAF_BYTES)]
    if len(leaves) > 1 and _HASH_THREADS > 1:
        with _hash_pool_lock:
            if _hash_pool is None:
                _hash_pool = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="lmcache-hash")
        digests = list(_hash_pool.map(_leaf_digest, leaves))
    else:
        digests = [_leaf_digest(leaf) for leaf in leaves]
    return hashlib.sha256(b"".join((b"lmcache payload v1", struct.pack("<Q", len(view)), *digests))).digest()


class ChecksumMemo:
    """The payload checksum (and, with a secret, its payload_digest) of one
    memory object during ONE store to several tiers: the first tier that computes
    it records it, the others reuse it, so a chunk written to disk and Redis is
    hashed once. Scoped to that store (the background writer makes one per
    chunk), never kept on the object."""

    __slots__ = ("value", "sha256")

    def __init__(self) -> None:
        self.value: int | None = None
        self.sha256: bytes | None = None


class Integrity:
    """What a stored chunk must prove when it is read: that it was stored under the
    key it is read under (always), and with a shared secret, a valid MAC
    (HMAC-SHA256 over the key, the header and payload_digest). Without a
    secret, chunks carry no MAC and any chunk naming the right key is accepted."""

    __slots__ = ("_secret",)

    def __init__(self, secret: str | bytes | None = None):
        if isinstance(secret, str):
            secret = secret.encode()
        self._secret = secret or None

    @property
    def has_secret(self) -> bool:
        return self._secret is not None

    def __repr__(self) -> str:  # never the secret itself
        return f"Integrity(secret={'***' if self._secret else None})"

    def payload_sha256(self, payload, memo: ChecksumMemo | None = None) -> bytes:
        if memo is not None and memo.sha256 is not None:
            return memo.sha256
        digest = payload_digest(payload)
        if memo is not None:
            memo.sha256 = digest
        return digest

    def _mac(self, key_text: bytes, header_unsigned: bytes, payload_sha256: bytes) -> bytes:
        msg = b"".join((struct.pack("<I", len(key_text)), key_text, header_unsigned, payload_sha256))
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def header(self, key, obj: MemoryObj, payload=None, payload_checksum: int | None = None,
               memo: ChecksumMemo | None = None) -> bytes:
        """The header of `obj` stored under `key` (a CacheEngineKey; None: no key, for
        probes that are never read back through a tier)."""
        meta = obj.metadata
        if meta.dtype not in _DTYPE_CODES:
            raise SerdeError(f"dtype {meta.dtype} cannot be stored; supported: {sorted(_DTYPE_NAMES.values())}")
        payload = payload_view(obj.tensor) if payload is None else payload
        if payload_checksum is None:
            payload_checksum = checksum(payload)
        digest = key_digest(key) if key is not None else bytes(KEY_DIGEST_SIZE)
        fields = (MAGIC, VERSION, _FORMAT_CODES[meta.fmt], _DTYPE_CODES[meta.dtype], len(meta.shape),
                  _FLAG_MAC if self._secret else 0, *meta.shape, payload.nbytes, payload_checksum, digest)
        unsigned = _HEADER.pack(*fields, bytes(MAC_SIZE), 0)[:_CHECKED]
        mac = bytes(MAC_SIZE)
        if self._secret:
            key_text = key.to_string().encode() if key is not None else b""
            mac = self._mac(key_text, unsigned, self.payload_sha256(payload, memo))
        signed = _HEADER.pack(*fields, mac, 0)[:_CHECKED]
        return signed + struct.pack("<Q", xxhash.xxh3_64_intdigest(signed))

    def check(self, key, header: BlobHeader, payload) -> None:
        """RefusedChunk unless `header` (of a verified blob) was stored under `key`
        and, with a secret, carries a MAC made with it over this payload."""
        if header.key_digest != key_digest(key):
            raise RefusedChunk(f"the chunk names another key than {key.to_string()} (copied, renamed or linked?)")
        if self._secret is None:
            return
        if header.mac is None:
            raise RefusedChunk("the chunk carries no MAC, and chunk_secret is set (written without the secret?)")
        expected = self._mac(key.to_string().encode(), header.raw, self.payload_sha256(payload))
        if not hmac.compare_digest(expected, header.mac):
            raise RefusedChunk("the chunk's MAC does not verify (written with another secret, or tampered)")


NO_SECRET = Integrity()


def encode_header(obj: MemoryObj, payload: np.ndarray | None = None, payload_checksum: int | None = None,
                  *, key, integrity: Integrity = NO_SECRET, memo: ChecksumMemo | None = None) -> bytes:
    """The header of `obj` stored under `key` (required: a header names its key)."""
    return integrity.header(key, obj, payload, payload_checksum, memo)


def decode_header(data) -> BlobHeader:
    if len(data) < HEADER_SIZE:
        raise SerdeError(f"blob of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    raw = bytes(data[:HEADER_SIZE])
    magic, version = raw[:4], struct.unpack_from("<H", raw, 4)[0]
    if magic != MAGIC:
        raise SerdeError(f"not an lmcache blob (magic {magic!r})")
    if version != VERSION:
        raise SerdeError(f"blob format version {version}; this build reads version {VERSION}")
    fields = _HEADER.unpack(raw)
    if fields[-1] != xxhash.xxh3_64_intdigest(raw[:_CHECKED]):
        raise SerdeError("header check mismatch (corrupt header)")
    fmt_code, dtype_code, ndim, flags = fields[2:6]
    shape, nbytes, check, digest, mac = fields[6:10], fields[10], fields[11], fields[12], fields[13]
    if fmt_code not in _FORMATS or dtype_code not in _DTYPES or ndim != 4:
        raise SerdeError(f"blob header names an unknown format/dtype/rank ({fmt_code}, {dtype_code}, {ndim})")
    fmt, dtype = _FORMATS[fmt_code], _DTYPES[dtype_code]
    try:
        shape = check_shape(torch.Size(shape), fmt)
    except ValueError as exc:
        raise SerdeError(str(exc)) from None
    if shape.numel() * dtype.itemsize != nbytes:
        raise SerdeError(f"blob header shape {tuple(shape)} x {dtype} does not match its {nbytes}-byte payload")
    unsigned = raw[:_MAC_AT] + bytes(MAC_SIZE) + raw[_MAC_AT + MAC_SIZE:_CHECKED]
    return BlobHeader(shape, dtype, fmt, nbytes, check, digest, mac if flags & _FLAG_MAC else None, unsigned)


def verify(header: BlobHeader, payload, payload_checksum: int | None = None) -> None:
    if len(payload) != header.payload_nbytes:
        raise SerdeError(f"payload is {len(payload)} bytes, header says {header.payload_nbytes} (truncated?)")
    if payload_checksum is None:
        payload_checksum = checksum(payload)
    if payload_checksum != header.checksum:
        raise SerdeError("payload checksum mismatch (corrupt)")


Allocator = Callable[[torch.Size, torch.dtype, MemoryFormat], "MemoryObj | None"]


def blob_pieces(obj: MemoryObj, key, integrity: Integrity = NO_SECRET,
                memo: ChecksumMemo | None = None) -> tuple[bytes, memoryview]:
    """(header, payload bytes) of `obj` stored under `key`, for tiers that send the two
    pieces without joining them; `memo` (the payload checksum) is shared with the other tiers of one store."""
    payload = payload_view(obj.tensor)
    if memo is None:
        memo = ChecksumMemo()
    if memo.value is None:
        memo.value = checksum(payload)
    return integrity.header(key, obj, payload, memo.value, memo), memoryview(payload).cast("B")


def to_bytes(obj: MemoryObj, key=None, integrity: Integrity = NO_SECRET) -> bytes:
    """Header + payload as one bytes object (for tiers that need a single value)."""
    payload = payload_view(obj.tensor)
    return b"".join((integrity.header(key, obj, payload), payload))


def from_bytes(blob, allocate: Allocator, key=None, integrity: Integrity = NO_SECRET) -> MemoryObj | None:
    """Parse and check a blob and copy its payload into a new memory object from
    `allocate`; None if allocate cannot provide one. Raises SerdeError if invalid,
    RefusedChunk if it was not stored under `key` (None: not checked; probes only)
    or lacks a valid MAC."""
    view = memoryview(blob)
    header = decode_header(view)
    payload = view[HEADER_SIZE:]
    verify(header, payload)
    if key is not None:
        integrity.check(key, header, payload)
    obj = allocate(header.shape, header.dtype, header.fmt)
    if obj is None:
        return None
    np.copyto(payload_view(obj.tensor), np.frombuffer(payload, dtype=np.uint8))
    return obj
