"""Upstream import path: our own vLLM KV connector class, `LMCacheConnectorV1Dynamic`, lives here.

Use it either by the short name the plugin registers,
    kv_transfer_config={"kv_connector": "lmcache", "kv_role": "kv_both"}
or by module path,
    {"kv_connector": "LMCacheConnectorV1Dynamic",
     "kv_connector_module_path": "lmcache.integration.vllm.lmcache_connector_v1", ...}

It composes the same halves as vLLM's built-in `LMCacheConnectorV1` (through
`LMCacheConnectorV1Impl`: scheduler/ or worker/), with what that wrapper cannot offer:
- asynchronous saving (on by default; turn it off with kv_connector_extra_config
  {"async_save": false}). A step then only hands its stores to a background thread; a
  finished request keeps its blocks (`request_finished` returns True) until every
  worker reports its saves done through `get_finished`, and a preempted request's
  pending saves are awaited before its blocks are reused (`handle_preemptions`).
- asynchronous loads from the slower tiers (on by default; {"async_load": false} turns
  it off). A hit that is all in host memory loads inside the step (a memcpy); one that
  needs the disk or remote tier is answered as asynchronous: the lookup starts reading
  those chunks into host memory in the background, vLLM parks the request
  (WAITING_FOR_REMOTE_KVS) while the others run, the worker copies the KV into its
  blocks off the step and reports it through `get_finished`; a load that came up
  short reports its blocks as load errors (vLLM recomputes them), which is why this
  sets kv_load_failure_policy to "recompute". Never on Gaudi: vllm-gaudi's runner
  never reads load errors (runner.py, docs/gaudi.md).

It also speaks vLLM's metrics and events protocols (metrics/stats.py,
metrics/prom.py, metrics/kv_events.py): LMCache's figures appear on vLLM's /metrics and in its
periodic "KV Transfer metrics" log line, vLLM's per-source cached-token counter
learns which tier a hit came from, and, with --kv-events-config, LMCache's stores
and removals are published as vLLM KV events. All of it is reported from the
scheduler side (vllm-gaudi never calls the worker-side hooks in a forward step: runner.py).
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmcache.integration.vllm import vllm_compat
from lmcache.integration.vllm.config import async_load_wanted, async_save_wanted, use_layerwise
from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl


class LMCacheConnectorV1Dynamic(KVConnectorBase_V1):
    _cache_hit_source = vllm_compat.CacheHitSource.HOST

    # -- metrics (built by vLLM in the API-server process) ------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        from lmcache.integration.vllm.metrics.stats import LMCacheConnectorStats

        return LMCacheConnectorStats(data=data) if data is not None else LMCacheConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from lmcache.integration.vllm.metrics.prom import LMCachePromMetrics

        return LMCachePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return use_layerwise(extra_config)

    @classmethod
    def kv_cache_access(cls, kv_transfer_config):
        """vLLM 0.34+: the workers copy with torch ops in their own process (any KV cache
        allocation, the extensible one included). Declared, so that vLLM does not treat
        our LMCacheMPConnector (--kv-offloading-backend lmcache) as a legacy CUDA IPC one."""
        return vllm_compat.in_process_kv_cache_access()

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self._impl = LMCacheConnectorV1Impl(vllm_config, role, self, async_save=async_save_wanted(vllm_config, extra),
                                            async_load=async_load_wanted(vllm_config, extra, role), own_connector=True)
        self._scheduler = self._impl.scheduler
        self._worker = self._impl.worker

    @property
    def impl(self) -> LMCacheConnectorV1Impl:
        return self._impl

    # -- worker side ---------------------------------------------------------
    def register_kv_caches(self, kv_caches) -> None:
        self._worker.register_kv_caches(kv_caches)

    # sleep mode (vLLM 0.33+; 0.34 also around weight updates of the extensible KV cache)
    def unregister_kv_caches(self) -> None:
        self._worker.unregister_kv_caches()

    def restore_kv_caches(self) -> None:
        self._worker.restore_kv_caches()

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._worker.bind_connector_metadata(connector_metadata)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self._worker.clear_connector_metadata()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self._worker.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        self._worker.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        self._worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors()

    def shutdown(self) -> None:
        self._impl.shutdown()

    # -- scheduler side --------------------------------------------------------
    def may_load_async(self, request) -> bool:
        """vLLM 0.34+ (--max-num-inflight-kv-loads): whether this request's hit may need a
        slower tier, so that vLLM queues it with the loads that can start while the batch
        is full instead of in front of the others."""
        return self._scheduler.may_load_async(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output) -> None:
        self._scheduler.update_connector_output(connector_output)

    def get_kv_connector_stats(self):
        # The workers' figures come over the lookup channel (worker-side hook: None).
        return self._scheduler.get_kv_connector_stats() if self._scheduler is not None else None

    def get_external_cache_hit_sources(self, request, num_external_tokens: int):
        return self._scheduler.get_external_cache_hit_sources(request, num_external_tokens)

    def take_events(self):
        return self._scheduler.take_events()

    def has_pending_block_frees(self) -> bool:
        return self._scheduler.has_pending_block_frees()
