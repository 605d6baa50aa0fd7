"""The scheduler half of `LMCacheConnectorV1Impl` (vLLM's EngineCore process).

It plans (request_tracker.SchedulerPlanner) and asks the workers for hits over their
lookup sockets (lookup_channel): with tensor parallelism a prefix is a hit only as far
as every rank holds it.
"""

from __future__ import annotations

import logging

from lmcache.integration.vllm.connector_metadata import LMCacheConnectorMetadata
from lmcache.integration.vllm.lookup_channel import LookupClient, socket_address
from lmcache.integration.vllm.request_tracker import SchedulerPlanner, SchedulerPolicy
from lmcache.integration.vllm.scheduler_leases import SchedulerLeases
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


class SchedulerSide:
    """Mixin of LMCacheConnectorV1Impl: everything vLLM calls in the scheduler process."""

    def _init_scheduler(self, vllm_config, extra: dict) -> None:
        _, world_size = parallel_rank_and_size(vllm_config)
        timeout_ms = int(extra.get(LOOKUP_TIMEOUT_KEY, DEFAULT_LOOKUP_TIMEOUT_MS))
        self._lookup_client = LookupClient(
            [socket_address(self._engine_id, r) for r in range(world_size)], timeout_ms
        )
        role = kv_role_of(vllm_config)
        self._leases = SchedulerLeases()
        self._lookup_lease: str | None = None  # the lease id of the lookup in progress
        self._lookup_hold_from = 0  # ... and vLLM's own prefix hit (not held by the workers)
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

    def _leased_lookup(self, tokens) -> int:
        return self._lookup_client.lookup(tokens, self._lookup_lease, self._lookup_hold_from)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int | None:
        # The workers hold what they answer until this request's load (or its release).
        self._lookup_lease = self._leases.new(request.request_id)
        self._lookup_hold_from = num_computed_tokens
        try:
            return self._planner.num_new_matched_tokens(request, num_computed_tokens)
        finally:
            self._lookup_lease = None

    def update_state_after_alloc(self, request, num_external_tokens: int) -> None:
        self._planner.after_alloc(request, num_external_tokens)
        if num_external_tokens <= 0:
            self._leases.release(request.request_id)

    def build_connector_meta(self, scheduler_output) -> LMCacheConnectorMetadata:
        requests = self._planner.build(scheduler_output)
        for r in requests:
            if r.load is not None:
                r.lease_id = self._leases.for_load(r.req_id)
        preempted = getattr(scheduler_output, "preempted_req_ids", None)
        for req_id in set(preempted or ()) | set(scheduler_output.finished_req_ids or ()):
            self._leases.release(req_id)
        return LMCacheConnectorMetadata(requests, preempted, self._leases.take_released())

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        self._leases.release(request.request_id)
        had_save = self._planner.finished(request)
        # With async saving, the blocks stay allocated until every worker reports
        # the request's saves done (get_finished).
        return (self.async_save and had_save), None

    def _shutdown_scheduler(self) -> None:
        self._lookup_client.close()
