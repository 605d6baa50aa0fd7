"""The worker half of `LMCacheConnectorV1Impl` (one vLLM worker process per rank).

Each worker owns an LMCacheEngine over its own KV shard and answers the scheduler's
lookups on a local socket (lookup_channel). A step moves everything with one batched
retrieve (`start_load_kv`; loads vLLM parked run off the step, worker_loads.py) and
one batched store (`wait_for_save`, worker_saves.py). The engine is safe to use from
several threads (its tiers and leases lock themselves), so lookups, loads and
background saves do not wait for each other (re-registration waits for them first).
A lookup holds what it counted for the request's load (lmcache.v1.leases), so a load
is short only on a fault: on CUDA/CPU the positions vLLM was promised but did not get
become load errors (vLLM recomputes them); on Gaudi, whose runner never reads load
errors, a short load stops the step with LoadIncompleteError instead of letting the
request compute on KV that is not there (docs/gaudi.md).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

from lmcache.integration.vllm.connector_metadata import LMCacheConnectorMetadata
from lmcache.integration.vllm.gaudi_checks import refuse_online_defragmenter
from lmcache.integration.vllm.kv_events import kv_events_enabled
from lmcache.integration.vllm.lookup_channel import LookupServer, socket_address
from lmcache.integration.vllm.request_tracker import ReqMeta
from lmcache.integration.vllm.utils import (
    ENGINE_NAME,
    attention_backend_name,
    mla_enabled,
    parallel_rank_and_size,
    truthy,
)
from lmcache.integration.vllm.worker_layerwise import WorkerLayerwise
from lmcache.integration.vllm.worker_loads import WorkerLoads
from lmcache.integration.vllm.worker_metrics import WorkerMetrics, clip_runs, hit_runs
from lmcache.integration.vllm.worker_saves import WorkerSaves

logger = logging.getLogger(__name__)

# Test hooks (corrupting loaded KV on purpose) answer only in processes started
# with this variable set; see tests/e2e/.
TEST_HOOKS_ENV = "LMCACHE_TEST_HOOKS"
# With test hooks on: loads are corrupted while the file this names exists (for
# processes the tests cannot reach through the lookup socket, e.g. `vllm serve`).
CORRUPT_FILE_ENV = "LMCACHE_TEST_CORRUPT_FILE"


class LoadIncompleteError(RuntimeError):
    """A load came up short on a runner that never reads load errors (vllm-gaudi):
    going on would let the request compute on KV that is not in its blocks."""


class WorkerCounters:
    """What this worker moved (the demo and the tests read these)."""

    def __init__(self):
        self.load_requests = 0
        self.loaded_tokens = 0
        self.load_failed_tokens = 0
        self.save_requests = 0
        self.saved_tokens = 0
        self.save_failures = 0
        self.held_requests_released = 0  # async saving: finished requests whose blocks we held
        self.async_loads = 0  # loads run off the step (vLLM parked their requests)

    def to_dict(self) -> dict:
        return dict(vars(self))


class WorkerSide(WorkerSaves, WorkerLayerwise, WorkerLoads):
    """Mixin of LMCacheConnectorV1Impl: everything vLLM calls in a worker process."""

    def _init_worker(self, vllm_config) -> None:
        self.engine = None
        self.gpu_connector = None
        self._rank, self._world_size = parallel_rank_and_size(vllm_config)
        self._metadata: LMCacheConnectorMetadata | None = None
        self._step_metadata: LMCacheConnectorMetadata | None = None  # the step _begin_step ran for
        self._load_errors: set[int] = set()
        self._kv_caches: dict[str, Any] | None = None  # what vLLM registered (None while asleep)
        self._kv_asleep: dict[str, Any] | None = None  # weak references to it while asleep
        self._engine_lock = threading.RLock()
        self._lookup_server: LookupServer | None = None
        self._runner_reads_load_errors = True  # vllm-gaudi never calls get_block_ids_with_load_errors
        self._exit_hook_registered = False
        self.counters = WorkerCounters()
        self.worker_metrics = WorkerMetrics(self._rank, collect_events=kv_events_enabled(vllm_config))
        self._observed_engine = None
        self._test_hooks_allowed = truthy(os.environ.get(TEST_HOOKS_ENV, ""))
        self._corrupt_loads = False
        self._init_layerwise()
        self._init_saves()
        self._init_loads()

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        from lmcache.platforms import current_platform
        from lmcache.v1.cache_engine import LMCacheEngineBuilder
        from lmcache.v1.gpu_connector import create_gpu_connector

        layer_names = list(kv_caches)
        first = kv_caches[layer_names[0]]
        device_type = (first[0] if isinstance(first, (tuple, list)) else first).device.type
        if self.use_layerwise and device_type == "hpu":
            raise ValueError(
                "LMCache use_layerwise=True cannot work on Gaudi: vllm-gaudi never calls the "
                "per-layer hooks. Accepted there: use_layerwise=False (the default)."
            )
        if device_type == "hpu":
            refuse_online_defragmenter(self._vllm_config, os.environ)
        self._runner_reads_load_errors = device_type != "hpu"
        reregistering = self.engine is not None
        if reregistering:
            # Sleep / wake-up: vLLM hands over new tensors and frees the old ones, which
            # queued async saves and loads would still touch.
            self._wait_saves()
            self._wait_loads()
        backend = attention_backend_name(self._vllm_config, layer_names)
        self._kv_caches, self._kv_asleep = dict(kv_caches), None
        with self._engine_lock:
            self.gpu_connector = create_gpu_connector(
                kv_caches, use_layerwise=self.use_layerwise, attn_backend=backend, platform=current_platform(),
                native_blocks=self.config.cpu_native_blocks, use_mla=mla_enabled(self._vllm_config.model_config),
                slot_buckets=self.config.hpu_slot_buckets,
            )
            metadata = self._engine_metadata()
            engine = LMCacheEngineBuilder.get_or_create(ENGINE_NAME, self.config, metadata, self.gpu_connector)
            if engine.gpu_connector is not self.gpu_connector:
                if engine.metadata != metadata:
                    raise ValueError(
                        f"LMCache: the KV caches registered again describe {metadata}, but engine "
                        f"{ENGINE_NAME!r} was built for {engine.metadata}: its keys would not describe the data"
                    )
                engine.set_gpu_connector(self.gpu_connector)  # the old tensors are gone
            self.engine = engine
            self._layer_index = {name: i for i, name in enumerate(layer_names)}
        if self.worker_metrics.collect_events and self._observed_engine is not self.engine:
            self.engine.stats.add_observer(self.worker_metrics.observe_chunk)
            self._observed_engine = self.engine
        self._start_save_pool()
        if self._lookup_server is None:  # one per worker, also across re-registrations
            self._lookup_server = LookupServer(
                socket_address(self._engine_id, self._rank), self._lookup_with_sources, self.stats, self._control,
                lambda: self.worker_metrics.reply(self.counters, self.engine),
            ).start()
        if not self._exit_hook_registered:
            # vLLM's wrapper never forwards shutdown: finish queued disk/remote writes at exit.
            atexit.register(self.shutdown)
            self._exit_hook_registered = True
        if reregistering:
            logger.info("LMCache worker %d: KV caches registered again; loads and saves use the new tensors",
                        self._rank)
        logger.info(
            "LMCache worker %d/%d ready: %d layers, backend %s, layout %s, chunk %d, block %d, objects %s%s",
            self._rank, self._world_size, len(layer_names), backend, self.gpu_connector.layout_fingerprint,
            self.config.chunk_size, self.block_size, self.gpu_connector.host_format_tag or "portable",
            ", async save" if self.async_save else "",
        )

    def _engine_metadata(self):
        from lmcache.integration.vllm.model_identity import model_identity
        from lmcache.v1.cache_engine import LMCacheEngineMetadata

        model_config = self._vllm_config.model_config
        parallel_config = self._vllm_config.parallel_config
        use_mla = mla_enabled(model_config)
        return LMCacheEngineMetadata(
            model_name=str(model_config.model),
            world_size=self._world_size,
            worker_id=self._rank,
            kv_dtype=self.gpu_connector.kv_dtype,
            kv_shape=(
                self.gpu_connector.num_layers,
                1 if use_mla else 2,
                self.config.chunk_size,
                model_config.get_num_kv_heads(parallel_config),
                model_config.get_head_size(),
            ),
            use_mla=use_mla,
            # Portable memory objects hold K/V in plain per-token order whatever the paged
            # layout, so the device layout stays out of the keys: CUDA, Gaudi and CPU
            # instances of the same model share one disk directory or Redis server. Native
            # CPU blocks (cpu_native_blocks) are vLLM's tiled bytes: their tag keys them apart.
            layout_fingerprint=self.gpu_connector.host_format_tag,
            model_identity=model_identity(self._vllm_config),  # revision, weights, quantization, ...
        )

    # -- sleep mode (vLLM 0.33+; 0.34 also around weight updates) ----------------
    def unregister_kv_caches(self) -> None:
        """vLLM is about to release the KV cache's memory. Queued saves finish first
        (they read blocks that are still valid now); parked loads are stopped, or awaited
        if already running, and reported at the next step as done with every position a
        load error (their blocks lose their contents: vLLM recomputes them); then no
        reference to a device tensor is left (weak ones, to take them back on wake-up).
        Idempotent."""
        if self._kv_asleep is not None or self._kv_caches is None:
            return
        self._wait_saves()
        self._abandon_async_loads()
        with self._engine_lock:
            self._kv_asleep = {name: _weak(kv) for name, kv in self._kv_caches.items()}
            self._kv_caches = None
            self._reset_layerwise_step()
            self.gpu_connector = None
            if self.engine is not None:
                self.engine.gpu_connector = None  # store/retrieve refuse until restore
        logger.info("LMCache worker %d: KV caches unregistered (sleep mode): saves finished, parked loads "
                    "stopped, no device tensor held", self._rank)

    def restore_kv_caches(self) -> None:
        """vLLM woke up: take the KV cache tensors back (the same tensors, their memory
        mapped again) through the re-registration path. Idempotent."""
        asleep = self._kv_asleep
        if asleep is None:
            return
        caches = {name: _resolve(ref) for name, ref in asleep.items()}
        gone = [name for name, kv in caches.items() if kv is None]
        if gone:
            logger.warning("LMCache worker %d: vLLM woke up with new KV cache tensors it did not hand over "
                           "(%d layers); LMCache stays off until register_kv_caches", self._rank, len(gone))
            return
        self.register_kv_caches(caches)

    # -- the lookup server's handlers (background thread) ----------------------
    def _lookup(self, tokens, lease_id: str | None = None, hold_from: int = 0, prefetch: bool = False,
                key_material=None) -> int:
        return self._lookup_with_sources(tokens, lease_id, hold_from, prefetch, key_material)[0]

    def _lookup_with_sources(self, tokens, lease_id: str | None = None, hold_from: int = 0,
                             prefetch: bool = False, key_material=None) -> tuple[int, list | None]:
        """The hit, and which tier holds which part of it (worker_metrics.hit_runs)."""
        engine = self.engine
        if engine is None:
            return 0, None
        # A lease reads disk/remote chunks into host memory: say where they were found.
        found_in = hit_runs(engine, tokens, len(tokens), key_material) if lease_id is not None else None
        hit = int(engine.lookup(tokens, lease_id=lease_id, hold_from=hold_from, prefetch=prefetch,
                                key_material=key_material))
        if not hit:
            return 0, None
        return hit, (clip_runs(found_in, hit) if lease_id is not None else hit_runs(engine, tokens, hit, key_material))

    def stats(self) -> dict:
        out = {"rank": self._rank, "world_size": self._world_size, "layerwise": self.use_layerwise,
               "async_save": self._save_pool is not None, "async_load": self.async_load,
               "adapter": self.counters.to_dict(),
               "host_format": getattr(self.gpu_connector, "host_format_tag", "") or "portable",
               "host_tier_gb": self.config.max_local_cpu_size if self.config.local_cpu else 0.0}
        leases = getattr(self.engine, "leases", None)
        if leases is not None:
            out["leases"] = {"active": len(leases), "held_chunks": leases.held_chunks, "expired": leases.expired,
                             "prefetched": leases.prefetched, "prefetch_stopped": leases.prefetch_stopped}
        storage = getattr(self.engine, "storage", None)
        if storage is not None and hasattr(storage, "pins"):
            out["host_pins"] = storage.pins()
        if getattr(storage, "cpu", None) is not None:  # bytes of chunks in this process's host tier
            out["host_tier_used_bytes"] = storage.cpu.used_bytes
        engine_stats = getattr(self.engine, "stats", None)
        if engine_stats is not None:
            if is_dataclass(engine_stats):
                out["engine"] = asdict(engine_stats)
            elif hasattr(engine_stats, "to_dict"):
                out["engine"] = engine_stats.to_dict()
            else:
                out["engine"] = dict(vars(engine_stats))
        return out

    def _control(self, command: dict) -> dict:
        answer: dict = {}
        if "flush" in command:
            # Wait for this worker's queued disk/remote writes (a second process may
            # be about to read them).
            self._wait_saves()
            with self._engine_lock:
                answer["flushed"] = bool(self.engine.flush(float(command["flush"]))) if self.engine else True
        if "corrupt_loads" in command:
            if not self._test_hooks_allowed:
                raise PermissionError(f"test hooks are off in this process (set {TEST_HOOKS_ENV}=1 to allow them)")
            self._corrupt_loads = bool(command["corrupt_loads"])
            answer["corrupt_loads"] = self._corrupt_loads
        return answer

    # -- each step ----------------------------------------------------------------
    def bind_connector_metadata(self, metadata: LMCacheConnectorMetadata) -> None:
        self._metadata = metadata
        self._begin_step(metadata)

    def _begin_step(self, metadata) -> None:
        """What each step's metadata brings, once per step: lookup leases the scheduler
        released, and the per-step resets. Run by bind_connector_metadata, or, where vLLM's
        LMCacheConnectorV1 wrapper does not forward that hook (vLLM 0.26 to 0.28,
        vllm_compat "wrapper_binds_metadata"), by the first hook that reads the step's
        metadata from the wrapper (`_bound`; start_load_kv runs every step), so that no
        chunk stays pinned past the step that releases it on any vLLM."""
        self._step_metadata = metadata
        self._reset_layerwise_step()
        # Load errors belong to the step that made them: the runner reads them after that
        # step's loads or never (vllm-gaudi); a later step must not report them against
        # blocks that may by then belong to other requests.
        self._load_errors = set()
        released = getattr(metadata, "released_lease_ids", None)
        if released and self.engine is not None:
            with self._engine_lock:
                for lease_id in released:
                    self.engine.release_lease(lease_id)

    def clear_connector_metadata(self) -> None:
        self._metadata = None

    def _bound(self) -> LMCacheConnectorMetadata | None:
        md = self._metadata
        if md is None and self._parent is not None and hasattr(self._parent, "_get_connector_metadata"):
            try:
                md = self._parent._get_connector_metadata()
            except AssertionError:
                md = None
        if not isinstance(md, LMCacheConnectorMetadata):
            return None
        if md is not self._step_metadata:  # bound by a wrapper that did not tell us
            self._begin_step(md)
        return md

    def start_load_kv(self, forward_context=None, **kwargs) -> None:
        md = self._bound()
        if md is None or self.engine is None:
            return
        loads = md.loads
        if not loads:
            return
        if self._kv_asleep is not None:  # asleep: nothing may touch the KV cache
            logger.warning("LMCache: %d load(s) asked for while the KV cache is unregistered (sleep "
                           "mode); vLLM recomputes them", len(loads))
            self._account_loads(loads, [r.load_from for r in loads])
            return
        if self.use_layerwise:
            self._start_layerwise_loads(loads)
            return
        parked = [r for r in loads if r.async_load]
        if parked:
            self._start_async_loads(parked)
        now = [r for r in loads if not r.async_load]
        if now:
            self._account_loads(now, self._retrieve(now))

    def _account_loads(self, loads: list[ReqMeta], loaded_ends: list[int]) -> None:
        """`loaded_ends[i]`: the end of the prefix of request i now valid in the paged
        cache. Positions vLLM was promised but did not get are reported as load
        errors (their blocks), so that vLLM recomputes them; where the runner never
        reads load errors, a short load raises LoadIncompleteError."""
        short = []
        for r, end in zip(loads, loaded_ends):
            self.counters.load_requests += 1
            good_to = max(r.load_from, min(int(end), r.load_to))
            self.counters.loaded_tokens += good_to - r.load_from
            if good_to < r.load_to:
                bad = r.load.slot_mapping[good_to:r.load_to]
                bad = bad[bad >= 0]
                self._load_errors.update((bad // self.block_size).unique().tolist())
                self.counters.load_failed_tokens += r.load_to - good_to
                if not self._runner_reads_load_errors:
                    short.append(f"{r.req_id} got {good_to - r.load_from} of {r.load_to - r.load_from} tokens")
                    continue
                logger.warning(
                    "LMCache: request %s loaded %d of %d tokens; vLLM recomputes the rest",
                    r.req_id, good_to - r.load_from, r.load_to - r.load_from,
                )
            elif self._corrupt_loads or self._corrupt_file_present():
                self._corrupt(r)
        if short:
            raise LoadIncompleteError(
                "LMCache: a KV load came up short on Gaudi (" + "; ".join(short) + "). vllm-gaudi never "
                "reads load errors, so these requests would compute on KV that is not in their blocks: "
                "stopping instead. The lookup held these chunks in host memory, so this means a device "
                "copy failed or the lease outlived lookup_lease_ttl (now "
                f"{self.config.lookup_lease_ttl:g} s); see the log above and docs/gaudi.md."
            )

    def _corrupt_file_present(self) -> bool:
        path = os.environ.get(CORRUPT_FILE_ENV) if self._test_hooks_allowed else None
        return bool(path) and os.path.exists(path)

    def _corrupt(self, r: ReqMeta) -> None:
        """Test hook: swap the K and V of what was just loaded, as a layout mix-up
        would (the tests must see the difference)."""
        from lmcache.v1.memory import MemoryObj

        start, end = r.load_from, r.load_to
        n = end - start
        connector = self.gpu_connector
        if n < 1 or connector.memory_format.num_planes != 2:
            return
        obj = MemoryObj(torch.empty(connector.get_shape(n), dtype=connector.kv_dtype), connector.memory_format)
        slots = r.load.slot_mapping[start:end].to(torch.long)
        connector.batched_from_gpu([obj], [0], [n], slot_mapping=slots)
        obj.tensor.copy_(obj.tensor.flip(0))
        connector.batched_to_gpu([obj], [0], [n], slot_mapping=slots)
        logger.warning("LMCache TEST HOOK: corrupted %d loaded tokens of %s", n, r.req_id)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose saves are done, requests whose asynchronous load is done)."""
        received = self._finished_loads() if self._loads_in_flight else set()
        return self._finished_saves(finished_req_ids), (received or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_events(self) -> list:
        return []

    def _shutdown_worker(self) -> None:
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        self._stop_save_pool()
        self._stop_load_pool()
        if self.engine is not None:
            try:
                self.engine.flush(10.0)
            except Exception:  # noqa: BLE001 - best effort at exit
                logger.warning("LMCache: queued writes not finished at shutdown", exc_info=True)


def _weak(kv):
    """A weak reference to one layer's cache (a tensor, or vllm-gaudi's (K, V) tuple)."""
    if isinstance(kv, (tuple, list)):
        return type(kv), [weakref.ref(t) for t in kv]
    return None, weakref.ref(kv)


def _resolve(ref):
    kind, refs = ref
    if kind is None:
        return refs()
    tensors = [r() for r in refs]
    return None if any(t is None for t in tensors) else kind(tensors)
