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

A prefetching lookup (`acquire(..., resident_prefix=...)`, used where vLLM loads asynchronously)
holds only what is already in host memory at once and hands the rest to one background
thread that reads it from the disk or remote tier; the lookup answers at once with what
the tiers hold, and the load waits for the prefetch (`wait`). A chunk the prefetch cannot
read ends the lease's prefix there: the load comes up short and reports it (vLLM then
recomputes those tokens), which is why only runners that read load errors prefetch.
"""

from __future__ import annotations

import logging
import queue
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
    # set once every key the lease will ever hold is held (at once unless it prefetches)
    settled: threading.Event = field(default_factory=threading.Event)


class LeaseTable:
    """Leases by id; a chunk held by several leases is held once (counted)."""

    def __init__(
        self,
        get: Callable[[CacheEngineKey], MemoryObj | None],
        release: Callable[[MemoryObj], None],
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        get_many: Callable[[list], list] | None = None,
        prefetch_get_many: Callable[[list], list] | None = None,
    ):
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl!r}")
        self._get = get  # the storage manager's get(): object with a reader reference, or None
        self._release = release  # ... and its release()
        self._get_many = get_many  # several keys in one go (a prefix): one round trip to a server
        self._prefetch_get_many = prefetch_get_many or get_many  # the same, for the prefetch thread
        self.ttl = float(ttl)
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._held: dict[CacheEngineKey, list] = {}  # key -> [obj, number of leases holding it]
        self._lock = threading.RLock()
        self.expired = 0  # leases dropped by their ttl (requests the scheduler lost)
        self.prefetched = 0  # chunks the prefetch thread brought into host memory
        self.prefetch_stopped = 0  # prefetches that ended early (a chunk could not be read)
        self._prefetch_queue: queue.SimpleQueue | None = None

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def held_chunks(self) -> int:
        return len(self._held)

    def acquire(self, lease_id: str, keys: list[CacheEngineKey],
                usable: Callable[[int, MemoryObj], bool] | None = None,
                resident_prefix: Callable[[list[CacheEngineKey]], int] | None = None) -> int:
        """Hold `keys` from the first for `lease_id`; returns how many are held (a
        prefix). `usable(i, obj)` may refuse the object read for keys[i] (e.g. a
        wrong shape): the prefix ends there. A lease id asked again is renewed:
        the new prefix replaces the old. With `resident_prefix` (prefetch: how many
        of the keys, from the first, are in host memory; asked once, before the lock,
        since on a server it is a round trip): from the first key past that prefix
        that no lease holds, the prefetch thread reads, and the answer counts them all
        (see the module doc)."""
        in_memory = resident_prefix(keys) if resident_prefix is not None else len(keys)
        with self._lock:
            self._sweep()
            lease = _Lease(self._clock() + self.ttl)
            later = next((i for i in range(in_memory, len(keys)) if keys[i] not in self._held), len(keys))
            fetched = self._fetch_ahead(keys[:later])
            for index, key in enumerate(keys[:later]):
                entry = self._held.get(key)
                if entry is not None:
                    entry[1] += 1
                else:
                    obj = self._get(key) if fetched is None else fetched.pop(key, None)
                    if obj is None:
                        break
                    if usable is not None and not usable(index, obj):
                        self._release(obj)
                        break
                    self._held[key] = [obj, 1]
                lease.keys.append(key)
            for unused in (fetched or {}).values():
                self._release(unused)
            old = self._leases.pop(lease_id, None)
            self._leases[lease_id] = lease
            if old is not None:
                self._drop(old)
            if later >= len(keys) or len(lease.keys) < later:  # nothing left to read, or a prefix ended it
                lease.settled.set()
                return len(lease.keys)
            self._prefetch(lease_id, lease, keys, later, usable)
            return len(keys)

    def _fetch_ahead(self, keys: list[CacheEngineKey]) -> dict | None:
        """The keys not held yet, read in one call where the storage can (a prefix of them)."""
        if self._get_many is None:
            return None
        need = [key for key in keys if key not in self._held]
        return dict(zip(need, self._get_many(need))) if need else {}

    def wait(self, lease_id: str, timeout: float | None = None) -> bool:
        """Wait until the lease's prefetch is done (True at once for other leases and
        unknown ids); False on timeout."""
        with self._lock:
            lease = self._leases.get(lease_id)
        return True if lease is None else lease.settled.wait(timeout)

    def wait_all(self, lease_ids) -> None:
        """Wait for the prefetches of these leases (None entries are skipped), at most ttl each."""
        for lease_id in lease_ids:
            if lease_id is not None and not self.wait(lease_id, self.ttl):
                logger.warning("LMCache: the prefetch for lease %s took over %.0f s; loading what arrived",
                               lease_id, self.ttl)

    # -- the prefetch thread ----------------------------------------------------------
    def _prefetch(self, lease_id: str, lease: _Lease, keys: list, start: int, usable) -> None:
        if self._prefetch_queue is None:
            self._prefetch_queue = queue.SimpleQueue()
            threading.Thread(target=self._prefetch_loop, args=(self._prefetch_queue,),
                             name="lmcache-prefetch", daemon=True).start()
        self._prefetch_queue.put((lease_id, lease, keys, start, usable))

    def _prefetch_loop(self, jobs: queue.SimpleQueue) -> None:
        while True:
            lease_id, lease, keys, start, usable = jobs.get()
            try:
                self._fetch_into(lease_id, lease, keys, start, usable)
            except Exception:  # noqa: BLE001 - a tier fault shortens the lease, never kills the thread
                logger.warning("LMCache: prefetch for %s failed; its load comes up short", lease_id, exc_info=True)
                self.prefetch_stopped += 1
            finally:
                lease.settled.set()

    def _fetch_into(self, lease_id: str, lease: _Lease, keys: list, start: int, usable) -> None:
        with self._lock:
            if self._leases.get(lease_id) is not lease:
                return
            need = [key for key in keys[start:] if key not in self._held]
        fetched: dict = {}
        if self._prefetch_get_many is not None and need:  # the slow reads in one call, outside the lock
            fetched = dict(zip(need, self._prefetch_get_many(need)))
        asked = set(need) if self._prefetch_get_many is not None else set()
        try:
            self._hold_fetched(lease_id, lease, keys, start, usable, fetched, asked)
        finally:
            for unused in fetched.values():
                self._release(unused)

    def _hold_fetched(self, lease_id: str, lease: _Lease, keys: list, start: int, usable,
                      fetched: dict, asked: set) -> None:
        for index in range(start, len(keys)):
            key = keys[index]
            with self._lock:
                if self._leases.get(lease_id) is not lease:
                    return  # released, renewed or expired meanwhile
                entry = self._held.get(key)
                if entry is not None:
                    entry[1] += 1
                    lease.keys.append(key)
                    continue
            # read above (None: after the first miss), or now if it was held then
            obj = fetched.pop(key, None) if key in asked else self._get(key)
            if obj is None or (usable is not None and not usable(index, obj)):
                if obj is not None:
                    self._release(obj)
                self.prefetch_stopped += 1
                return
            with self._lock:
                if self._leases.get(lease_id) is not lease:
                    self._release(obj)
                    return
                entry = self._held.get(key)
                if entry is not None:  # another lease read it meanwhile
                    entry[1] += 1
                    self._release(obj)
                else:
                    self._held[key] = [obj, 1]
                lease.keys.append(key)
                self.prefetched += 1

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
