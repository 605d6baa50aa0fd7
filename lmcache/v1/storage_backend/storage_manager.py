"""The storage manager: the tiers together.

lookup walks CPU -> disk -> remote and returns the longest chunk prefix found;
get brings a chunk into host memory (a hit in a lower tier is promoted to the
CPU tier); put hands a chunk (put_many: a step's chunks) to the CPU tier at once
and to the slower tiers through the background writer, which writes a step's
chunks together.

Ownership of memory objects: an object given to put() belongs to the manager.
The CPU tier frees what it evicts; an object no tier keeps is freed once the
writer is done with it. Objects returned by get() carry a reader reference
that the caller gives back with release().

Integrity: every tier checks on read that a chunk was stored under the key it is
read under (the key digest in a disk/Redis/lm:// chunk's header; the key an object
was put under in host memory) and, with `chunk_secret`, its MAC (serde.Integrity).
A chunk the engine refuses (wrong shape or dtype for this engine) is removed from
every tier with discard(), so lookups stop reporting it.
"""

from __future__ import annotations

import logging
import threading

import torch

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory import HostMemoryPool, MemoryFormat, MemoryObj
from lmcache.v1.storage_backend.background_writer import BackgroundWriter
from lmcache.v1.storage_backend.local_cpu import LocalCPUBackend
from lmcache.v1.storage_backend.local_disk import LocalDiskBackend
from lmcache.v1.storage_backend.serde import Integrity
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger(__name__)

ALREADY_HELD = "already held"  # reserve(): the chunk is cached already (nothing to store)


class StorageManager:
    def __init__(self, config: LMCacheEngineConfig, stats: EngineStats | None = None, pool: HostMemoryPool | None = None):
        self.config = config
        self.stats = stats or EngineStats()
        # One byte budget for host memory: the CPU tier and the buffers in flight.
        self.pool = pool or HostMemoryPool(config.local_cpu_bytes)
        self.integrity = Integrity(getattr(config, "chunk_secret", None))
        self.cpu = LocalCPUBackend(self.pool.budget_bytes, self.stats) if config.local_cpu else None
        self.disk = (
            LocalDiskBackend(config.local_disk, config.local_disk_bytes, self.stats, integrity=self.integrity)
            if config.local_disk else None
        )
        self.remote = None
        if config.remote_url:
            extra = {}
            if config.remote_url.startswith("lm://"):
                from lmcache.v1.storage_backend.lm import LMServerBackend as RemoteBackend
            elif config.remote_url.startswith("s3://"):
                from lmcache.v1.storage_backend.s3 import S3Backend as RemoteBackend

                extra = {"endpoint_url": config.s3_endpoint_url}
            else:  # redis, valkey, their cluster and sentinel schemes
                from lmcache.v1.storage_backend.remote import RemoteBackend

            self.remote = RemoteBackend(
                config.remote_url,
                timeout=config.remote_timeout,
                connect_timeout=config.remote_connect_timeout,
                retry_interval=config.remote_retry_interval,
                stats=self.stats,
                **extra,
                integrity=self.integrity,
            )
        slow = [t for t in (self.disk, self.remote) if t is not None]
        self.writer = BackgroundWriter(slow, config.store_queue_size, self.stats) if slow else None
        self._transient: set[int] = set()  # ids of objects given out by get() that no tier owns
        self._lock = threading.Lock()
        self._no_memory_logged = False
        self._closed = False
        if self.pool.budget_bytes == 0:
            logger.warning(
                "max_local_cpu_size=0: no host memory for chunks, so nothing can be stored or "
                "loaded (every tier moves chunks through host memory)"
            )

    # -- memory -------------------------------------------------------------
    def allocate(self, shape, dtype: torch.dtype, fmt: MemoryFormat) -> MemoryObj | None:
        """A memory object from the pool, evicting idle CPU-tier chunks if needed;
        None (logged once) when even that does not make room."""
        obj = self.pool.allocate(shape, dtype, fmt)
        if obj is None and self.cpu is not None:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            self.cpu.evict_until(lambda: self.pool.fits(nbytes))
            obj = self.pool.allocate(shape, dtype, fmt)
        if obj is None and not self._no_memory_logged:
            self._no_memory_logged = True
            logger.warning(
                "host memory budget (max_local_cpu_size=%.3f GB) is exhausted by chunks in use: "
                "stores and loads beyond it are skipped", self.config.max_local_cpu_size
            )
        return obj

    def reserve(self, keys: list[CacheEngineKey], shapes: list, dtype: torch.dtype,
                fmt: MemoryFormat) -> list:
        """For each key to store: ALREADY_HELD, or a buffer to fill and put(); the list
        ends early where memory ran out."""
        out: list = []
        for key, shape in zip(keys, shapes):
            if self.contains_local(key):
                out.append(ALREADY_HELD)
                continue
            obj = self.allocate(shape, dtype, fmt)
            if obj is None:
                break
            out.append(obj)
        return out

    # -- lookup -------------------------------------------------------------
    def contains_local(self, key: CacheEngineKey) -> bool:
        """In the CPU tier, or on the local disk (no network round trip)."""
        return self.in_host_memory(key) or (self.disk is not None and self.disk.contains(key))

    def pins(self) -> dict[str, int]:
        """Host chunks held by readers now: in the CPU tier, and outside any tier (read from
        disk/remote with no room to promote them). Both are 0 when nothing is in flight."""
        with self._lock:
            transient = len(self._transient)
        return {"cpu_tier": self.cpu.pinned_count() if self.cpu is not None else 0, "transient": transient}

    def in_host_memory(self, key: CacheEngineKey) -> bool:
        return self.cpu is not None and self.cpu.contains(key)

    def host_prefix(self, keys: list[CacheEngineKey]) -> int:
        """How many of `keys`, from the first, are in host memory (the CPU tier)."""
        return self.cpu.prefix_count(keys) if self.cpu is not None else 0

    def lookup_prefix(self, keys: list[CacheEngineKey]) -> int:
        """How many of `keys`, from the first, some tier holds. No side effects on
        what is cached (a scheduler may ask again and again)."""
        n, total = 0, len(keys)
        if self.cpu is not None:  # the common case, a run of CPU hits, in one tight loop
            n = self.cpu.prefix_count(keys)
        while n < total:
            if self.contains_local(keys[n]):
                n += 1
                continue
            if self.remote is None:
                break
            found = self.remote.prefix_count(keys[n:])
            if found == 0:
                break
            n += found
        return n

    # -- load ---------------------------------------------------------------
    def get(self, key: CacheEngineKey) -> MemoryObj | None:
        """The chunk in host memory with a reader reference (give it back with
        release()), or None if no tier has it (the cause is counted)."""
        if self.cpu is not None:
            obj = self.cpu.get(key)
            if obj is not None and obj.stored_key != key:
                logger.warning("host tier: the object under %s was stored under %s: refused and removed",
                               key.to_string(), obj.stored_key)
                self.stats.miss("refused", tier=self.cpu.name)
                self.discard(key, host_only=True)  # the slower tiers' copies name their key themselves
                self.release(obj)
                obj = None
            if obj is not None:
                self.stats.tier_hit(self.cpu.name, obj.num_tokens)
                return obj
        counted = False  # tiers that were asked count their own miss cause
        for tier in (self.disk, self.remote):
            if tier is None or (tier is self.disk and not tier.contains(key)):
                continue
            obj = tier.get(key, self.allocate)
            if obj is not None:
                self.stats.tier_hit(tier.name, obj.num_tokens)
                return self._promote(key, obj)
            counted = True
        if not counted:
            self.stats.miss("absent")
        return None

    def get_many(self, keys: list[CacheEngineKey]) -> list[MemoryObj]:
        """get() of each key, from the first, up to the first that no tier has: the
        prefix, each with a reader reference. The chunks only the remote tier holds are
        asked of it in one call (one pipelined round trip per node, or parallel requests)."""
        ahead: dict[CacheEngineKey, MemoryObj | None] = {}
        if self.remote is not None:
            far = [key for key in keys if not self.contains_local(key)]
            if len(far) > 1:
                ahead = dict(zip(far, self.remote.get_many(far, self.allocate)))
        out: list[MemoryObj] = []
        try:
            for key in keys:
                if key in ahead:
                    obj = ahead.pop(key)  # None: its miss was counted by the tier
                    if obj is not None:
                        self.stats.tier_hit(self.remote.name, obj.num_tokens)
                        obj = self._promote(key, obj)
                else:
                    obj = self.get(key)
                if obj is None:
                    break
                out.append(obj)
        finally:
            for unused in ahead.values():  # read after a miss: nobody takes them
                if unused is not None:
                    unused.free()
        return out

    def get_many_in_background(self, keys: list[CacheEngineKey]) -> list[MemoryObj]:
        """get_many for a background reader (the lease prefetch): the same here."""
        return self.get_many(keys)

    def _promote(self, key: CacheEngineKey, obj: MemoryObj) -> MemoryObj:
        obj.stored_key = key
        obj.ref_count_up()
        if self.cpu is None or not self.cpu.put(key, obj):
            with self._lock:
                self._transient.add(id(obj))
        return obj

    def release(self, obj: MemoryObj) -> None:
        obj.ref_count_down()
        with self._lock:
            transient = id(obj) in self._transient
            if transient and not obj.in_use:
                self._transient.discard(id(obj))
            else:
                transient = False
        if transient:
            obj.free()

    def discard(self, key: CacheEngineKey, host_only: bool = False) -> None:
        """Remove `key` from every tier (a chunk that was refused), so lookups stop
        reporting it. A host object still held by readers (e.g. the caller, who read
        it) is freed when its last reader releases it."""
        held = self.cpu.detach(key) if self.cpu is not None else None
        if held is not None:
            with self._lock:
                if held.in_use:
                    self._transient.add(id(held))
                    held = None
            if held is not None:
                held.free()
        if host_only:
            return
        for tier in (self.disk, self.remote):
            if tier is not None:
                try:
                    tier.remove(key)
                except Exception as exc:  # noqa: BLE001 - removal is best effort; a tier fault is a log line
                    logger.warning("%s tier: cannot remove refused chunk %s: %s", tier.name, key.to_string(), exc)

    # -- store --------------------------------------------------------------
    def put(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        """Store a filled chunk in every tier; the manager now owns `obj`."""
        self.put_many([key], [obj])

    def put_many(self, keys: list[CacheEngineKey], objs: list[MemoryObj]) -> None:
        """Store a step's filled chunks in every tier: the slower tiers get them together
        (the remote tier pipelines them per node); the manager now owns every object."""
        items, in_cpu = [], []
        for key, obj in zip(keys, objs):
            obj.stored_key = key
            if self.writer is None:
                if self.cpu is None or not self.cpu.put(key, obj):
                    obj.free()
                continue
            obj.ref_count_up()  # before the CPU tier may see it: it must not be evicted while queued
            in_cpu.append(self.cpu is not None and self.cpu.put(key, obj))
            items.append((key, obj, self.release if in_cpu[-1] else self._written_and_free))
        if not items:
            return
        taken = self.writer.submit_many(items)
        for (_, obj, _), kept in zip(items[taken:], in_cpu[taken:]):
            self.release(obj)
            if not kept:
                obj.free()

    @staticmethod
    def _written_and_free(obj: MemoryObj) -> None:
        obj.ref_count_down()
        obj.free()

    def sync_events(self) -> None:
        """Nothing to do: the tiers here tell the observers as they go (ServerStorage's asks its server)."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued disk/remote writes are done; False on timeout."""
        return True if self.writer is None else self.writer.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self.writer is not None:
            self.writer.close(timeout)
        if self.remote is not None:
            self.remote.close()
        if self.cpu is not None:
            self.cpu.clear()
        self.pool.clear_idle()
