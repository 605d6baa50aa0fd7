"""The scheduler half of `LMCacheConnectorV1Impl` (vLLM's EngineCore process).

It plans (request_tracker.SchedulerPlanner) and asks the workers for hits over their
lookup sockets (lookup_channel): with tensor parallelism a prefix is a hit only as far
as every rank holds it.
"""

from __future__ import annotations

import logging

from lmcache.integration.vllm import vllm_compat
from lmcache.integration.vllm.connector_metadata import LMCacheConnectorMetadata
from lmcache.integration.vllm.kv_events import KVEventTracker, kv_events_enabled
from lmcache.integration.vllm.lookup_channel import LookupClient, socket_address
from lmcache.integration.vllm.request_keys import PLAIN, RequestKeys, request_keys
from lmcache.integration.vllm.request_tracker import SchedulerPlanner, SchedulerPolicy, uncacheable_reason
from lmcache.integration.vllm.scheduler_leases import SchedulerLeases
from lmcache.integration.vllm.scheduler_metrics import SchedulerMetrics
from lmcache.integration.vllm.utils import (
    DEFAULT_LOOKUP_TIMEOUT_MS,
    LOOKUP_TIMEOUT_KEY,
    force_skip_save,
    kv_role_of,
    note_ignored_extra_keys,
    parallel_rank_and_size,
    save_unfull_chunk_of,
)

logger = logging.getLogger(__name__)


def needs_slow_tier(runs: list | None, start: int, count: int) -> bool:
    """Whether tokens [start, start + count) of a hit lie partly outside host memory,
    by the lookup's tier runs ([[tier, tokens], ...]; None: the CPU tier only)."""
    pos, end = 0, start + count
    for tier, n in runs or ():
        if tier != "cpu" and pos < end and pos + int(n) > start:
            return True
        pos += int(n)
    return False


class SchedulerSide:
    """Mixin of LMCacheConnectorV1Impl: everything vLLM calls in the scheduler process."""

    # None until _init_scheduler (tests build bare instances with __new__)
    _metrics: SchedulerMetrics | None = None
    _events: KVEventTracker | None = None
    _standalone_prom = None
    _has_slow_tier = False

    def _init_scheduler(self, vllm_config, extra: dict) -> None:
        _, world_size = parallel_rank_and_size(vllm_config)
        timeout_ms = int(extra.get(LOOKUP_TIMEOUT_KEY, DEFAULT_LOOKUP_TIMEOUT_MS))
        self._lookup_client = LookupClient(
            [socket_address(self._engine_id, r) for r in range(world_size)], timeout_ms
        )
        role = kv_role_of(vllm_config)
        self._leases = SchedulerLeases()
        self._async_requests: set[str] = set()  # looked up, and their hit needs a slow tier
        self._lookup_lease: str | None = None  # the lease id of the lookup in progress
        self._lookup_hold_from = 0  # ... and vLLM's own prefix hit (not held by the workers)
        config = self.config
        self._has_slow_tier = bool((config.local_disk and config.max_local_disk_size > 0) or config.remote_url)
        from lmcache.integration.vllm.prom_metrics import StandaloneProm, is_our_connector

        self._events = None
        self._event_requests: dict = {}
        # Only our connector class hands events to vLLM (take_events); its wrapper does not.
        if kv_events_enabled(vllm_config) and is_our_connector(self._parent):
            self._events = KVEventTracker(self.config.chunk_size, self.block_size, world_size)
        self._metrics = SchedulerMetrics(self._lookup_client, self._events)
        self._standalone_prom = None
        if StandaloneProm.wanted(self._parent):
            self._standalone_prom = StandaloneProm(vllm_config)
            logger.info("LMCache: recording lmcache:* metrics in PROMETHEUS_MULTIPROC_DIR")
        skip_saves = force_skip_save()
        if skip_saves:
            logger.info("LMCache: saving is off (LMCACHE_FORCE_SKIP_SAVE)")
        if role != "kv_both":
            logger.info("LMCache: kv_role=%s: %s", role,
                        "stores, never loads" if role == "kv_producer" else "loads, never stores")
        note_ignored_extra_keys(extra)
        self._planner = SchedulerPlanner(
            SchedulerPolicy(
                chunk_size=self.config.chunk_size,
                block_size=self.block_size,
                save_unfull_chunk=save_unfull_chunk_of(self.config, extra),
                save_decode_cache=self.config.save_decode_cache,
                min_retrieve_tokens=self.config.min_retrieve_tokens,
                skip_all_saves=skip_saves or role == "kv_consumer",
                load_enabled=role != "kv_producer",
            ),
            self._leased_lookup,
        )

    def _leased_lookup(self, tokens, keys: RequestKeys = PLAIN) -> int:
        material = keys.chunk_key_material(self.config.chunk_size, len(tokens))
        return self._metrics.lookup(tokens, self._lookup_lease, self._lookup_hold_from, self.async_load,
                                    material, keys.kinds)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int | None:
        # The workers hold what they answer until this request's load (or its release).
        self._lookup_lease = self._leases.new(request.request_id)
        self._lookup_hold_from = num_computed_tokens
        metrics = self._metrics
        if metrics is not None:
            metrics.last_runs = None
        try:
            matched = self._planner.num_new_matched_tokens(request, num_computed_tokens)
        finally:
            self._lookup_lease = None
        self._async_requests.discard(request.request_id)
        if matched and metrics is not None:
            metrics.remember_sources(request.request_id, num_computed_tokens)
            if self.async_load and needs_slow_tier(metrics.last_runs, num_computed_tokens, matched):
                self._async_requests.add(request.request_id)
        return matched

    def may_load_async(self, request) -> bool:
        """Whether `request`'s hit may be loaded asynchronously (vLLM 0.34 asks when the
        request enters its waiting queues, with --max-num-inflight-kv-loads only). Only
        with async loads and a disk or remote tier; then a lookup without a lease says
        whether the hit reaches past host memory (a false positive only holds other async
        loads back until a slot frees; a false negative queues the request as before)."""
        if not (self.async_load and self._planner.policy.load_enabled and self._has_slow_tier):
            return False
        if request.request_id in self._async_requests:
            return True
        if uncacheable_reason(request) is not None:
            return False
        tokens = request.all_token_ids[:int(request.num_tokens)]
        try:
            # the request's own keys (salt, LoRA, media): another tenant's chunks are no hit
            material = request_keys(request).chunk_key_material(self.config.chunk_size, len(tokens))
            keyed = {} if material is None else {"key_material": material}
            hit, runs = self._lookup_client.lookup_with_sources(tokens, **keyed)
        except Exception:  # noqa: BLE001 - a guess only: the admission lookup decides
            return False
        return bool(hit) and needs_slow_tier(runs, 0, hit)

    def load_is_async(self, req_id: str) -> bool:
        """Whether the last lookup of `req_id` is loaded asynchronously (a part of the hit
        is outside host memory: the workers are reading it in the background)."""
        return req_id in self._async_requests

    def update_state_after_alloc(self, request, num_external_tokens: int, blocks=None) -> None:
        is_async = request.request_id in self._async_requests
        self._async_requests.discard(request.request_id)
        if is_async and num_external_tokens > 0 and blocks is not None:
            # vLLM parks the request; its load is planned now, off the scheduled batch.
            self._planner.after_alloc(request, num_external_tokens, async_block_ids=blocks.get_block_ids()[0])
        else:
            self._planner.after_alloc(request, num_external_tokens)
        if num_external_tokens <= 0:
            self._leases.release(request.request_id)
        if self._events is not None:
            self._event_requests[request.request_id] = request

    def build_connector_meta(self, scheduler_output) -> LMCacheConnectorMetadata:
        metas = self._planner.build(scheduler_output)
        for r in metas:
            if r.load is not None:
                r.lease_id = self._leases.for_load(r.req_id)
        preempted = getattr(scheduler_output, "preempted_req_ids", None)
        for req_id in set(preempted or ()) | set(scheduler_output.finished_req_ids or ()):
            self._leases.release(req_id)
        if metas and self._metrics is not None:
            self._metrics.note_activity()
            if self._events is not None:
                for meta in metas:
                    request = self._event_requests.get(meta.req_id)
                    if meta.save is not None and request is not None:
                        self._events.record_save(request, meta.save)
        if self._standalone_prom is not None:  # vLLM's wrapper calls no stats hook
            stats = self.get_kv_connector_stats()
            if stats is not None:
                self._standalone_prom.observe(vllm_compat.stats_payload(stats))
        return LMCacheConnectorMetadata(metas, preempted, self._leases.take_released())
    # -- metrics and KV events (connector_stats.py, kv_events.py) ----------------------
    def get_kv_connector_stats(self):
        if self._metrics is None:
            return None
        held = getattr(self._parent, "_blocks_held", None)
        stats = self._metrics.take_stats(None if held is None else len(held))
        return None if stats.is_empty() else stats

    def get_external_cache_hit_sources(self, request, num_external_tokens: int) -> dict:
        if self._metrics is None:
            return {}
        return self._metrics.hit_sources(request.request_id, num_external_tokens)

    def note_transfers_done(self) -> None:
        if self._metrics is not None:
            self._metrics.note_activity()

    def take_events(self) -> list:
        return self._metrics.take_events() if self._events is not None else []

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        self._leases.release(request.request_id)
        self._async_requests.discard(request.request_id)
        if self._metrics is not None:
            self._metrics.note_activity()
            self._metrics.forget(request.request_id)
        if self._events is not None:
            self._event_requests.pop(request.request_id, None)
        had_save = self._planner.finished(request)
        # With async saving, the blocks stay allocated until every worker reports
        # the request's saves done (get_finished).
        return (self.async_save and had_save), None

    def _shutdown_scheduler(self) -> None:
        self._lookup_client.close()
