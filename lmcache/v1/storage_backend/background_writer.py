"""Writes chunks to the slow tiers (disk, remote) off the caller's path.

A bounded queue: when it is full the chunk is dropped and counted, the caller
never waits. flush(timeout) waits until everything queued has been written.
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


class BackgroundWriter:
    def __init__(self, tiers: Sequence, queue_size: int, stats: EngineStats):
        self._tiers = list(tiers)
        self._stats = stats
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._full_logged = False
        self._thread = threading.Thread(target=self._run, name="lmcache-writer", daemon=True)
        self._thread.start()

    def submit(self, key: CacheEngineKey, obj: MemoryObj, done: Callable[[MemoryObj], None]) -> bool:
        """Queue `obj` for writing; `done(obj)` runs after it was written. False
        (nothing queued, `done` not called) if the queue is full."""
        try:
            self._queue.put_nowait((key, obj, done))
        except queue.Full:
            self._stats.miss("dropped", tier="queue")
            if not self._full_logged:
                self._full_logged = True
                logger.warning(
                    "store queue full (%d chunks): chunks for the disk/remote tiers are dropped "
                    "until the writer catches up", self._queue.maxsize
                )
            return False
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                key, obj, done = item
                checksum = ChecksumMemo()  # the chunk is hashed once for all tiers
                try:
                    for tier in self._tiers:
                        try:
                            tier.put(key, obj, checksum)
                        except Exception:  # a tier bug must not kill the writer
                            logger.exception("%s tier: unexpected error while storing", tier.name)
                            self._stats.miss("dropped")
                finally:
                    done(obj)
            finally:
                self._queue.task_done()
            if self._full_logged and self._queue.empty():
                self._full_logged = False

    @property
    def pending(self) -> int:
        return self._queue.unfinished_tasks

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
                item[2](item[1])
                self._stats.miss("dropped")
            self._queue.task_done()
