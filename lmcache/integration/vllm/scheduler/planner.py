"""Scheduler-side bookkeeping: which tokens of which request to load and to save.

Pure logic over vLLM's scheduler objects (`Request`, `SchedulerOutput`); it never
touches KV tensors, so it is unit-tested with plain stand-ins.

Per request we keep the scheduler's `Request` (its `all_token_ids` grow with the
outputs), its block list, and how many prefix tokens LMCache already holds. Each step
turns into at most one load (the first step a request is scheduled after a hit) and at
most one save (tokens whose KV is complete after this step, chunk-aligned):

    slot(i) = block_ids[i // block_size] * block_size + i % block_size

Slot mappings cover the request's tokens from position 0; positions that must not be
touched (vLLM already holds them, or they are beyond what the step moves) carry -1.
Lookups and plans of a request with media, a LoRA adapter or a cache salt carry its
per-chunk key material (request_keys.py); prompt embeddings are neither looked up nor saved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from lmcache.integration.vllm.config import SKIP_SAVE_PARAM, truthy
from lmcache.integration.vllm.metadata import ReqMeta
from lmcache.integration.vllm.request_keys import PLAIN, RequestKeys, Uncacheable, request_keys
from lmcache.v1.cache_engine import TransferSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerPolicy:
    chunk_size: int
    block_size: int
    save_unfull_chunk: bool = False
    save_decode_cache: bool = False
    min_retrieve_tokens: int = 0
    skip_all_saves: bool = False  # kv_consumer, LMCACHE_FORCE_SKIP_SAVE
    load_enabled: bool = True  # False for kv_producer: it stores and never loads

    def __post_init__(self):
        if self.chunk_size <= 0 or self.block_size <= 0:
            raise ValueError(
                f"chunk_size={self.chunk_size} and block_size={self.block_size}: both must be > 0"
            )

    def chunk_floor(self, n: int) -> int:
        return n // self.chunk_size * self.chunk_size


@dataclass
class _LookupResult:
    lmcache_hit: int  # prefix tokens LMCache holds for the request's tokens
    vllm_cached: int  # tokens vLLM holds locally (what it passed to us)
    num_external: int  # tokens we offered to load


@dataclass
class _PendingLoad:
    lmcache_hit: int
    start: int
    end: int


@dataclass
class RequestTracker:
    req_id: str
    request: Any  # vLLM's scheduler-side Request (None when we never saw it)
    prompt_token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    saved_tokens: int = 0  # prefix tokens LMCache holds (chunk-aligned, or the whole prompt)
    skip_save: bool = False
    pending_load: _PendingLoad | None = None
    had_save: bool = False
    keys: RequestKeys = PLAIN

    def key_material(self, chunk_size: int, num_tokens: int) -> list[bytes | None] | None:
        return self.keys.chunk_key_material(chunk_size, num_tokens)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self) -> Sequence[int]:
        if self.request is not None:
            return self.request.all_token_ids
        return self.prompt_token_ids


def request_skips_save(request) -> bool:
    params = getattr(request, "kv_transfer_params", None) or {}
    return truthy(params.get(SKIP_SAVE_PARAM, False))


def slot_mapping(block_ids: Sequence[int], block_size: int, start: int, end: int, length: int) -> torch.Tensor:
    """Slots of positions [start, end) from the block list; -1 elsewhere in [0, length)."""
    slots = torch.full((length,), -1, dtype=torch.long)
    if end > start:
        needed = (end - 1) // block_size + 1
        if needed > len(block_ids):
            raise ValueError(
                f"positions up to {end} need {needed} blocks of {block_size}, the request has {len(block_ids)}"
            )
        positions = torch.arange(start, end, dtype=torch.long)
        blocks = torch.as_tensor(block_ids[:needed], dtype=torch.long)
        slots[start:end] = blocks[positions // block_size] * block_size + positions % block_size
    return slots


class SchedulerPlanner:
    """Per request: what LMCache holds of it, and each step's load and save plans."""

    def __init__(self, policy: SchedulerPolicy):
        self.policy = policy
        self._trackers: dict[str, RequestTracker] = {}
        self._lookups: dict[str, _LookupResult] = {}
        self._async_loads: list[str] = []  # parked requests whose load the next build plans
        self._warned_reasons: set[str] = set()

    # -- admission ------------------------------------------------------------
    def admission_lookup(self, request) -> tuple[Sequence[int], RequestKeys] | None:
        """What to look up for `request` at admission: its tokens and extra keys; None
        when nothing is (loads are off, or the request stays uncacheable)."""
        if not self.policy.load_enabled:
            return None
        keys = self._keys_or_none(request)
        if keys is None:
            return None
        return request.all_token_ids[:int(request.num_tokens)], keys  # one copy (a list slice)

    def admit(self, request, num_computed_tokens: int, lmcache_hit: int) -> int:
        """Tokens beyond `num_computed_tokens` that LMCache can load, given the lookup's
        hit. No side effects on vLLM; remembers the answer for `after_alloc`."""
        num_tokens = int(request.num_tokens)
        hit = max(0, min(int(lmcache_hit), num_tokens))
        # vLLM must compute at least the last token to sample from it.
        usable = min(hit, num_tokens - 1)
        num_external = usable - num_computed_tokens
        if num_external <= 0 or num_external < self.policy.min_retrieve_tokens:
            num_external = 0
        self._lookups[request.request_id] = _LookupResult(hit, num_computed_tokens, num_external)
        return num_external

    def num_new_matched_tokens(self, request, num_computed_tokens: int,
                               lookup: Callable[..., int]) -> int:
        """`admission_lookup`, `lookup(tokens)` (a text-only request) or `lookup(tokens,
        keys)`, then `admit`."""
        wanted = self.admission_lookup(request)
        if wanted is None:
            return 0
        tokens, keys = wanted
        hit = lookup(tokens) if keys.is_plain else lookup(tokens, keys)
        return self.admit(request, num_computed_tokens, hit)

    def _keys_or_none(self, request) -> RequestKeys | None:
        """The request's extra keys; None (said once per reason) when it stays uncacheable."""
        try:
            return request_keys(request)
        except Uncacheable as exc:
            reason = str(exc)
            if reason not in self._warned_reasons:
                self._warned_reasons.add(reason)
                logger.info("LMCache skips requests for which %s", reason)
            return None

    def after_alloc(self, request, num_external_tokens: int, async_block_ids: Sequence[int] | None = None) -> None:
        """`async_block_ids`: vLLM parked the request to load asynchronously; these are its
        blocks (it is not in the next scheduler output's batch)."""
        req_id = request.request_id
        tracker = self._trackers.get(req_id)
        if tracker is None:
            keys = self._keys_or_none(request)
            tracker = RequestTracker(
                req_id=req_id,
                request=request,
                prompt_token_ids=list(request.prompt_token_ids or []),
                skip_save=self.policy.skip_all_saves or request_skips_save(request) or keys is None,
                keys=keys or PLAIN,
            )
            self._trackers[req_id] = tracker
        tracker.request = request
        looked = self._lookups.pop(req_id, None)
        tracker.pending_load = None
        if looked is None:
            if num_external_tokens > 0:
                logger.warning("LMCache: vLLM asked to load %d tokens of %s without a lookup; ignored",
                               num_external_tokens, req_id)
            return
        # LMCache holds [0, hit): nothing there needs saving again.
        tracker.saved_tokens = max(tracker.saved_tokens, looked.lmcache_hit)
        if num_external_tokens > 0:
            end = min(looked.vllm_cached + num_external_tokens, looked.lmcache_hit)
            tracker.pending_load = _PendingLoad(looked.lmcache_hit, looked.vllm_cached, end)
            if async_block_ids is not None:
                tracker.block_ids = list(async_block_ids)
                self._async_loads.append(req_id)

    # -- each step --------------------------------------------------------------
    def build(self, scheduler_output) -> list[ReqMeta]:
        metas: list[ReqMeta] = []
        for req_id in scheduler_output.finished_req_ids or ():
            self._trackers.pop(req_id, None)
            self._lookups.pop(req_id, None)
        spec_tokens = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
        parked, self._async_loads = self._async_loads, []
        for req_id in parked:
            tracker = self._trackers.get(req_id)
            pending = tracker.pending_load if tracker is not None else None
            if pending is None or pending.end <= pending.start:
                continue
            tracker.pending_load = None
            meta = ReqMeta(req_id, load=self._load_plan(tracker, tracker.token_ids(), pending),
                           load_from=pending.start, load_to=pending.end, async_load=True)
            metas.append(meta)

        for new in scheduler_output.scheduled_new_reqs:
            tracker = self._trackers.get(new.req_id)
            if tracker is None:
                # Never offered to us (e.g. vLLM skipped the connector for it). Without the
                # Request its cache_salt is unknown: a save could hand its KV to other tenants.
                tracker = RequestTracker(new.req_id, None, list(new.prompt_token_ids or []), skip_save=True)
                self._trackers[new.req_id] = tracker
            tracker.block_ids = list(new.block_ids[0]) if new.block_ids else []
            meta = self._plan(tracker, new.num_computed_tokens,
                              scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
                              - len(spec_tokens.get(new.req_id, ())))
            if meta is not None:
                metas.append(meta)

        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or set()
        for i, req_id in enumerate(cached.req_ids):
            tracker = self._trackers.get(req_id)
            if tracker is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in resumed:
                # A preempted request lost its blocks: its list starts over.
                tracker.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                tracker.block_ids.extend(new_blocks[0])
            meta = self._plan(tracker, cached.num_computed_tokens[i],
                              scheduler_output.num_scheduled_tokens.get(req_id, 0)
                              - len(spec_tokens.get(req_id, ())))
            if meta is not None:
                metas.append(meta)
        return metas

    def _plan(self, tracker: RequestTracker, computed_before: int, num_scheduled: int) -> ReqMeta | None:
        meta = ReqMeta(tracker.req_id)
        pending, tracker.pending_load = tracker.pending_load, None
        tokens = tracker.token_ids()
        if pending is not None and pending.end > pending.start:
            meta.load = self._load_plan(tracker, tokens, pending)
            meta.load_from, meta.load_to = pending.start, pending.end
        meta.save = self._save_plan(tracker, tokens, computed_before + max(num_scheduled, 0))
        if meta.load is None and meta.save is None:
            return None
        return meta

    def _load_plan(self, tracker: RequestTracker, tokens: Sequence[int], pending: _PendingLoad) -> TransferSpec:
        hit = min(pending.lmcache_hit, len(tokens))
        return TransferSpec(
            tokens=torch.as_tensor(list(tokens[:hit]), dtype=torch.long),
            slot_mapping=slot_mapping(tracker.block_ids, self.policy.block_size, pending.start, pending.end, hit),
            skip_tokens=self.policy.chunk_floor(pending.start),
            num_tokens=hit,
            key_material=tracker.key_material(self.policy.chunk_size, hit),
        )

    def _save_plan(self, tracker: RequestTracker, tokens: Sequence[int], computed_after: int) -> TransferSpec | None:
        if tracker.skip_save:
            return None
        policy = self.policy
        limit = len(tokens) if policy.save_decode_cache and tracker.request is not None else tracker.prompt_len
        end = min(computed_after, limit, len(tokens))
        save_end = policy.chunk_floor(end)
        if policy.save_unfull_chunk and end == tracker.prompt_len and end > save_end:
            save_end = end  # the prompt's last, partial chunk
        if save_end <= tracker.saved_tokens:
            return None
        skip = policy.chunk_floor(tracker.saved_tokens)
        tracker.saved_tokens = save_end
        tracker.had_save = True
        return TransferSpec(
            tokens=torch.as_tensor(list(tokens[:save_end]), dtype=torch.long),
            slot_mapping=slot_mapping(tracker.block_ids, policy.block_size, skip, save_end, save_end),
            skip_tokens=skip,
            num_tokens=save_end,
            key_material=tracker.key_material(policy.chunk_size, save_end),
        )

    # -- the end ----------------------------------------------------------------
    def finished(self, request) -> bool:
        """Forget a finished request; True if any save was planned for it."""
        tracker = self._trackers.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)
        return bool(tracker and tracker.had_save)

    def tracked_request_ids(self) -> set[str]:
        return set(self._trackers)
