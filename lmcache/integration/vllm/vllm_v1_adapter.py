"""The object vLLM's built-in `LMCacheConnectorV1` drives: `LMCacheConnectorV1Impl`.

vLLM builds it as `LMCacheConnectorV1Impl(vllm_config, role, parent)` once in the
scheduler process (role SCHEDULER) and once in every worker (role WORKER), and calls:

  scheduler: get_num_new_matched_tokens(request, n) -> int | None,
             update_state_after_alloc(request, n), build_connector_meta(out),
             request_finished(request, block_ids)
  worker:    register_kv_caches(kv), bind_connector_metadata(md), start_load_kv(fc, **kw),
             wait_for_layer_load(name), save_kv_layer(name, kv, md, **kw), wait_for_save(),
             get_finished(ids), get_block_ids_with_load_errors(), get_kv_events()

The two halves read top to bottom in their own modules: scheduler_side.py (planning,
lookups over the workers' sockets) and worker_side.py (the engine, one batched
retrieve and one batched store per step; worker_saves.py, worker_layerwise.py).
What the installed vLLM offers (hooks, symbols; 0.26 to 0.34) is asked of vllm_compat.py.
Saves run synchronously unless `async_save=True`, loads unless `async_load=True` (our
own connector class turns both on: stores then run on a background thread, and
finished requests keep their blocks until their saves are done; loads that need the
disk or remote tier run off the step, see lmcache_connector_v1.py and worker_loads.py).
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from lmcache.integration.vllm import vllm_compat
from lmcache.integration.vllm.connector_metadata import LMCacheConnectorMetadata
from lmcache.integration.vllm.scheduler_side import SchedulerSide
from lmcache.integration.vllm.utils import (
    engine_id_of,
    extra_config_of,
    lmcache_config_from_vllm,
    truthy,
)
from lmcache.integration.vllm.worker_side import WorkerSide
from lmcache.logging import ensure_log_handler

__all__ = ["LMCacheConnectorMetadata", "LMCacheConnectorV1Impl"]


class LMCacheConnectorV1Impl(SchedulerSide, WorkerSide):
    def __init__(self, vllm_config, role, parent=None, *, async_save: bool = False, async_load: bool = False):
        ensure_log_handler()
        vllm_compat.require_supported()  # below the supported range: one clear line
        self._vllm_config = vllm_config
        self._parent = parent
        self.role = role
        self.config = lmcache_config_from_vllm(vllm_config)
        extra = extra_config_of(vllm_config)
        self.block_size = int(vllm_config.cache_config.block_size)
        self.use_layerwise = bool(self.config.use_layerwise or truthy(extra.get("use_layerwise", False)))
        # Layerwise saves happen inside the forward (save_kv_layer), never in the background.
        self.async_save = bool(async_save) and not self.use_layerwise
        self.async_load = bool(async_load) and not self.use_layerwise
        self._engine_id = engine_id_of(vllm_config)
        if role == KVConnectorRole.SCHEDULER:
            from lmcache.integration.vllm.prom_metrics import is_our_connector

            # what this connector cannot do on the installed vLLM, once per process
            vllm_compat.log_startup(vllm_compat.OURS if is_our_connector(parent) else vllm_compat.WRAPPER)
            self._init_scheduler(vllm_config, extra)
        else:
            self._init_worker(vllm_config)

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.SCHEDULER:
            self._shutdown_scheduler()
        else:
            self._shutdown_worker()
