"""`SchedulerConnector`: everything vLLM calls on the connector in its scheduler process.

It plans (planner.SchedulerPlanner) and asks the workers for hits over their lookup
sockets (lookup_channel): with tensor parallelism a prefix is a hit only as far as
every rank holds it. Each lookup is a call with its arguments (the lease the workers
hold the hit under, vLLM's own prefix hit, whether to prefetch) and a `LookupAnswer`
value back; the metrics observe it (metrics/scheduler.py).
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

from lmcache.integration.vllm import vllm_compat
from lmcache.integration.vllm.config import (
    DEFAULT_LOOKUP_TIMEOUT_MS,
    LOOKUP_TIMEOUT_KEY,
    ConnectorFlags,
    engine_id_of,
    extra_config_of,
    force_skip_save,
    kv_role_of,
    lmcache_config_from_vllm,
    note_ignored_extra_keys,
    parallel_rank_and_size,
    save_unfull_chunk_of,
)
from lmcache.integration.vllm.lookup_channel import LookupClient, socket_address
from lmcache.integration.vllm.lookups import LookupAnswer
from lmcache.integration.vllm.metadata import LMCacheConnectorMetadata
from lmcache.integration.vllm.metrics.kv_events import KVEventTracker, kv_events_enabled
from lmcache.integration.vllm.metrics.prom import StandaloneProm
from lmcache.integration.vllm.metrics.scheduler import SchedulerMetrics
from lmcache.integration.vllm.request_keys import PLAIN, RequestKeys, request_keys, uncacheable_reason
from lmcache.integration.vllm.scheduler.leases import SchedulerLeases
from lmcache.integration.vllm.scheduler.planner import SchedulerPlanner, SchedulerPolicy

logger = logging.getLogger(__name__)


class SchedulerConnector:
    """`reports_to_vllm`: our own connector class drives this (it forwards vLLM's stats
    and events hooks); False under vLLM's built-in wrapper, which forwards none of them.
    `lookup_client`: how the workers are asked (default: their lookup sockets)."""

    def __init__(self, vllm_config, config, flags: ConnectorFlags, engine_id: str, extra: dict, *,
                 reports_to_vllm: bool = False, lookup_client=None):
        self.config = config
        self.flags = flags
        self.reports_to_vllm = reports_to_vllm
        self.block_size = int(vllm_config.cache_config.block_size)
        _, world_size = parallel_rank_and_size(vllm_config)
        if lookup_client is None:
            timeout_ms = int(extra.get(LOOKUP_TIMEOUT_KEY, DEFAULT_LOOKUP_TIMEOUT_MS))
            lookup_client = LookupClient([socket_address(engine_id, r) for r in range(world_size)], timeout_ms)
        self.lookup_client = lookup_client
        self.leases = SchedulerLeases()
        self._async_requests: set[str] = set()  # looked up, and their hit needs a slow tier
        self._blocks_held: set[str] = set()  # finished requests whose blocks wait for their saves
        self._has_slow_tier = bool((config.local_disk and config.max_local_disk_size > 0) or config.remote_url
                                   or config.mp_host is not None or config.mp_server_urls)  # the server's L2
        self.events: KVEventTracker | None = None
        self._event_requests: dict = {}
        # Only our connector class hands events to vLLM (take_events); its wrapper does not.
        if kv_events_enabled(vllm_config) and reports_to_vllm:
            self.events = KVEventTracker(config.chunk_size, self.block_size, world_size)
        self.metrics = SchedulerMetrics(self.lookup_client, self.events)
        self._standalone_prom = None
        if StandaloneProm.wanted(reports_to_vllm):
            self._standalone_prom = StandaloneProm(vllm_config)
            logger.info("LMCache: recording lmcache:* metrics in PROMETHEUS_MULTIPROC_DIR")
        skip_saves = force_skip_save()
        if skip_saves:
            logger.info("LMCache: saving is off (LMCACHE_FORCE_SKIP_SAVE)")
        role = kv_role_of(vllm_config)
        if role != "kv_both":
            logger.info("LMCache: kv_role=%s: %s", role,
                        "stores, never loads" if role == "kv_producer" else "loads, never stores")
        note_ignored_extra_keys(extra)
        self.planner = SchedulerPlanner(SchedulerPolicy(
            chunk_size=config.chunk_size,
            block_size=self.block_size,
            save_unfull_chunk=save_unfull_chunk_of(config, extra),
            save_decode_cache=config.save_decode_cache,
            min_retrieve_tokens=config.min_retrieve_tokens,
            skip_all_saves=skip_saves or role == "kv_consumer",
            load_enabled=role != "kv_producer",
        ))

    @classmethod
    def from_vllm(cls, vllm_config, config=None, *, async_save: bool = False, async_load: bool = False,
                  reports_to_vllm: bool = False, lookup_client=None) -> "SchedulerConnector":
        """The scheduler half for this vLLM config (`config`: the engine config, default
        from every source lmcache_config_from_vllm reads)."""
        extra = extra_config_of(vllm_config)
        config = config if config is not None else lmcache_config_from_vllm(vllm_config)
        flags = ConnectorFlags.decide(config, extra, async_save=async_save, async_load=async_load)
        return cls(vllm_config, config, flags, engine_id_of(vllm_config), extra, reports_to_vllm=reports_to_vllm,
                   lookup_client=lookup_client)

    # -- lookups --------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int], lease_id: str | None = None, hold_from: int = 0,
               prefetch: bool = False, keys: RequestKeys = PLAIN) -> LookupAnswer:
        """What every rank holds of `tokens`. With `lease_id` the workers hold it until the
        load naming that lease (or its release); chunks ending at or before `hold_from`
        (vLLM's own prefix hit) are checked, not held; `prefetch` reads the chunks outside
        host memory in the background."""
        material = keys.chunk_key_material(self.config.chunk_size, len(tokens))
        keyed = {} if material is None else {"key_material": material}
        start = time.perf_counter()
        hit, runs = self.lookup_client.lookup_with_sources(tokens, lease_id, hold_from, prefetch, **keyed)
        answer = LookupAnswer.of(hit, runs)
        self.metrics.observe_lookup(answer, len(tokens), time.perf_counter() - start, keys.kinds)
        return answer

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        """(tokens LMCache can load beyond vLLM's own hit, whether that load is asynchronous:
        a part of the hit is outside host memory and the workers are reading it)."""
        req_id = request.request_id
        self._async_requests.discard(req_id)
        # The workers hold what they answer until this request's load (or its release).
        lease_id = self.leases.new(req_id)
        wanted = self.planner.admission_lookup(request)
        if wanted is None:
            return 0, False
        tokens, keys = wanted
        answer = self.lookup(tokens, lease_id, num_computed_tokens, self.flags.async_load, keys)
        matched = self.planner.admit(request, num_computed_tokens, answer.hit)
        if not matched:
            return matched, False
        self.metrics.remember_sources(req_id, num_computed_tokens, answer.runs)
        is_async = self.flags.async_load and answer.needs_slow_tier(num_computed_tokens, matched)
        if is_async:
            self._async_requests.add(req_id)
        return matched, is_async

    def may_load_async(self, request) -> bool:
        """Whether `request`'s hit may be loaded asynchronously (vLLM 0.34 asks when the
        request enters its waiting queues, with --max-num-inflight-kv-loads only). Only
        with async loads and a disk or remote tier; then a lookup without a lease says
        whether the hit reaches past host memory (a false positive only holds other async
        loads back until a slot frees; a false negative queues the request as before)."""
        if not (self.flags.async_load and self.planner.policy.load_enabled and self._has_slow_tier):
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
            answer = LookupAnswer.of(*self.lookup_client.lookup_with_sources(tokens, **keyed))
        except Exception:  # noqa: BLE001 - a guess only: the admission lookup decides
            return False
        return answer.needs_slow_tier(0, answer.hit)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        is_async = request.request_id in self._async_requests
        self._async_requests.discard(request.request_id)
        if is_async and num_external_tokens > 0 and blocks is not None:
            # vLLM parks the request; its load is planned now, off the scheduled batch.
            self.planner.after_alloc(request, num_external_tokens, async_block_ids=blocks.get_block_ids()[0])
        else:
            self.planner.after_alloc(request, num_external_tokens)
        if num_external_tokens <= 0:
            self.leases.release(request.request_id)
        if self.events is not None:
            self._event_requests[request.request_id] = request

    # -- each step ------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output) -> LMCacheConnectorMetadata:
        metas = self.planner.build(scheduler_output)
        for r in metas:
            if r.load is not None:
                r.load.lease_id = self.leases.for_load(r.req_id)
        preempted = getattr(scheduler_output, "preempted_req_ids", None)
        for req_id in set(preempted or ()) | set(scheduler_output.finished_req_ids or ()):
            self.leases.release(req_id)
        if metas:
            self.metrics.note_activity()
            if self.events is not None:
                for meta in metas:
                    request = self._event_requests.get(meta.req_id)
                    if meta.save is not None and request is not None:
                        self.events.record_save(request, meta.save)
        if self._standalone_prom is not None:  # vLLM's wrapper calls no stats hook
            stats = self.get_kv_connector_stats()
            if stats is not None:
                self._standalone_prom.observe(vllm_compat.stats_payload(stats))
        return LMCacheConnectorMetadata(metas, preempted, self.leases.take_released())

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        req_id = request.request_id
        self.leases.release(req_id)
        self._async_requests.discard(req_id)
        self.metrics.note_activity()
        self.metrics.forget(req_id)
        self._event_requests.pop(req_id, None)
        had_save = self.planner.finished(request)
        # With async saving, the blocks stay allocated until every worker reports
        # the request's saves done (get_finished).
        delay_free = self.flags.async_save and had_save
        if delay_free:
            self._blocks_held.add(req_id)
        return delay_free, None

    def update_connector_output(self, connector_output) -> None:
        finished_sending = connector_output.finished_sending or ()
        if finished_sending:
            self.metrics.note_activity()
        self._blocks_held.difference_update(finished_sending)

    def has_pending_block_frees(self) -> bool:
        return bool(self._blocks_held)

    # -- metrics and KV events (metrics/) -------------------------------------------
    def get_kv_connector_stats(self):
        # held blocks are ours to count only where our connector class holds them
        stats = self.metrics.take_stats(len(self._blocks_held) if self.reports_to_vllm else None)
        return None if stats.is_empty() else stats

    def get_external_cache_hit_sources(self, request, num_external_tokens: int) -> dict:
        return self.metrics.hit_sources(request.request_id, num_external_tokens)

    def take_events(self) -> list:
        return self.metrics.take_events() if self.events is not None else []

    def shutdown(self) -> None:
        self.lookup_client.close()
