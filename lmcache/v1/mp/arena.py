"""The shared-memory arena: one file (in /dev/shm) holding every chunk slot.

The server creates it (mode 0600, or 0660 and a group), maps it and hands out byte
ranges of it (`ExtentAllocator`); each vLLM worker maps the same file and sees a chunk
as a tensor view at the slot's offset, so KV is gathered into and scattered from the
server's memory directly. The first page is a header: a magic and the access token a
client must show (reading it needs the file permission). The file is named after the
server's port and pid; a server starting up removes files left by dead servers of
its port (a SIGKILL leaves them behind).
"""

from __future__ import annotations

import bisect
import glob
import grp
import mmap
import os
import secrets
import threading
import weakref

import torch

from lmcache.v1.memory import MemoryFormat, MemoryObj, check_shape

HEADER_BYTES = 4096
MAGIC = b"LMCACHE-ARENA-1\n"
TOKEN_BYTES = 32
ALIGN = 4096  # slots start on a page: the gathers' bulk copies stay aligned


def _round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def arena_path(shm_dir: str, port: int, pid: int | None = None) -> str:
    return os.path.join(shm_dir, f"lmcache-server-{port}.{os.getpid() if pid is None else pid}")


def remove_stale(shm_dir: str, port: int) -> list[str]:
    """Arena files of this port whose server process is gone; removed."""
    removed = []
    for path in glob.glob(arena_path(shm_dir, port, pid=0)[:-1] + "*"):
        pid = path.rsplit(".", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or not ours to signal): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


class Arena:
    """A mapped arena file; `tensor` is all of it as uint8 (header included)."""

    def __init__(self, path: str, mm: mmap.mmap, owner: bool):
        self.path = path
        self._mm = mm
        self.size = len(mm)
        self.tensor = torch.frombuffer(mm, dtype=torch.uint8)
        self.owner = owner

    @classmethod
    def create(cls, path: str, data_bytes: int, group: str | None = None) -> "Arena":
        size = HEADER_BYTES + _round_up(data_bytes)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            if group:
                os.fchown(fd, -1, grp.getgrnam(group).gr_gid)
                os.fchmod(fd, 0o660)
            os.ftruncate(fd, size)  # sparse: pages are taken as slots are written
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        token = secrets.token_bytes(TOKEN_BYTES)
        mm[: len(MAGIC) + TOKEN_BYTES] = MAGIC + token
        arena = cls(path, mm, owner=True)
        arena.token = token.hex()
        return arena

    @classmethod
    def open(cls, path: str, expected_size: int) -> "Arena":
        """Map a server's arena (a client). Raises OSError (no permission, gone) or ValueError."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size != expected_size or size <= HEADER_BYTES:
                raise ValueError(f"arena {path} is {size} bytes, the server said {expected_size}")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if mm[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{path} is not an lmcache arena (bad magic)")
        arena = cls(path, mm, owner=False)
        arena.token = bytes(mm[len(MAGIC): len(MAGIC) + TOKEN_BYTES]).hex()
        return arena

    host_registered: bool | None = None  # None: not tried; see register_host_memory

    def register_host_memory(self) -> bool:
        """Page-lock this mapping for device copies where the platform does (CUDA:
        cudaHostRegister); False on CPU and Gaudi (pageable, as vllm-gaudi expects). The
        outcome is kept in `host_registered`; the registration ends with the arena."""
        from lmcache.platforms import current_platform

        platform = current_platform()
        self.host_registered = bool(platform.register_host_memory(self.tensor))
        if self.host_registered:
            weakref.finalize(self, platform.unregister_host_memory, self.tensor.data_ptr())
        return self.host_registered

    def view(self, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        shape = torch.Size(shape)
        nbytes = shape.numel() * dtype.itemsize
        if offset < HEADER_BYTES or offset + nbytes > self.size:
            raise ValueError(f"slot {offset}+{nbytes} lies outside the arena (0..{self.size})")
        return self.tensor[offset: offset + nbytes].view(dtype).view(shape)

    def unlink(self) -> None:
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class ExtentAllocator:
    """First-fit byte ranges of [start, end), freed ranges merged with their neighbours."""

    def __init__(self, start: int, end: int):
        self._starts = [start]
        self._lengths = [end - start]
        self.free_bytes = end - start
        self.largest_hint = end - start

    def allocate(self, nbytes: int) -> int | None:
        nbytes = _round_up(nbytes)
        for i, length in enumerate(self._lengths):
            if length >= nbytes:
                offset = self._starts[i]
                if length == nbytes:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i] += nbytes
                    self._lengths[i] -= nbytes
                self.free_bytes -= nbytes
                return offset
        return None

    def fits(self, nbytes: int) -> bool:
        nbytes = _round_up(nbytes)
        return any(length >= nbytes for length in self._lengths)

    def free(self, offset: int, nbytes: int) -> None:
        nbytes = _round_up(nbytes)
        i = bisect.bisect_left(self._starts, offset)
        if (i < len(self._starts) and self._starts[i] < offset + nbytes) or (
                i > 0 and self._starts[i - 1] + self._lengths[i - 1] > offset):
            raise RuntimeError(f"double free of arena range {offset}+{nbytes}")
        self._starts.insert(i, offset)
        self._lengths.insert(i, nbytes)
        self.free_bytes += nbytes
        if i + 1 < len(self._starts) and offset + nbytes == self._starts[i + 1]:
            self._lengths[i] += self._lengths.pop(i + 1)
            del self._starts[i + 1]
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == offset:
            self._lengths[i - 1] += self._lengths.pop(i)
            del self._starts[i]


class SlotObj(MemoryObj):
    """A memory object living in an arena slot; `offset` names the slot on the wire."""

    __slots__ = ("offset", "epoch")

    def __init__(self, tensor: torch.Tensor, fmt: MemoryFormat, pool, offset: int, epoch: int = 0):
        super().__init__(tensor, fmt, pool)
        self.offset = offset
        self.epoch = epoch

    def free(self) -> None:
        pool = self.detach()
        if pool is not None:
            pool.free_slot(self)

    def detach(self):
        """Hand the slot over (committed under a key): free() does nothing from now on."""
        pool, self._pool = self._pool, None
        return pool


class ArenaPool:
    """The server's host memory: HostMemoryPool's interface over the arena's slots."""

    def __init__(self, arena: Arena):
        self.arena = arena
        self.budget_bytes = arena.size - HEADER_BYTES
        self._extents = ExtentAllocator(HEADER_BYTES, arena.size)
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self.budget_bytes - self._extents.free_bytes

    @property
    def free_bytes(self) -> int:
        return self._extents.free_bytes

    idle_bytes = 0

    def fits(self, nbytes: int) -> bool:
        with self._lock:
            return self._extents.fits(nbytes)

    def allocate(self, shape, dtype: torch.dtype, fmt: MemoryFormat) -> SlotObj | None:
        shape = check_shape(torch.Size(shape), fmt)
        nbytes = shape.numel() * dtype.itemsize
        with self._lock:
            offset = self._extents.allocate(nbytes)
        if offset is None:
            return None
        return SlotObj(self.arena.view(offset, shape, dtype), fmt, self, offset)

    def free_slot(self, obj: SlotObj) -> None:
        with self._lock:
            self._extents.free(obj.offset, obj.nbytes)

    def clear_idle(self) -> None:
        pass
