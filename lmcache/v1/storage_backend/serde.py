"""The one blob format of the disk and remote tiers: a fixed header, then raw bytes.

Header (64 bytes, little-endian):
  magic "LMKV" | version u16 | memory format u8 | dtype u8 | ndim u8 | 3 pad
  | shape 4 x u64 | payload length u64 | xxh3-64 checksum of the payload u64 | 4 pad

Nothing is ever unpickled: a blob whose header or checksum does not add up is
rejected with SerdeError, which the tiers turn into a miss.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import xxhash

from lmcache.v1.memory import MemoryFormat, MemoryObj, check_shape

MAGIC = b"LMKV"
VERSION = 1
_HEADER = struct.Struct("<4sHBBB3x4QQQ4x")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 64

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


@dataclass(frozen=True)
class BlobHeader:
    shape: torch.Size
    dtype: torch.dtype
    fmt: MemoryFormat
    payload_nbytes: int
    checksum: int


def payload_view(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array, without copying."""
    return tensor.view(torch.uint8).reshape(-1).numpy()


def checksum(payload) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def new_checksum():
    """A streaming checksum: .update(block) in order, then .intdigest() == checksum(payload).
    (The disk tier hashes block by block while the bytes are cache-hot: chunk_file.py.)"""
    return xxhash.xxh3_64()


class ChecksumMemo:
    """The payload checksum of one memory object during ONE store to several
    tiers: the first tier that computes it records it, the others reuse it, so a
    chunk written to disk and Redis is hashed once. Scoped to that store (the
    background writer makes one per chunk), never kept on the object."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: int | None = None


def encode_header(obj: MemoryObj, payload: np.ndarray | None = None, payload_checksum: int | None = None) -> bytes:
    meta = obj.metadata
    if meta.dtype not in _DTYPE_CODES:
        raise SerdeError(f"dtype {meta.dtype} cannot be stored; supported: {sorted(_DTYPE_NAMES.values())}")
    payload = payload_view(obj.tensor) if payload is None else payload
    if payload_checksum is None:
        payload_checksum = checksum(payload)
    return _HEADER.pack(
        MAGIC,
        VERSION,
        _FORMAT_CODES[meta.fmt],
        _DTYPE_CODES[meta.dtype],
        len(meta.shape),
        *meta.shape,
        payload.nbytes,
        payload_checksum,
    )


def decode_header(data) -> BlobHeader:
    if len(data) < HEADER_SIZE:
        raise SerdeError(f"blob of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, fmt_code, dtype_code, ndim, *rest = _HEADER.unpack_from(data, 0)
    shape, nbytes, check = rest[:4], rest[4], rest[5]
    if magic != MAGIC:
        raise SerdeError(f"not an lmcache blob (magic {bytes(magic)!r})")
    if version != VERSION:
        raise SerdeError(f"blob format version {version}; this build reads version {VERSION}")
    if fmt_code not in _FORMATS or dtype_code not in _DTYPES or ndim != 4:
        raise SerdeError(f"blob header names an unknown format/dtype/rank ({fmt_code}, {dtype_code}, {ndim})")
    fmt, dtype = _FORMATS[fmt_code], _DTYPES[dtype_code]
    try:
        shape = check_shape(torch.Size(shape), fmt)
    except ValueError as exc:
        raise SerdeError(str(exc)) from None
    if shape.numel() * dtype.itemsize != nbytes:
        raise SerdeError(f"blob header shape {tuple(shape)} x {dtype} does not match its {nbytes}-byte payload")
    return BlobHeader(shape, dtype, fmt, nbytes, check)


def verify(header: BlobHeader, payload, payload_checksum: int | None = None) -> None:
    if len(payload) != header.payload_nbytes:
        raise SerdeError(f"payload is {len(payload)} bytes, header says {header.payload_nbytes} (truncated?)")
    if payload_checksum is None:
        payload_checksum = checksum(payload)
    if payload_checksum != header.checksum:
        raise SerdeError("payload checksum mismatch (corrupt)")


Allocator = Callable[[torch.Size, torch.dtype, MemoryFormat], "MemoryObj | None"]


def to_bytes(obj: MemoryObj) -> bytes:
    """Header + payload as one bytes object (for tiers that need a single value)."""
    payload = payload_view(obj.tensor)
    return b"".join((encode_header(obj, payload), payload))


def from_bytes(blob, allocate: Allocator) -> MemoryObj | None:
    """Parse and check a blob and copy its payload into a new memory object from
    `allocate`; None if allocate cannot provide one. Raises SerdeError if invalid."""
    view = memoryview(blob)
    header = decode_header(view)
    payload = view[HEADER_SIZE:]
    verify(header, payload)
    obj = allocate(header.shape, header.dtype, header.fmt)
    if obj is None:
        return None
    np.copyto(payload_view(obj.tensor), np.frombuffer(payload, dtype=np.uint8))
    return obj
