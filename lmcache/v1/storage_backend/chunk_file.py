"""One chunk file: a serde header, then the payload, moved between a memory
object and a file descriptor with as little extra work as a plain write/read.

What the profile of the disk tier showed (32 MiB chunks, page cache, no fsync):
the checksum is the only work a plain write/read does not do, and xxh3 over a
32 MiB payload that is not in the CPU cache is bound by memory bandwidth (about
3 ms here) while the same bytes hash at ~40 GB/s from L2. So the payload moves
in blocks that fit L2 and each block is hashed right AFTER the kernel copied it
(write: the kernel's copy pulled the source block into the cache; read: it just
wrote the destination block), i.e. the checksum re-reads cache-hot bytes only.
Blocks are aligned to file offsets (header and first block go in one writev), so
each write fills whole large page-cache folios instead of splitting them at odd
offsets, and the space is reserved up front with fallocate(2) where the file
system has it (one extent instead of page-by-page delayed allocation; a full
disk fails before anything is copied). Measured effects: docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys

from lmcache.v1.storage_backend import serde
from lmcache.v1.storage_backend.serde import HEADER_SIZE, SerdeError

logger = logging.getLogger(__name__)

# Block sizes, measured with 32 MiB chunks (2 MiB L2 per core). Reads: 256 KiB, so a
# block and its page-cache source stay in L2 for the checksum. Writes: 1 MiB, a
# trade: the page cache sizes its folios after the write calls, and a file written
# in 1 MiB pieces reads back ~5% faster than one written in 512 KiB pieces, while
# hashing a 1 MiB source after its copy costs put ~8% more than 512 KiB.
WRITE_BLOCK = 1 << 20
READ_BLOCK = 256 << 10
_PLACEHOLDER = bytes(HEADER_SIZE)  # not a valid header: a file is never valid before the real one lands


def _write_all(fd: int, buffers: list) -> None:
    """Write the buffers in order at the current offset (writev, resuming after short writes)."""
    written = os.writev(fd, buffers)
    if written == sum(len(b) for b in buffers):
        return
    for buf in buffers:  # a short write: rare (a signal, RLIMIT_FSIZE)
        if written >= len(buf):
            written -= len(buf)
            continue
        rest, written = memoryview(buf)[written:], 0
        while rest:
            rest = rest[os.write(fd, rest) :]


def write_chunk(fd: int, header_for, payload, known_checksum: int | None = None) -> int:
    """Write header + payload to a new, empty file from offset 0; returns the
    payload checksum. `header_for(checksum)` builds the header. With
    `known_checksum` (computed by another tier during the same store) the payload
    goes in one call and is not hashed again."""
    view = memoryview(payload).cast("B")
    if known_checksum is not None:
        _write_all(fd, [header_for(known_checksum), view])
        return known_checksum
    h = serde.new_checksum()
    block_bytes = WRITE_BLOCK
    first = view[: block_bytes - HEADER_SIZE]  # header + first block end on a block boundary
    _write_all(fd, [_PLACEHOLDER, first])
    h.update(first)
    for offset in range(len(first), len(view), block_bytes):
        block = view[offset : offset + block_bytes]
        _write_all(fd, [block])
        h.update(block)
    payload_checksum = h.intdigest()
    header = header_for(payload_checksum)
    if os.pwrite(fd, header, 0) != len(header):
        raise OSError(errno.EIO, "short write of the chunk header")
    return payload_checksum


def read_payload(fd: int, payload) -> int:
    """Fill `payload` from the file (after the header) and return its checksum.
    SerdeError if the file ends early."""
    view = memoryview(payload).cast("B")
    h = serde.new_checksum()
    block_bytes = READ_BLOCK
    start, end = 0, min(len(view), block_bytes - HEADER_SIZE)  # blocks aligned to file offsets
    while start < len(view):
        block = view[start:end]
        got = os.preadv(fd, [block], HEADER_SIZE + start)
        while got < len(block):  # short read: only at end of file, in practice
            more = os.preadv(fd, [block[got:]], HEADER_SIZE + start + got)
            if more == 0:
                raise SerdeError("file shrank while being read (truncated)")
            got += more
        h.update(block)
        start, end = end, min(len(view), end + block_bytes)
    return h.intdigest()


def _libc_fallocate():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _libc_fallocate()
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY}


class Preallocator:
    """Reserves a new file's space with fallocate(2) (not posix_fallocate: glibc
    emulates that by writing every block where the file system lacks it). Where
    fallocate is unsupported it turns itself off; ENOSPC/EDQUOT are raised."""

    def __init__(self, path: str):
        self._path = path
        self._fallocate = _FALLOCATE

    @property
    def enabled(self) -> bool:
        return self._fallocate is not None

    def __call__(self, fd: int, nbytes: int) -> None:
        fn = self._fallocate
        if fn is None or fn(fd, 0, 0, nbytes) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EINTR:
            return  # the writes allocate as they go
        if err in _UNSUPPORTED:
            self._fallocate = None
            logger.info("disk tier %s: fallocate unsupported (%s); files are not preallocated", self._path,
                        os.strerror(err))
            return
        raise OSError(err, os.strerror(err))
