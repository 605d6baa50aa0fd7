"""`WorkerConnector`: everything vLLM calls on the connector in a worker process.

Each worker owns an LMCacheEngine over its own KV shard and answers the scheduler's
lookups on a local socket (lookup_channel). A step moves everything with one batched
retrieve (`start_load_kv`; loads vLLM parked run off the step, loads.py) and one batched
store (`wait_for_save`, saves.py); layerwise.py does the same layer by layer. The engine
is safe to use from several threads (its tiers and leases lock themselves), so lookups,
loads and background saves do not wait for each other (re-registration waits for them
first). What a load delivered against what vLLM was promised: accounting.py.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from typing import Any, Callable

from lmcache.integration.vllm.config import (
    ConnectorFlags,
    engine_id_of,
    extra_config_of,
    lmcache_config_from_vllm,
    parallel_rank_and_size,
)
from lmcache.integration.vllm.lookup_channel import LookupServer, socket_address
from lmcache.integration.vllm.lookups import LookupAnswer
from lmcache.integration.vllm.metadata import LMCacheConnectorMetadata
from lmcache.integration.vllm.metrics.kv_events import kv_events_enabled
from lmcache.integration.vllm.metrics.worker import WorkerCounters, WorkerMetrics, clip_runs, hit_runs, stats_reply
from lmcache.integration.vllm.runner import refuse_unsafe_settings, runner_for_device
from lmcache.integration.vllm.worker.accounting import LoadAccounting
from lmcache.integration.vllm.worker.engine_setup import connect_engine
from lmcache.integration.vllm.worker.handle import EngineHandle
from lmcache.integration.vllm.worker.layerwise import Layerwise
from lmcache.integration.vllm.worker.loads import Loads
from lmcache.integration.vllm.worker.saves import Saves
from lmcache.integration.vllm.worker.test_hooks import TestHooks

logger = logging.getLogger(__name__)


class WorkerConnector:
    """`wrapper_metadata`: how to read the step's metadata from a wrapper that may not
    forward bind_connector_metadata (vLLM's LMCacheConnectorV1 before 0.29)."""

    def __init__(self, vllm_config, config, flags: ConnectorFlags, engine_id: str,
                 wrapper_metadata: Callable[[], Any] | None = None):
        self.vllm_config = vllm_config
        self.config = config
        self.flags = flags
        self.engine_id = engine_id
        self._wrapper_metadata = wrapper_metadata
        self.rank, self.world_size = parallel_rank_and_size(vllm_config)
        self.handle = EngineHandle(int(vllm_config.cache_config.block_size), config.lookup_lease_ttl)
        self.counters = WorkerCounters()
        self.metrics = WorkerMetrics(self.rank, collect_events=kv_events_enabled(vllm_config))
        self.test_hooks = TestHooks()
        self.accounting = LoadAccounting(self.handle, self.counters, self.test_hooks)
        self.saves = Saves(self.handle, self.counters, self.metrics, flags.async_save)
        self.loads = Loads(self.handle, self.counters, self.metrics, self.accounting)
        self.layerwise = Layerwise(self.handle, self.counters, self.accounting)
        self.lookup_server: LookupServer | None = None
        self._metadata: LMCacheConnectorMetadata | None = None
        self._step_metadata: LMCacheConnectorMetadata | None = None  # the step _begin_step ran for
        self._kv_caches: dict[str, Any] | None = None  # what vLLM registered (None while asleep)
        self._kv_asleep: dict[str, Any] | None = None  # weak references to it while asleep
        self._observed_engine = None
        self._exit_hook_registered = False

    @classmethod
    def from_vllm(cls, vllm_config, config=None, *, async_save: bool = False, async_load: bool = False,
                  wrapper_metadata: Callable[[], Any] | None = None) -> "WorkerConnector":
        """The worker half for this vLLM config (`config`: the engine config, default from
        every source lmcache_config_from_vllm reads)."""
        config = config if config is not None else lmcache_config_from_vllm(vllm_config)
        flags = ConnectorFlags.decide(config, extra_config_of(vllm_config), async_save=async_save,
                                      async_load=async_load)
        return cls(vllm_config, config, flags, engine_id_of(vllm_config), wrapper_metadata)

    @property
    def engine(self):
        return self.handle.engine

    @property
    def gpu_connector(self):
        return self.handle.gpu_connector

    @property
    def kv_caches(self) -> dict[str, Any] | None:
        """The KV caches vLLM registered (None while they are unregistered)."""
        return self._kv_caches

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        layer_names = list(kv_caches)
        first = kv_caches[layer_names[0]]
        device_type = (first[0] if isinstance(first, (tuple, list)) else first).device.type
        runner = runner_for_device(device_type)
        if self.flags.use_layerwise and not runner.calls_layer_hooks:
            raise ValueError(
                f"LMCache use_layerwise=True cannot work on {runner.name}: its runner never calls the "
                "per-layer hooks. Accepted there: use_layerwise=False (the default)."
            )
        refuse_unsafe_settings(runner, self.vllm_config, os.environ)
        handle = self.handle
        handle.runner = runner
        reregistering = handle.engine is not None
        if reregistering:
            # Sleep / wake-up: vLLM hands over new tensors and frees the old ones, which
            # queued async saves and loads would still touch.
            self.saves.wait()
            self.loads.wait()
        self._kv_caches, self._kv_asleep = dict(kv_caches), None
        with handle.lock:
            handle.engine, handle.gpu_connector, backend = connect_engine(
                self.vllm_config, self.config, kv_caches, self.flags.use_layerwise, self.world_size, self.rank)
            handle.layer_index = {name: i for i, name in enumerate(layer_names)}
            handle.asleep = False
        if self.metrics.collect_events and self._observed_engine is not handle.engine:
            handle.engine.stats.add_observer(self.metrics.observe_chunk)
            self._observed_engine = handle.engine
        self.saves.start()
        if self.lookup_server is None:  # one per worker, also across re-registrations
            self.lookup_server = LookupServer(
                socket_address(self.engine_id, self.rank), self._answer_lookup, self.stats, self.control,
                lambda: self.metrics.reply(self.counters, handle.engine),
            ).start()
        if not self._exit_hook_registered:
            # vLLM's wrapper never forwards shutdown: finish queued disk/remote writes at exit.
            atexit.register(self.shutdown)
            self._exit_hook_registered = True
        if reregistering:
            logger.info("LMCache worker %d: KV caches registered again; loads and saves use the new tensors",
                        self.rank)
        logger.info(
            "LMCache worker %d/%d ready: %d layers, backend %s, layout %s, chunk %d, block %d, objects %s%s",
            self.rank, self.world_size, len(layer_names), backend, handle.gpu_connector.layout_fingerprint,
            self.config.chunk_size, handle.block_size, handle.gpu_connector.host_format_tag or "portable",
            ", async save" if self.flags.async_save else "",
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
        self.saves.wait()
        self.loads.abandon()
        handle = self.handle
        with handle.lock:
            self._kv_asleep = {name: _weak(kv) for name, kv in self._kv_caches.items()}
            self._kv_caches = None
            handle.asleep = True
            self.layerwise.new_step()
            handle.gpu_connector = None
            if handle.engine is not None:
                handle.engine.gpu_connector = None  # store/retrieve refuse until restore
        logger.info("LMCache worker %d: KV caches unregistered (sleep mode): saves finished, parked loads "
                    "stopped, no device tensor held", self.rank)

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
                           "(%d layers); LMCache stays off until register_kv_caches", self.rank, len(gone))
            return
        self.register_kv_caches(caches)

    # -- the lookup server's handlers (background thread) ----------------------
    def lookup(self, tokens, lease_id: str | None = None, hold_from: int = 0, prefetch: bool = False,
               key_material=None) -> LookupAnswer:
        """The hit, and which tier holds which part of it (metrics/worker.hit_runs)."""
        engine = self.handle.engine
        if engine is None:
            return LookupAnswer()
        # A lease reads disk/remote chunks into host memory: say where they were found.
        found_in = hit_runs(engine, tokens, len(tokens), key_material) if lease_id is not None else None
        hit = int(engine.lookup(tokens, lease_id=lease_id, hold_from=hold_from, prefetch=prefetch,
                                key_material=key_material))
        if not hit:
            return LookupAnswer()
        runs = clip_runs(found_in, hit) if lease_id is not None else hit_runs(engine, tokens, hit, key_material)
        return LookupAnswer.of(hit, runs)

    def _answer_lookup(self, *args, **kwargs) -> tuple[int, list | None]:
        answer = self.lookup(*args, **kwargs)
        return answer.hit, answer.wire_runs()

    def stats(self) -> dict:
        return stats_reply(self.rank, self.world_size, self.flags, self.saves.in_background, self.counters,
                           self.handle.gpu_connector, self.config, self.handle.engine)

    def control(self, command: dict) -> dict:
        answer: dict = {}
        if "flush" in command:
            # Wait for this worker's queued disk/remote writes (a second process may
            # be about to read them).
            self.saves.wait()
            engine = self.handle.engine
            with self.handle.lock:
                answer["flushed"] = bool(engine.flush(float(command["flush"]))) if engine else True
        if "corrupt_loads" in command:
            answer["corrupt_loads"] = self.test_hooks.set_corrupt_loads(command["corrupt_loads"])
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
        self.layerwise.new_step()
        self.accounting.new_step()
        released = getattr(metadata, "released_lease_ids", None)
        engine = self.handle.engine
        if released and engine is not None:
            with self.handle.lock:
                for lease_id in released:
                    engine.release_lease(lease_id)

    def clear_connector_metadata(self) -> None:
        self._metadata = None

    def _bound(self) -> LMCacheConnectorMetadata | None:
        md = self._metadata
        if md is None and self._wrapper_metadata is not None:
            try:
                md = self._wrapper_metadata()
            except AssertionError:
                md = None
        if not isinstance(md, LMCacheConnectorMetadata):
            return None
        if md is not self._step_metadata:  # bound by a wrapper that did not tell us
            self._begin_step(md)
        return md

    def handle_preemptions(self, metadata) -> None:
        self.saves.handle_preemptions(metadata)

    def start_load_kv(self, forward_context=None, **kwargs) -> None:
        md = self._bound()
        if md is None or self.handle.engine is None:
            return
        loads = md.loads
        if not loads:
            return
        if self.handle.asleep:  # nothing may touch the KV cache
            logger.warning("LMCache: %d load(s) asked for while the KV cache is unregistered (sleep "
                           "mode); vLLM recomputes them", len(loads))
            self.accounting.account(loads, [r.load_from for r in loads])
            return
        if self.flags.use_layerwise:
            self.layerwise.start_loads(loads)
            return
        parked = [r for r in loads if r.async_load]
        if parked:
            self.loads.start_async(parked)
        now = [r for r in loads if not r.async_load]
        if now:
            self.loads.load_now(now)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.layerwise.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        if not self.flags.use_layerwise or self.handle.engine is None:
            return
        md = self._bound()
        if md is not None:
            self.layerwise.save_layer(layer_name, md.saves)

    def wait_for_save(self) -> None:
        md = self._bound()
        if md is None or self.handle.engine is None:
            return
        if self.flags.use_layerwise:
            self.layerwise.finish_saves()
        else:
            self.saves.submit(md.saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose saves are done, requests whose asynchronous load is done)."""
        received = self.loads.finished() if self.loads.in_flight else set()
        return self.saves.finished(finished_req_ids), (received or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.accounting.take_errors()

    def shutdown(self) -> None:
        if self.lookup_server is not None:
            self.lookup_server.close()
            self.lookup_server = None
        self.saves.stop()
        self.loads.stop()
        engine = self.handle.engine
        if engine is not None:
            try:
                engine.flush(10.0)
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
