"""Upstream import path: vLLM's built-in LMCacheConnectorV1 imports `LMCacheConnectorV1Impl` from here.

vLLM builds it as `LMCacheConnectorV1Impl(vllm_config, role, parent)` once in the
scheduler process (role SCHEDULER) and once in every worker (role WORKER); vllm-gaudi
also isinstance-checks `LMCacheConnectorMetadata` under this path. The object composes
one half and forwards the hooks to it: `scheduler` (scheduler/connector.py) or `worker`
(worker/connector.py); the other is None. What the installed vLLM offers (hooks,
symbols; 0.26 to 0.34) is asked of vllm_compat.py. Saves run synchronously unless
`async_save=True`, loads unless `async_load=True` (our own connector class,
lmcache_connector_v1.py, turns both on where the runner allows them: config.py).
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from lmcache.integration.vllm import vllm_compat
from lmcache.integration.vllm.config import engine_id_of
from lmcache.integration.vllm.metadata import LMCacheConnectorMetadata
from lmcache.integration.vllm.scheduler.connector import SchedulerConnector
from lmcache.integration.vllm.worker.connector import WorkerConnector
from lmcache.logging import ensure_log_handler

__all__ = ["LMCacheConnectorMetadata", "LMCacheConnectorV1Impl"]


class LMCacheConnectorV1Impl:
    """`own_connector`: our connector class drives this (it forwards vLLM's stats and
    events hooks); vLLM's built-in wrapper passes only (vllm_config, role, parent)."""

    def __init__(self, vllm_config, role, parent=None, *, async_save: bool = False, async_load: bool = False,
                 own_connector: bool = False):
        ensure_log_handler()
        vllm_compat.require_supported()  # below the supported range: one clear line
        self.role = role
        self.vllm_config = vllm_config
        self.engine_id = engine_id_of(vllm_config)
        self.scheduler: SchedulerConnector | None = None
        self.worker: WorkerConnector | None = None
        if role == KVConnectorRole.SCHEDULER:
            # what this connector cannot do on the installed vLLM, once per process
            vllm_compat.log_startup(vllm_compat.OURS if own_connector else vllm_compat.WRAPPER)
            self.scheduler = SchedulerConnector.from_vllm(vllm_config, async_save=async_save, async_load=async_load,
                                                          reports_to_vllm=own_connector)
        else:
            # the wrapper's bound metadata, where it does not forward bind_connector_metadata
            self.worker = WorkerConnector.from_vllm(vllm_config, async_save=async_save, async_load=async_load,
                                                    wrapper_metadata=getattr(parent, "_get_connector_metadata", None))
        half = self.scheduler or self.worker
        self.config, self.flags = half.config, half.flags

    # -- worker hooks ------------------------------------------------------------
    def register_kv_caches(self, kv_caches) -> None:
        self.worker.register_kv_caches(kv_caches)

    def unregister_kv_caches(self) -> None:
        self.worker.unregister_kv_caches()

    def restore_kv_caches(self) -> None:
        self.worker.restore_kv_caches()

    def bind_connector_metadata(self, metadata) -> None:
        self.worker.bind_connector_metadata(metadata)

    def clear_connector_metadata(self) -> None:
        self.worker.clear_connector_metadata()

    def handle_preemptions(self, metadata) -> None:
        self.worker.handle_preemptions(metadata)

    def start_load_kv(self, forward_context=None, **kwargs) -> None:
        self.worker.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        self.worker.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        self.worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def get_kv_events(self) -> list:
        return []

    # -- scheduler hooks (the wrapper's signatures) -------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int | None:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)[0]

    def update_state_after_alloc(self, request, num_external_tokens: int, blocks=None) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> LMCacheConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        return self.scheduler.request_finished(request, block_ids)

    def get_kv_connector_stats(self):
        return self.scheduler.get_kv_connector_stats() if self.scheduler is not None else None

    def get_external_cache_hit_sources(self, request, num_external_tokens: int) -> dict:
        return self.scheduler.get_external_cache_hit_sources(request, num_external_tokens)

    def take_events(self) -> list:
        return self.scheduler.take_events()

    def shutdown(self) -> None:
        (self.scheduler or self.worker).shutdown()
