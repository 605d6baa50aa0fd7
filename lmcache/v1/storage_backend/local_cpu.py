"""The host-memory tier: an LRU of memory objects within a byte budget."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from lmcache.v1.memory import MemoryObj
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger(__name__)


class LocalCPUBackend:
    """Holds memory objects; total bytes never exceed `budget_bytes`.

    Eviction takes the least recently used object that nobody is reading
    (`MemoryObj.in_use`); objects being read stay. The tier owns what it holds
    and frees it (back to the pool) on eviction.
    """

    name = "cpu"

    def __init__(self, budget_bytes: int, stats: EngineStats | None = None):
        self.budget_bytes = int(budget_bytes)
        self._stats = stats or EngineStats()
        self._objs: OrderedDict[CacheEngineKey, MemoryObj] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._objs)

    def contains(self, key: CacheEngineKey) -> bool:
        return key in self._objs

    def pinned_count(self) -> int:
        """Objects a reader holds right now (a load, a lease, a queued disk/remote write)."""
        with self._lock:
            return sum(1 for obj in self._objs.values() if obj.in_use)

    def prefix_count(self, keys) -> int:
        """How many of `keys`, from the first, the tier holds (no side effects)."""
        held = self._objs
        n = 0
        for key in keys:
            if key not in held:
                break
            n += 1
        return n

    def get(self, key: CacheEngineKey) -> MemoryObj | None:
        """The object with a reader reference taken (caller must ref_count_down)."""
        with self._lock:
            obj = self._objs.get(key)
            if obj is None:
                return None
            obj.ref_count_up()
            self._objs.move_to_end(key)
            return obj

    def put(self, key: CacheEngineKey, obj: MemoryObj) -> bool:
        """Take ownership of `obj`; False (caller keeps it) if the key is already
        held or the object cannot fit even after evicting everything idle."""
        with self._lock:
            if key in self._objs or obj.nbytes > self.budget_bytes:
                return False
            self._evict_locked(lambda: self._used + obj.nbytes <= self.budget_bytes)
            if self._used + obj.nbytes > self.budget_bytes:
                return False
            self._objs[key] = obj
            self._used += obj.nbytes
        self._stats.chunk_event(self.name, True, key)
        return True

    def evict_until(self, enough) -> None:
        """Evict idle objects, oldest first, until enough() is true or none is left."""
        with self._lock:
            self._evict_locked(enough)

    def _evict_locked(self, enough) -> None:
        if enough():
            return
        for key in list(self._objs):
            obj = self._objs[key]
            if obj.in_use:
                continue
            del self._objs[key]
            self._used -= obj.nbytes
            obj.free()
            self._stats.miss("evicted", tier=self.name)
            self._stats.chunk_event(self.name, False, key)
            if enough():
                return

    def remove(self, key: CacheEngineKey) -> bool:
        with self._lock:
            obj = self._objs.get(key)
            if obj is None or obj.in_use:
                return False
            del self._objs[key]
            self._used -= obj.nbytes
            obj.free()
        self._stats.chunk_event(self.name, False, key)
        return True

    def detach(self, key: CacheEngineKey) -> MemoryObj | None:
        """Drop `key` from the tier even while it is being read, without freeing it:
        the caller now owns the object (a refused chunk, storage_manager.discard)."""
        with self._lock:
            obj = self._objs.pop(key, None)
            if obj is None:
                return None
            self._used -= obj.nbytes
        self._stats.chunk_event(self.name, False, key)
        return obj

    def clear(self) -> None:
        with self._lock:
            for obj in self._objs.values():
                if not obj.in_use:
                    obj.free()
            self._objs.clear()
            self._used = 0
