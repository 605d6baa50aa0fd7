"""Writes chunks to the slow tiers (disk, remote) off the caller's path.

A queue bounded in chunks: what does not fit is dropped and counted, the caller
never waits. The chunks of one submit (a step's) are written together, with what
else is queued by then (up to BATCH_CHUNKS): each tier's put_many gets them all, so
the remote tier sends them as one pipeline per node (or parallel requests).
flush(timeout) waits until everything queued has been written.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Sequence

from lmcache.v1.memory import MemoryObj
from lmcache.v1.storage_backend.serde import ChecksumMemo
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger(__name__)

_STOP = object()
BATCH_CHUNKS = 256  # at most this many chunks are handed to the tiers at once

Item = tuple[CacheEngineKey, MemoryObj, Callable[[MemoryObj], None]]


class BackgroundWriter:
    def __init__(self, tiers: Sequence, queue_size: int, stats: EngineStats):
        self._tiers = list(tiers)
        self._stats = stats
        self._capacity = queue_size
        self._queued = 0  # chunks queued and not yet written
        self._count_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()  # lists of items, and _STOP
        self._full_logged = False
        self._thread = threading.Thread(target=self._run, name="lmcache-writer", daemon=True)
        self._thread.start()

    def submit(self, key: CacheEngineKey, obj: MemoryObj, done: Callable[[MemoryObj], None]) -> bool:
        """Queue `obj` for writing; `done(obj)` runs after it was written. False
        (nothing queued, `done` not called) if the queue is full."""
        return self.submit_many([(key, obj, done)]) == 1

    def submit_many(self, items: list[Item]) -> int:
        """Queue the chunks of `items` to be written together; returns how many, from the
        first, were queued (the others did not fit: dropped and counted, their `done`
        not called)."""
        with self._count_lock:
            taken = max(0, min(len(items), self._capacity - self._queued))
            self._queued += taken
        if taken:
            self._queue.put(items[:taken])
        if taken < len(items):
            self._stats.miss("dropped", len(items) - taken, tier="queue")
            if not self._full_logged:
                self._full_logged = True
                logger.warning(
                    "store queue full (%d chunks): chunks for the disk/remote tiers are dropped "
                    "until the writer catches up", self._capacity
                )
        return taken

    def _next_batch(self) -> tuple[list[Item], int, bool]:
        """A queued batch and what else is queued now (up to BATCH_CHUNKS chunks): (items,
        queue entries taken, whether _STOP was among them)."""
        first = self._queue.get()
        if first is _STOP:
            return [], 1, True
        items, taken = list(first), 1
        while len(items) < BATCH_CHUNKS:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            taken += 1
            if more is _STOP:
                return items, taken, True
            items += more
        return items, taken, False

    def _run(self) -> None:
        while True:
            items, taken, stop = self._next_batch()
            try:
                if items:
                    self._write(items)
            finally:
                with self._count_lock:
                    self._queued -= len(items)
                for _ in range(taken):
                    self._queue.task_done()
            if stop:
                return
            if self._full_logged and self._queue.empty():
                self._full_logged = False

    def _write(self, items: list[Item]) -> None:
        keys = [key for key, _, _ in items]
        objs = [obj for _, obj, _ in items]
        checksums = [ChecksumMemo() for _ in items]  # each chunk is hashed once for all tiers
        try:
            for tier in self._tiers:
                try:
                    tier.put_many(keys, objs, checksums)
                except Exception:  # a tier bug must not kill the writer
                    logger.exception("%s tier: unexpected error while storing", tier.name)
                    self._stats.miss("dropped", len(items))
        finally:
            for _, obj, done in items:
                done(obj)

    @property
    def pending(self) -> int:
        """Chunks queued and not yet written."""
        with self._count_lock:
            return self._queued

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued chunk is written; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (up to `timeout` seconds), then stop the thread."""
        if not self._thread.is_alive():
            return
        if not self.flush(timeout):
            logger.warning("closing with %d chunks still queued for disk/remote: they are dropped", self.pending)
            self._drain()
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                with self._count_lock:
                    self._queued -= len(item)
                for _, obj, done in item:
                    done(obj)
                self._stats.miss("dropped", len(item))
            self._queue.task_done()
