"""LMCacheEngine: lookup / store / retrieve of KV chunks, and `LMCacheEngineBuilder`,
which keeps one engine per name in the process (vLLM's integration uses ENGINE_NAME;
its examples call `LMCacheEngineBuilder.destroy`).

Units. `lookup` answers a position: the end of the cached prefix, from token 0.
`batched_store` and `batched_retrieve` both answer, per request, a count: the tokens
that call moved, never counting the `skip_tokens` prefix vLLM already holds. A caller
that wants the end of the prefix now valid after a retrieve adds `skip_tokens` once.

The engine knows tokens, keys and tiers; it does not know device layouts. Moving
KV between the paged cache and host memory objects is the GPU connector's job
(lmcache.v1.gpu_connector, contract in docs/architecture.md): the engine makes
ONE batched connector call per step, for all chunks of all requests.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Generator, Sequence

import torch

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.engine_types import LMCacheEngineMetadata, TransferSpec
from lmcache.v1.leases import LeaseTable
from lmcache.v1.memory import MemoryObj
from lmcache.v1.mp.storage_choice import build_storage
from lmcache.v1.storage_backend.stats import MISS_CAUSES, EngineStats
from lmcache.v1.storage_backend.storage_manager import ALREADY_HELD
from lmcache.v1.token_database import CacheEngineKey, ChunkedTokenDatabase, mask_skip

logger = logging.getLogger(__name__)

__all__ = [
    "EngineStats",
    "LMCacheEngine",
    "LMCacheEngineBuilder",
    "LMCacheEngineMetadata",
    "MISS_CAUSES",
    "TransferSpec",
]


@dataclass
class _Planned:
    key: CacheEngineKey
    obj: MemoryObj
    start: int  # in the concatenated slot mapping
    end: int
    spec: int  # index of the request


class LMCacheEngine:
    def __init__(self, config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata, gpu_connector=None):
        self.config = config
        self.metadata = metadata
        self.stats = EngineStats()
        self.token_db = ChunkedTokenDatabase(
            config.chunk_size, metadata, save_unfull_chunk=config.save_unfull_chunk, namespace=config.cache_namespace
        )
        self.storage = build_storage(config, self.stats, self.token_db.owns)  # here, or the node's lmcache server
        self.leases = LeaseTable(self.storage.get, self.storage.release, config.lookup_lease_ttl,
                                 get_many=self.storage.get_many, prefetch_get_many=self.storage.get_many_in_background)
        self.gpu_connector = None
        if gpu_connector is not None:
            self.set_gpu_connector(gpu_connector)
        self._closed = False

    def set_gpu_connector(self, gpu_connector) -> None:
        """Attach the connector (a scheduler-side engine has none: lookups only)."""
        expected = self.metadata.memory_shape(self.config.chunk_size)
        got = torch.Size(gpu_connector.get_shape(self.config.chunk_size))
        if got != expected or gpu_connector.kv_dtype != self.metadata.kv_dtype:
            raise ValueError(
                f"GPU connector gives memory objects of shape {tuple(got)} and dtype {gpu_connector.kv_dtype} "
                f"for {self.config.chunk_size} tokens, but the engine metadata (kv_shape={tuple(self.metadata.kv_shape)}, "
                f"use_mla={self.metadata.use_mla}, kv_dtype={self.metadata.kv_dtype}) implies {tuple(expected)} "
                f"and {self.metadata.kv_dtype}: the keys would not describe the data"
            )
        self.gpu_connector = gpu_connector

    def _connector(self):
        if self.gpu_connector is None:
            raise RuntimeError("this engine has no GPU connector (built for lookups only): store/retrieve need one")
        return self.gpu_connector

    # -- lookup -------------------------------------------------------------
    def lookup(self, tokens, *, lease_id: str | None = None, hold_from: int = 0, prefetch: bool = False,
               key_material: Sequence[bytes | None] | None = None) -> int:
        """How many tokens, from the first, the cache holds (chunk granularity).
        With `lease_id`: what could be held for that lease (lmcache.v1.leases);
        chunks ending by the chunk-aligned `hold_from` (the caller's own) are only checked.
        With `prefetch` too: chunks not in host memory are read in the background (the
        retrieve naming the lease waits for them) instead of before answering.
        `key_material`: per chunk, what besides the tokens names its KV (token_database)."""
        chunks = self.token_db.chunks(tokens, key_material=key_material)
        keys = [c.key for c in chunks]
        found = self.storage.lookup_prefix(keys)
        if lease_id is not None:
            aligned = max(0, int(hold_from)) // self.config.chunk_size * self.config.chunk_size
            unheld = sum(1 for c in chunks[:found] if c.end <= aligned)
            usable = lambda i, obj: self._usable(chunks[unheld + i], obj)  # noqa: E731
            # chunks outside host memory (this process's or the server's) are the prefetch thread's
            resident_prefix = self.storage.host_prefix if prefetch else None
            found = unheld + self.leases.acquire(lease_id, keys[unheld:found], usable, resident_prefix)
        hit = chunks[found - 1].end if found else 0
        self.stats.add(lookups=1, lookup_tokens=len(tokens), hit_tokens=hit)
        return hit

    def release_lease(self, lease_id: str) -> bool:
        """End a lookup lease (the request went away); unknown ids are ignored."""
        return self.leases.release(lease_id)

    # -- store --------------------------------------------------------------
    def store(self, tokens, mask: torch.Tensor | None = None, *, slot_mapping: torch.Tensor, **kwargs) -> int:
        """Store the chunks of `tokens` (those `mask` does not skip); returns the
        number of tokens newly stored."""
        skip = mask_skip(mask, len(tokens), self.config.chunk_size)
        return self.batched_store([TransferSpec(tokens, slot_mapping, skip)])[0]

    def batched_store(self, specs: Sequence[TransferSpec]) -> list[int]:
        """Store every request of a step with one connector call; per request the
        number of tokens newly stored (chunks already cached are not moved again)."""
        plan, slot_mapping = self._plan_store(specs)
        if plan:
            try:
                self._connector().batched_from_gpu(
                    [p.obj for p in plan], [p.start for p in plan], [p.end for p in plan], slot_mapping=slot_mapping
                )
            except BaseException:
                for p in plan:
                    p.obj.free()
                raise
        return self._commit_store(plan, len(specs))

    def _plan_store(self, specs: Sequence[TransferSpec]) -> tuple[list[_Planned], torch.Tensor | None]:
        connector = self._connector()
        wanted: list[tuple[int, object, int]] = []  # (request, chunk, offset of its slot mapping)
        slot_parts = []
        offset = 0
        seen: set[CacheEngineKey] = set()
        for index, spec in enumerate(specs):
            num_tokens, skip = self._check_spec(spec)
            for chunk in self.token_db.chunks(spec.tokens, num_tokens, spec.key_material):
                if chunk.end > skip and chunk.key not in seen:
                    seen.add(chunk.key)
                    wanted.append((index, chunk, offset))
            slot_parts.append(spec.slot_mapping[:num_tokens])
            offset += num_tokens
        # One call for the whole step (one round trip where the host tier is a server):
        # which chunks are cached already, and a buffer for each of the others.
        objs = self.storage.reserve([c.key for _, c, _ in wanted],
                                    [connector.get_shape(c.end - c.start) for _, c, _ in wanted],
                                    connector.kv_dtype, connector.memory_format) if wanted else []
        plan: list[_Planned] = []
        for i, (index, chunk, base) in enumerate(wanted):
            obj = objs[i] if i < len(objs) else None
            if obj is ALREADY_HELD:
                continue
            if obj is None:  # out of memory: this and the rest of the step are not stored
                self.stats.miss("dropped")
                for rest in objs[i + 1:]:
                    if rest is not None and rest is not ALREADY_HELD:
                        rest.free()
                break
            plan.append(_Planned(chunk.key, obj, base + chunk.start, base + chunk.end, index))
        if not plan:
            return plan, None
        return plan, slot_parts[0] if len(slot_parts) == 1 else torch.cat(slot_parts)

    def _commit_store(self, plan: list[_Planned], num_specs: int) -> list[int]:
        stored = [0] * num_specs
        nbytes = 0
        for p in plan:
            n = p.end - p.start
            stored[p.spec] += n
            nbytes += p.obj.nbytes
        if plan:
            self.storage.put_many([p.key for p in plan], [p.obj for p in plan])  # the tiers write them together
            self.stats.add(stored_chunks=len(plan), stored_tokens=sum(stored), stored_bytes=nbytes)
        return stored

    def _check_spec(self, spec: TransferSpec) -> tuple[int, int]:
        total = len(spec.tokens)
        num_tokens = total if spec.num_tokens is None else spec.num_tokens
        if not 0 <= num_tokens <= total:
            raise ValueError(f"num_tokens={spec.num_tokens} is outside 0..{total} (the number of tokens given)")
        if len(spec.slot_mapping) < num_tokens:
            raise ValueError(
                f"slot_mapping has {len(spec.slot_mapping)} entries for {num_tokens} tokens; it needs one per token"
            )
        skip = spec.skip_tokens
        if skip < 0 or (skip % self.config.chunk_size and skip < num_tokens):
            raise ValueError(
                f"skip_tokens={skip} must be >= 0 and a multiple of chunk_size={self.config.chunk_size}"
            )
        return num_tokens, skip

    # -- retrieve -----------------------------------------------------------
    def retrieve(self, tokens, mask: torch.Tensor | None = None, *, slot_mapping: torch.Tensor, **kwargs) -> torch.Tensor:
        """Load the cached prefix of `tokens` (after the part `mask` skips) into
        the paged cache; returns a bool mask of the tokens loaded."""
        skip = mask_skip(mask, len(tokens), self.config.chunk_size)
        loaded = self.batched_retrieve([TransferSpec(tokens, slot_mapping, skip)])[0]
        return self._loaded_mask(len(tokens), skip, loaded)

    @staticmethod
    def _loaded_mask(num_tokens: int, skip: int, loaded: int) -> torch.Tensor:
        mask = torch.zeros(num_tokens, dtype=torch.bool)
        mask[skip : skip + loaded] = True
        return mask

    def batched_retrieve(self, specs: Sequence[TransferSpec]) -> list[int]:
        """Load every request of a step with one connector call. Per request: the
        number of tokens loaded after its skip_tokens (the unit batched_store answers
        in), so [skip_tokens, skip_tokens + loaded) is now in the paged cache. A
        missing or bad chunk ends the request's load: chunks after a gap would be useless."""
        plan, slot_mapping, loaded = self._plan_retrieve(specs)
        try:
            if plan:
                self._connector().batched_to_gpu(
                    [p.obj for p in plan], [p.start for p in plan], [p.end for p in plan], slot_mapping=slot_mapping
                )
        finally:
            for p in plan:
                self.storage.release(p.obj)
        self._count_loaded(plan, loaded)
        return loaded

    def _plan_retrieve(self, specs: Sequence[TransferSpec]) -> tuple[list[_Planned], torch.Tensor | None, list[int]]:
        connector = self._connector()
        plan: list[_Planned] = []
        loaded = [0] * len(specs)
        slot_parts = []
        offset = 0
        self.leases.wait_all(spec.lease_id for spec in specs)  # prefetching lookups' chunks
        try:
            for index, spec in enumerate(specs):
                num_tokens, skip = self._check_spec(spec)
                chunks = [c for c in self.token_db.chunks(spec.tokens, num_tokens, spec.key_material) if c.end > skip]
                objs = self._fetch(chunks)
                for i, (chunk, obj) in enumerate(zip(chunks, objs)):
                    if not self._usable(chunk, obj, connector):
                        for unused in objs[i:]:
                            self.storage.release(unused)
                        break
                    plan.append(_Planned(chunk.key, obj, offset + chunk.start, offset + chunk.end, index))
                    loaded[index] += chunk.end - chunk.start
                slot_parts.append(spec.slot_mapping[:num_tokens])
                offset += num_tokens
        except BaseException:
            for p in plan:
                self.storage.release(p.obj)
            raise
        finally:
            self._end_leases(specs)  # the plan holds its own references
        if not plan:
            return plan, None, loaded
        return plan, slot_parts[0] if len(slot_parts) == 1 else torch.cat(slot_parts), loaded

    def _fetch(self, chunks: list) -> list[MemoryObj]:
        """The leased objects of `chunks`' prefix, then the rest read with one get_many (one
        pipelined round trip per remote node), up to the first miss."""
        got = list(itertools.takewhile(lambda obj: obj is not None, (self.leases.take(c.key) for c in chunks)))
        return got + self.storage.get_many([c.key for c in chunks[len(got):]]) if len(got) < len(chunks) else got

    def _usable(self, chunk, obj: MemoryObj, connector=None) -> bool:
        """The chunk has the shape and dtype the connector (or the metadata) expects.
        One that does not is refused: counted, and removed from every tier (the caller
        still releases `obj`), so lookups stop reporting it."""
        n = chunk.end - chunk.start
        expected = torch.Size(connector.get_shape(n)) if connector else self.metadata.memory_shape(n)
        dtype = connector.kv_dtype if connector else self.metadata.kv_dtype
        if obj.metadata.shape == expected and obj.metadata.dtype == dtype:
            return True
        logger.warning("chunk %s holds %s %s, expected %s %s: refused and removed from every tier",
                       chunk.key.to_string(), tuple(obj.metadata.shape), obj.metadata.dtype, tuple(expected), dtype)
        self.stats.miss("refused")
        self.storage.discard(chunk.key)
        return False

    def _end_leases(self, specs: Sequence[TransferSpec]) -> None:
        for spec in specs:
            if spec.lease_id is not None:
                self.leases.release(spec.lease_id)

    def _count_loaded(self, plan: list[_Planned], loaded: list[int]) -> None:
        if plan:
            self.stats.add(
                loaded_chunks=len(plan), loaded_tokens=sum(loaded), loaded_bytes=sum(p.obj.nbytes for p in plan)
            )

    # -- layerwise ------------------------------------------------------------
    def store_layer(self, tokens, mask: torch.Tensor | None = None, *, slot_mapping: torch.Tensor,
                    key_material: Sequence[bytes | None] | None = None, **kwargs) -> Generator:
        """Layer-by-layer store. next() number i (i = 1..num_layers) saves layer
        i-1 (call it after that layer is computed); next() number num_layers+1
        finishes (waits for the copies, hands the chunks to the tiers) and yields
        the number of tokens stored."""
        skip = mask_skip(mask, len(tokens), self.config.chunk_size)
        num_layers = self.metadata.kv_shape[0]
        plan, slot_mapping = self._plan_store([TransferSpec(tokens, slot_mapping, skip, key_material=key_material)])
        committed = False
        try:
            steps = None
            if plan:
                steps = self._connector().batched_from_gpu_layerwise(
                    [p.obj for p in plan], [p.start for p in plan], [p.end for p in plan], slot_mapping=slot_mapping
                )
            yield from _drive_layers(steps, num_layers)
            stored = self._commit_store(plan, 1)[0]
            committed = True
        finally:
            if not committed:
                for p in plan:
                    p.obj.free()
        yield stored

    def retrieve_layer(self, tokens, mask: torch.Tensor | None = None, *, slot_mapping: torch.Tensor,
                       lease_id: str | None = None, key_material: Sequence[bytes | None] | None = None,
                       **kwargs) -> Generator:
        """Layer-by-layer load. next() number i (i = 1..num_layers) loads layer
        i-1 (the first also fetches the chunks from the tiers); next() number
        num_layers+1 waits for the copies and yields the bool mask of loaded tokens."""
        skip = mask_skip(mask, len(tokens), self.config.chunk_size)
        num_layers = self.metadata.kv_shape[0]
        spec = TransferSpec(tokens, slot_mapping, skip, lease_id=lease_id, key_material=key_material)
        plan, slot_mapping, loaded = self._plan_retrieve([spec])
        try:
            steps = None
            if plan:
                steps = self._connector().batched_to_gpu_layerwise(
                    [p.obj for p in plan], [p.start for p in plan], [p.end for p in plan], slot_mapping=slot_mapping
                )
            yield from _drive_layers(steps, num_layers)
        finally:
            for p in plan:
                self.storage.release(p.obj)
        self._count_loaded(plan, loaded)
        yield self._loaded_mask(len(tokens), skip, loaded[0])

    # -- lifetime -------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until stores queued for the disk/remote tiers are written."""
        return self.storage.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued writes (up to `timeout` s), stop the writer thread, free memory."""
        if self._closed:
            return
        self._closed = True
        self.leases.release_all()
        self.storage.close(timeout)


def _drive_layers(steps: Generator | None, num_layers: int) -> Generator:
    """Yield once per layer, advancing the connector's layerwise generator (if any)
    by one layer each time, then run its final step (the synchronize)."""
    for _ in range(num_layers):
        if steps is not None:
            next(steps)
        yield None
    if steps is not None:
        next(steps, None)


# The builder lives in its own module; this is the name vLLM's examples import.


class LMCacheEngineBuilder:
    """One engine per name in the process (vLLM uses ENGINE_NAME)."""

    _engines: dict[str, LMCacheEngine] = {}
    _lock = threading.Lock()

    @classmethod
    def get_or_create(cls, instance_id: str, config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata,
                      gpu_connector=None) -> LMCacheEngine:
        with cls._lock:
            engine = cls._engines.get(instance_id)
            if engine is None:
                engine = cls._engines[instance_id] = LMCacheEngine(config, metadata, gpu_connector)
            elif gpu_connector is not None and engine.gpu_connector is None:
                engine.set_gpu_connector(gpu_connector)
            return engine

    @classmethod
    def get(cls, instance_id: str) -> LMCacheEngine | None:
        with cls._lock:
            return cls._engines.get(instance_id)

    @classmethod
    def destroy(cls, instance_id: str) -> None:
        with cls._lock:
            engine = cls._engines.pop(instance_id, None)
        if engine is not None:
            engine.close()
