"""The object vLLM's built-in `LMCacheConnectorV1` drives: `LMCacheConnectorV1Impl`.

vLLM builds it as `LMCacheConnectorV1Impl(vllm_config, role, parent)` once in the
scheduler process (role SCHEDULER) and once in every worker (role WORKER), and calls:

  scheduler: get_num_new_matched_tokens(request, n) -> int | None,
             update_state_after_alloc(request, n), build_connector_meta(out),
             request_finished(request, block_ids)
  worker:    register_kv_caches(kv), bind_connector_metadata(md), start_load_kv(fc, **kw),
             wait_for_layer_load(name), save_kv_layer(name, kv, md, **kw), wait_for_save(),
             get_finished(ids), get_block_ids_with_load_errors(), get_kv_events()

The scheduler plans (request_tracker.SchedulerPlanner) and asks the workers for hits
over a local socket (lookup_channel); each worker owns an LMCacheEngine over its own
KV shard. A step moves everything with one batched retrieve and one batched store.
Saves run synchronously unless `async_save=True` (our own connector class turns that
on: stores then run on a background thread, and finished requests keep their blocks
until their saves are done).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, is_dataclass
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorRole

from lmcache.integration.vllm.lookup_channel import LookupClient, LookupServer, socket_address
from lmcache.integration.vllm.request_tracker import ReqMeta, SchedulerPlanner, SchedulerPolicy
from lmcache.integration.vllm.utils import (
    DEFAULT_LOOKUP_TIMEOUT_MS,
    ENGINE_NAME,
    LOOKUP_TIMEOUT_KEY,
    attention_backend_name,
    engine_id_of,
    ensure_log_handler,
    extra_config_of,
    force_skip_save,
    lmcache_config_from_vllm,
    mla_enabled,
    truthy,
)

logger = logging.getLogger(__name__)

# Test hooks (corrupting loaded KV on purpose) answer only in processes started
# with this variable set; see tests/e2e/.
TEST_HOOKS_ENV = "LMCACHE_TEST_HOOKS"


def _transfer_specs(transfers) -> list:
    """The engine's TransferSpecs for a step's planned loads or saves."""
    from lmcache.v1.cache_engine import TransferSpec

    return [
        TransferSpec(tokens=t.token_ids, slot_mapping=t.slot_mapping, skip_tokens=t.skip_tokens, num_tokens=t.num_tokens)
        for t in transfers
    ]


class LMCacheConnectorMetadata(KVConnectorMetadata):
    """One step's plan, scheduler -> workers (picklable; vllm-gaudi isinstance-checks
    this exact name)."""

    def __init__(self, requests: list[ReqMeta] | None = None, preempted_req_ids: set[str] | None = None):
        self.requests: list[ReqMeta] = list(requests or [])
        self.preempted_req_ids: set[str] = set(preempted_req_ids or ())

    @property
    def loads(self) -> list[ReqMeta]:
        return [r for r in self.requests if r.load is not None]

    @property
    def saves(self) -> list[ReqMeta]:
        return [r for r in self.requests if r.save is not None]

    def __repr__(self) -> str:
        return f"LMCacheConnectorMetadata(loads={len(self.loads)}, saves={len(self.saves)})"


def _parallel_rank_and_size(vllm_config) -> tuple[int, int]:
    """This worker's rank among the tp*pp workers of one engine, and their number."""
    parallel = vllm_config.parallel_config
    tp, pp = int(parallel.tensor_parallel_size), int(parallel.pipeline_parallel_size)
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        rank = get_pp_group().rank_in_group * tp + get_tensor_model_parallel_rank()
    except (AssertionError, ImportError, AttributeError):  # not initialised (unit tests)
        rank = 0
    return rank, tp * pp


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

    def to_dict(self) -> dict:
        return dict(vars(self))


class LMCacheConnectorV1Impl:
    def __init__(self, vllm_config, role, parent=None, *, async_save: bool = False):
        ensure_log_handler()
        self._vllm_config = vllm_config
        self._parent = parent
        self.role = role
        self.config = lmcache_config_from_vllm(vllm_config)
        extra = extra_config_of(vllm_config)
        self.block_size = int(vllm_config.cache_config.block_size)
        self.use_layerwise = bool(self.config.use_layerwise or truthy(extra.get("use_layerwise", False)))
        # Layerwise saves happen inside the forward (save_kv_layer), never in the background.
        self.async_save = bool(async_save) and not self.use_layerwise
        self._engine_id = engine_id_of(vllm_config)
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler(vllm_config, extra)
        else:
            self._init_worker(vllm_config)

    # ========================================================================
    # Scheduler side
    # ========================================================================
    def _init_scheduler(self, vllm_config, extra: dict) -> None:
        _, world_size = _parallel_rank_and_size(vllm_config)
        timeout_ms = int(extra.get(LOOKUP_TIMEOUT_KEY, DEFAULT_LOOKUP_TIMEOUT_MS))
        self._lookup_client = LookupClient(
            [socket_address(self._engine_id, r) for r in range(world_size)], timeout_ms
        )
        skip_saves = force_skip_save()
        if skip_saves:
            logger.info("LMCache: saving is off (LMCACHE_FORCE_SKIP_SAVE)")
        self._planner = SchedulerPlanner(
            SchedulerPolicy(
                chunk_size=self.config.chunk_size,
                block_size=self.block_size,
                save_unfull_chunk=self.config.save_unfull_chunk,
                save_decode_cache=self.config.save_decode_cache,
                min_retrieve_tokens=self.config.min_retrieve_tokens,
                skip_all_saves=skip_saves,
            ),
            self._lookup_client.lookup,
        )

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int | None:
        return self._planner.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, num_external_tokens: int) -> None:
        self._planner.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> LMCacheConnectorMetadata:
        return LMCacheConnectorMetadata(
            self._planner.build(scheduler_output),
            getattr(scheduler_output, "preempted_req_ids", None),
        )

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        had_save = self._planner.finished(request)
        # With async saving, the blocks stay allocated until every worker reports
        # the request's saves done (get_finished).
        return (self.async_save and had_save), None

    # ========================================================================
    # Worker side
    # ========================================================================
    def _init_worker(self, vllm_config) -> None:
        self.engine = None
        self.gpu_connector = None
        self._rank, self._world_size = _parallel_rank_and_size(vllm_config)
        self._metadata: LMCacheConnectorMetadata | None = None
        self._load_errors: set[int] = set()
        self._engine_lock = threading.RLock()
        self._lookup_server: LookupServer | None = None
        self.counters = WorkerCounters()
        self._test_hooks_allowed = truthy(os.environ.get(TEST_HOOKS_ENV, ""))
        self._corrupt_loads = False
        # layerwise state (per step)
        self._layer_index: dict[str, int] = {}
        self._layer_retrievers: list = []
        self._layer_storers: list = []
        # async saving
        self._save_pool: ThreadPoolExecutor | None = None
        self._saves_in_flight: dict[str, list[Future]] = defaultdict(list)
        self._requests_with_saves: set[str] = set()
        self._awaiting_report: set[str] = set()

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        from lmcache.platforms import current_platform
        from lmcache.v1.cache_engine import LMCacheEngineBuilder, LMCacheEngineMetadata
        from lmcache.v1.gpu_connector import create_gpu_connector

        layer_names = list(kv_caches)
        first = kv_caches[layer_names[0]]
        device_type = (first[0] if isinstance(first, (tuple, list)) else first).device.type
        if self.use_layerwise and device_type == "hpu":
            raise ValueError(
                "LMCache use_layerwise=True cannot work on Gaudi: vllm-gaudi never calls the "
                "per-layer hooks. Accepted there: use_layerwise=False (the default)."
            )
        backend = attention_backend_name(self._vllm_config, layer_names)
        self.gpu_connector = create_gpu_connector(
            kv_caches, use_layerwise=self.use_layerwise, attn_backend=backend, platform=current_platform(),
            native_blocks=self.config.cpu_native_blocks,
        )
        model_config = self._vllm_config.model_config
        parallel_config = self._vllm_config.parallel_config
        use_mla = mla_enabled(model_config)
        metadata = LMCacheEngineMetadata(
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
        )
        self.engine = LMCacheEngineBuilder.get_or_create(ENGINE_NAME, self.config, metadata, self.gpu_connector)
        self._layer_index = {name: i for i, name in enumerate(layer_names)}
        if self.async_save:
            self._save_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-save")
        self._lookup_server = LookupServer(
            socket_address(self._engine_id, self._rank), self._lookup, self.stats, self._control
        ).start()
        # vLLM's wrapper never forwards shutdown: finish queued disk/remote writes at exit.
        atexit.register(self.shutdown)
        logger.info(
            "LMCache worker %d/%d ready: %d layers, backend %s, layout %s, chunk %d, block %d, objects %s%s",
            self._rank, self._world_size, len(layer_names), backend, self.gpu_connector.layout_fingerprint,
            self.config.chunk_size, self.block_size, self.gpu_connector.host_format_tag or "portable",
            ", async save" if self.async_save else "",
        )

    # -- the lookup server's handlers (background thread) ----------------------
    def _lookup(self, tokens) -> int:
        if self.engine is None:
            return 0
        with self._engine_lock:
            return int(self.engine.lookup(tokens))

    def stats(self) -> dict:
        out = {"rank": self._rank, "world_size": self._world_size, "layerwise": self.use_layerwise,
               "async_save": self._save_pool is not None, "adapter": self.counters.to_dict(),
               "host_format": getattr(self.gpu_connector, "host_format_tag", "") or "portable"}
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
        self._layer_retrievers = []
        self._layer_storers = []

    def clear_connector_metadata(self) -> None:
        self._metadata = None

    def handle_preemptions(self, metadata: LMCacheConnectorMetadata) -> None:
        # A preempted request's blocks are reused this step: its saves must be done.
        if metadata is not None and metadata.preempted_req_ids & set(self._saves_in_flight):
            self._wait_saves(metadata.preempted_req_ids)

    def _bound(self) -> LMCacheConnectorMetadata | None:
        md = self._metadata
        if md is None and self._parent is not None and hasattr(self._parent, "_get_connector_metadata"):
            try:
                md = self._parent._get_connector_metadata()
            except AssertionError:
                md = None
        return md if isinstance(md, LMCacheConnectorMetadata) else None

    def start_load_kv(self, forward_context=None, **kwargs) -> None:
        md = self._bound()
        if md is None or self.engine is None:
            return
        loads = md.loads
        if not loads:
            return
        if self.use_layerwise:
            self._start_layerwise_loads(loads)
            return
        specs = _transfer_specs(r.load for r in loads)
        start = time.perf_counter()
        try:
            with self._engine_lock:
                loaded = list(self.engine.batched_retrieve(specs))
        except Exception:  # noqa: BLE001 - a cache fault is a miss, never a failed step
            logger.exception("LMCache: batched retrieve failed; %d request(s) will recompute", len(loads))
            loaded = [0] * len(loads)
        logger.debug("LMCache: loaded %s tokens for %d request(s) in %.1f ms",
                     loaded, len(loads), (time.perf_counter() - start) * 1000)
        # the engine counts tokens loaded from skip_tokens on
        self._account_loads(loads, [r.load.skip_tokens + n for r, n in zip(loads, loaded)])

    def _account_loads(self, loads: list[ReqMeta], loaded_ends: list[int]) -> None:
        """`loaded_ends[i]`: the end of the prefix of request i now valid in the paged
        cache. Positions vLLM was promised but did not get are reported as load
        errors (their blocks), so that vLLM recomputes them."""
        for r, end in zip(loads, loaded_ends):
            self.counters.load_requests += 1
            good_to = max(r.load_from, min(int(end), r.load_to))
            self.counters.loaded_tokens += good_to - r.load_from
            if good_to < r.load_to:
                bad = r.load.slot_mapping[good_to:r.load_to]
                bad = bad[bad >= 0]
                self._load_errors.update((bad // self.block_size).unique().tolist())
                self.counters.load_failed_tokens += r.load_to - good_to
                logger.warning(
                    "LMCache: request %s loaded %d of %d tokens; vLLM recomputes the rest",
                    r.req_id, good_to - r.load_from, r.load_to - r.load_from,
                )
            elif self._corrupt_loads:
                self._corrupt(r)

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

    # -- layerwise ------------------------------------------------------------------
    def _start_layerwise_loads(self, loads: list[ReqMeta]) -> None:
        with self._engine_lock:
            for r in loads:
                plan = r.load
                mask = torch.ones(plan.num_tokens, dtype=torch.bool)
                mask[: plan.skip_tokens] = False
                gen = self.engine.retrieve_layer(plan.token_ids, mask, slot_mapping=plan.slot_mapping)
                self._layer_retrievers.append((r, gen))

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._layer_retrievers:
            return
        index = self._layer_index.get(layer_name, 0)
        last = index == len(self._layer_index) - 1
        with self._engine_lock:
            for _, gen in self._layer_retrievers:
                next(gen)
        if last:
            self._finish_layerwise_loads()

    def _finish_layerwise_loads(self) -> None:
        loads, loaded = [], []
        with self._engine_lock:
            for r, gen in self._layer_retrievers:
                result = next(gen, None)  # the final step synchronises and reports
                loads.append(r)
                loaded.append(_loaded_end(result))
        self._layer_retrievers = []
        self._account_loads(loads, loaded)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        if not self.use_layerwise or self.engine is None:
            return
        md = self._bound()
        if md is None:
            return
        if not self._layer_storers and self._layer_index.get(layer_name, 0) == 0:
            with self._engine_lock:
                for r in md.saves:
                    plan = r.save
                    mask = torch.ones(plan.num_tokens, dtype=torch.bool)
                    mask[: plan.skip_tokens] = False
                    self._layer_storers.append(
                        (r, self.engine.store_layer(plan.token_ids, mask, slot_mapping=plan.slot_mapping))
                    )
        with self._engine_lock:
            for _, gen in self._layer_storers:
                next(gen)

    # -- saving ---------------------------------------------------------------------
    def wait_for_save(self) -> None:
        md = self._bound()
        if md is None or self.engine is None:
            return
        if self.use_layerwise:
            with self._engine_lock:
                for r, gen in self._layer_storers:
                    stored = next(gen, 0)  # the final step: wait for the copies, hand chunks to the tiers
                    self.counters.save_requests += 1
                    self.counters.saved_tokens += int(stored or 0)
            self._layer_storers = []
            return
        saves = md.saves
        if not saves:
            return
        if self._save_pool is None:
            self._store(saves)
            return
        future = self._save_pool.submit(self._store, saves)
        for r in saves:
            self._requests_with_saves.add(r.req_id)
            self._saves_in_flight[r.req_id].append(future)

    def _store(self, saves: list[ReqMeta]) -> None:
        specs = _transfer_specs(r.save for r in saves)
        start = time.perf_counter()
        try:
            with self._engine_lock:
                stored = self.engine.batched_store(specs)
        except Exception:  # noqa: BLE001 - a failed save loses cache, never a request
            logger.exception("LMCache: batched store of %d request(s) failed", len(saves))
            self.counters.save_failures += 1
            return
        logger.debug("LMCache: stored %s tokens for %d request(s) in %.1f ms",
                     stored, len(saves), (time.perf_counter() - start) * 1000)
        self.counters.save_requests += len(saves)
        self.counters.saved_tokens += sum(int(n) for n in stored)

    def _wait_saves(self, req_ids=None) -> None:
        ids = list(self._saves_in_flight) if req_ids is None else [i for i in req_ids if i in self._saves_in_flight]
        for req_id in ids:
            for future in self._saves_in_flight.pop(req_id, []):
                future.result()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._save_pool is None:
            return None, None
        self._awaiting_report.update(i for i in finished_req_ids if i in self._requests_with_saves)
        done = set()
        for req_id in list(self._awaiting_report):
            futures = self._saves_in_flight.get(req_id, [])
            if all(f.done() for f in futures):
                self._saves_in_flight.pop(req_id, None)
                self._requests_with_saves.discard(req_id)
                self._awaiting_report.discard(req_id)
                done.add(req_id)
        self.counters.held_requests_released += len(done)
        for req_id in list(self._saves_in_flight):
            self._saves_in_flight[req_id] = [f for f in self._saves_in_flight[req_id] if not f.done()]
            if not self._saves_in_flight[req_id]:
                del self._saves_in_flight[req_id]
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_events(self) -> list:
        return []

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.SCHEDULER:
            self._lookup_client.close()
            return
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        if self._save_pool is not None:
            self._wait_saves()
            self._save_pool.shutdown(wait=True)
            self._save_pool = None
        if self.engine is not None:
            try:
                self.engine.flush(10.0)
            except Exception:  # noqa: BLE001 - best effort at exit
                logger.warning("LMCache: queued writes not finished at shutdown", exc_info=True)


def _loaded_end(mask) -> int:
    """End of the loaded prefix from a layerwise retrieve's bool mask of loaded tokens."""
    if not isinstance(mask, torch.Tensor) or mask.numel() == 0:
        return 0
    where = mask.nonzero()
    return int(where.max()) + 1 if where.numel() else 0
