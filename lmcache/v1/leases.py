"""Leases: a lookup's promise held until the load.

A scheduler asks a worker "how much of this prompt do you hold?" and then, a step or
more later, tells it to load that much. In between, concurrent stores may evict the
chunks, and a load that comes up short is wrong output on runners that never read load
errors (vllm-gaudi). A lookup that names a lease therefore brings every chunk it counts
into host memory and holds a reader reference on it (eviction skips objects in use):
the CPU tier's own object, or a copy read from the disk or remote tier (promoted into
the CPU tier where it fits, else held by the lease alone). The hit it answers is the
prefix it could hold, so a tier fault or a full budget shortens the answer, never the
load. The retrieve takes the chunks from here; the lease ends when the retrieve has
planned its copies, when the scheduler says the request went away, or after `ttl`
seconds (a lost request must not pin memory forever).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from lmcache.v1.memory import MemoryObj
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger(__name__)


@dataclass
class _Lease:
    deadline: float
    keys: list[CacheEngineKey] = field(default_factory=list)


class LeaseTable:
    """Leases by id; a chunk held by several leases is held once (counted)."""

    def __init__(
        self,
        get: Callable[[CacheEngineKey], MemoryObj | None],
        release: Callable[[MemoryObj], None],
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl!r}")
        self._get = get  # the storage manager's get(): object with a reader reference, or None
        self._release = release  # ... and its release()
        self.ttl = float(ttl)
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._held: dict[CacheEngineKey, list] = {}  # key -> [obj, number of leases holding it]
        self._lock = threading.RLock()
        self.expired = 0  # leases dropped by their ttl (requests the scheduler lost)

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def held_chunks(self) -> int:
        return len(self._held)

    def acquire(self, lease_id: str, keys: list[CacheEngineKey],
                usable: Callable[[int, MemoryObj], bool] | None = None) -> int:
        """Hold `keys` from the first for `lease_id`; returns how many are held (a
        prefix). `usable(i, obj)` may refuse the object read for keys[i] (e.g. a
        wrong shape): the prefix ends there. A lease id asked again is renewed:
        the new prefix replaces the old."""
        with self._lock:
            self._sweep()
            lease = _Lease(self._clock() + self.ttl)
            for index, key in enumerate(keys):
                entry = self._held.get(key)
                if entry is not None:
                    entry[1] += 1
                else:
                    obj = self._get(key)
                    if obj is None:
                        break
                    if usable is not None and not usable(index, obj):
                        self._release(obj)
                        break
                    self._held[key] = [obj, 1]
                lease.keys.append(key)
            old = self._leases.pop(lease_id, None)
            self._leases[lease_id] = lease
            if old is not None:
                self._drop(old)
            return len(lease.keys)

    def take(self, key: CacheEngineKey) -> MemoryObj | None:
        """A leased chunk with one more reader reference (give it back to the
        storage manager's release()), or None if no lease holds it."""
        with self._lock:
            entry = self._held.get(key)
            if entry is None:
                return None
            entry[0].ref_count_up()
            return entry[0]

    def release(self, lease_id: str) -> bool:
        """End a lease (unknown ids are ignored: already used, renewed or expired)."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is not None:
                self._drop(lease)
            self._sweep()
            return lease is not None

    def release_all(self) -> None:
        with self._lock:
            for lease_id in list(self._leases):
                self._drop(self._leases.pop(lease_id))

    def _drop(self, lease: _Lease) -> None:
        for key in lease.keys:
            entry = self._held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._held[key]
                self._release(entry[0])

    def _sweep(self) -> None:
        now = self._clock()
        stale = [i for i, lease in self._leases.items() if lease.deadline < now]
        for lease_id in stale:
            self._drop(self._leases.pop(lease_id))
        if stale:
            self.expired += len(stale)
            logger.warning(
                "LMCache: %d lookup lease(s) expired unused after %.0f s (e.g. %s); their chunks may be "
                "evicted again (lookup_lease_ttl)", len(stale), self.ttl, stale[0],
            )
