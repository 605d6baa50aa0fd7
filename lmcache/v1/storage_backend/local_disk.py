"""The local disk tier: one file per chunk in one directory, LRU within a byte budget.

A file is written under a temporary name and renamed into place, so a crash
never leaves a half-written chunk visible. Each file is a serde blob (header
with checksum + raw bytes); a file that does not parse or verify is a miss, is
removed, and is logged. At start-up the directory is rescanned, so what an
earlier process stored is found again. Several processes may share the
directory: a file another process wrote is adopted when first looked for.
Moving the bytes (blocks hashed while cache-hot, preallocation) is chunk_file.py.

Whoever can write the directory can put files in it, so nothing there is trusted:
chunk files are opened without following symlinks (a link, FIFO or device under a
chunk's name is a foreign file: a miss, removed), temporary files are created with
O_EXCL|O_NOFOLLOW under unguessable names, and a directory owned by another user
(or writable by all) is warned about at start-up. The directory is checked once
(disk_dir.py): unreadable fails start-up naming local_disk, read-only gives one line
and a tier that serves what is there and stores nothing.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections import OrderedDict

from lmcache.v1.memory import MemoryObj
from lmcache.v1.storage_backend import chunk_file, disk_dir, serde
from lmcache.v1.storage_backend.serde import Allocator, ChecksumMemo, SerdeError
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger(__name__)

SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
_MAX_NAME = 200
_STALE_TMP_SECONDS = 3600.0


def file_name(key: CacheEngineKey) -> str:
    text = key.to_string()
    if len(text) > _MAX_NAME:  # file systems cap names at 255 bytes
        text = "h-" + hashlib.blake2b(text.encode(), digest_size=20).hexdigest()
    return text + SUFFIX


class LocalDiskBackend:
    name = "disk"

    def __init__(self, path: str, budget_bytes: int, stats: EngineStats | None = None,
                 integrity: serde.Integrity = serde.NO_SECRET):
        self.path = os.path.abspath(path)
        self._integrity = integrity  # every read checks the key digest (and MAC) in the header
        self.budget_bytes = int(budget_bytes)
        self._stats = stats or EngineStats()
        self._index: OrderedDict[str, int] = OrderedDict()  # file name -> bytes, oldest first
        self._used = 0
        self._lock = threading.Lock()
        self._failing_errnos: set[int] = set()
        self._unlink_errnos: set[int] = set()
        self._too_small_logged = False
        self.writable = disk_dir.prepare(self.path)
        self._preallocate = chunk_file.Preallocator(self.path)
        self._rescan()

    # -- bookkeeping --------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    def _rescan(self) -> None:
        found = []
        now = time.time()
        with os.scandir(self.path) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.name.endswith(TMP_SUFFIX) and now - st.st_mtime > _STALE_TMP_SECONDS:
                    self._unlink(entry.path)  # left by a process that crashed mid-write
                elif entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
                    found.append((st.st_mtime, entry.name, st.st_size))
        for _, name, size in sorted(found):
            self._index[name] = size
            self._used += size
        with self._lock:
            self._evict_locked(0)
        if found:
            logger.info("disk tier %s: found %d chunks (%d bytes) from earlier runs", self.path, len(found), self._used)

    def _evict_locked(self, incoming: int) -> None:
        while self._index and self._used + incoming > self.budget_bytes:
            name, size = self._index.popitem(last=False)
            self._used -= size
            self._unlink(os.path.join(self.path, name))
            self._stats.miss("evicted", tier=self.name)
            self._lost(name)

    def _forget(self, name: str) -> None:
        with self._lock:
            size = self._index.pop(name, None)
            if size is not None:
                self._used -= size

    def _adopt(self, name: str, size: int) -> None:
        """Count a file found on disk (written by another process) in the budget."""
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
                return
            self._evict_locked(size)
            self._index[name] = size
            self._used += size

    def _lost(self, name: str) -> None:
        """Tell the observers a chunk file is gone (names too long to hold the key are not reported)."""
        try:
            key = CacheEngineKey.from_string(name[: -len(SUFFIX)])
        except ValueError:
            return
        self._stats.chunk_event(self.name, False, key)

    def _unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in self._unlink_errnos:  # one line per kind of failure, not per file
                self._unlink_errnos.add(exc.errno)
                logger.warning("disk tier: cannot remove %s: %s (further such failures are not logged)", path, exc)

    # -- the tier -------------------------------------------------------------
    def contains(self, key: CacheEngineKey) -> bool:
        """Known, or written by another process sharing the directory (no side
        effects: such a file is adopted into the budget when it is read)."""
        name = file_name(key)
        if name in self._index:
            return True
        try:
            return stat.S_ISREG(os.lstat(os.path.join(self.path, name)).st_mode)  # a symlink is no hit
        except OSError:
            return False

    def get(self, key: CacheEngineKey, allocate: Allocator) -> MemoryObj | None:
        """Read the chunk into a memory object from `allocate`; None on a miss."""
        name = file_name(key)
        path = os.path.join(self.path, name)
        try:
            # O_NOFOLLOW: a symlink under a chunk's name is refused (ELOOP); O_NONBLOCK: a FIFO cannot block us
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            if name in self._index:
                self._lost(name)
            self._forget(name)
            self._stats.miss("absent")
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._reject(name, path, None, SerdeError("a symbolic link, not a chunk file"))
                return None
            logger.warning("disk tier: cannot open %s: %s", path, exc)
            self._stats.miss("tier_down", tier=self.name)
            return None
        obj = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SerdeError("not a regular file")
            header = serde.decode_header(os.pread(fd, serde.HEADER_SIZE, 0))
            if st.st_size != serde.HEADER_SIZE + header.payload_nbytes:
                raise SerdeError(
                    f"file is {st.st_size} bytes, header says {serde.HEADER_SIZE + header.payload_nbytes} (truncated?)"
                )
            obj = allocate(header.shape, header.dtype, header.fmt)
            if obj is None:
                self._stats.miss("dropped", tier=self.name)
                return None
            payload = serde.payload_view(obj.tensor)
            serde.verify(header, payload, chunk_file.read_payload(fd, payload))
            self._integrity.check(key, header, payload)
        except SerdeError as exc:
            if obj is not None:
                obj.free()
            self._reject(name, path, st, exc)
            return None
        except OSError as exc:
            if obj is not None:
                obj.free()
            logger.warning("disk tier: cannot read %s: %s", path, exc)
            self._stats.miss("tier_down", tier=self.name)
            return None
        finally:
            os.close(fd)
        self._adopt(name, st.st_size)
        return obj

    def _reject(self, name: str, path: str, st: os.stat_result | None, reason: Exception) -> None:
        """`st`: what was read (None: a symlink, removed whatever it is now pointing at)."""
        logger.warning("disk tier: %s is not a valid chunk (%s): treated as a miss and removed", path, reason)
        self._stats.miss(serde.miss_cause(reason), tier=self.name)
        self._lost(name)
        self._forget(name)
        try:
            now = os.lstat(path)
        except OSError:
            return
        if st is None and stat.S_ISLNK(now.st_mode) or st is not None and (now.st_ino, now.st_dev) == (
                st.st_ino, st.st_dev):  # not replaced meanwhile by a good one
            self._unlink(path)

    def put_many(self, keys: list[CacheEngineKey], objs: list[MemoryObj],
                 checksums: list[ChecksumMemo | None] | None = None) -> list[bool]:
        """put() of each chunk in turn."""
        checksums = checksums or [None] * len(keys)
        return [self.put(key, obj, memo) for key, obj, memo in zip(keys, objs, checksums)]

    def put(self, key: CacheEngineKey, obj: MemoryObj, checksum: ChecksumMemo | None = None) -> bool:
        """Write the chunk; False (counted as dropped) if it cannot be written.
        `checksum`: shared with the other tiers written in the same store."""
        name = file_name(key)
        size = serde.HEADER_SIZE + obj.nbytes
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
                return True
            if size > self.budget_bytes or not self.writable:
                self._stats.miss("dropped", tier=self.name)
                if self.writable and not self._too_small_logged:
                    self._too_small_logged = True
                    logger.error("disk tier: max_local_disk_size (%d bytes) is smaller than one chunk (%d bytes): "
                                 "the disk tier stores nothing; raise it to at least a few chunks",
                                 self.budget_bytes, size)
                return False
            self._evict_locked(size)
            self._used += size  # reserved while writing
        path = os.path.join(self.path, name)
        new = created = False
        tmp = os.path.join(self.path, f".{name}.{os.getpid()}.{os.urandom(6).hex()}{TMP_SUFFIX}")
        try:
            payload = serde.payload_view(obj.tensor)
            # O_EXCL|O_NOFOLLOW: never write through a file or link someone else put at this name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            created = True
            try:
                self._preallocate(fd, size)
                known = checksum.value if checksum is not None else None
                header_for = lambda c: self._integrity.header(key, obj, payload, c, checksum)  # noqa: E731
                computed = chunk_file.write_chunk(fd, header_for, payload, known)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if checksum is not None:
                checksum.value = computed
        except OSError as exc:
            if created:  # never what someone else put at that name
                self._unlink(tmp)
            with self._lock:
                self._used -= size
            self._stats.miss("dropped", tier=self.name)
            if exc.errno not in self._failing_errnos:
                self._failing_errnos.add(exc.errno)
                hint = " (disk full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
                logger.warning("disk tier: cannot write to %s%s: %s; such stores are skipped", self.path, hint, exc)
            return False
        with self._lock:
            if name in self._index:  # written meanwhile by another thread: counted once
                self._used -= size
                self._index.move_to_end(name)
            else:
                self._index[name] = size
                new = True
        if new:
            self._stats.chunk_event(self.name, True, key)
        if self._failing_errnos:
            self._failing_errnos.clear()
            logger.info("disk tier: writes to %s work again", self.path)
        return True

    def remove(self, key: CacheEngineKey) -> None:
        name = file_name(key)
        self._forget(name)
        self._unlink(os.path.join(self.path, name))
        self._stats.chunk_event(self.name, False, key)

    def close(self) -> None:
        pass
