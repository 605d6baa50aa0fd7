"""The scheduler's side of LMCache's metrics and KV events.

It counts the lookups the scheduler makes (observe_lookup), remembers which tier holds each hit (for
vLLM's "prompt tokens cached by source"), and, when something happened or half a
second passed, asks every worker for its figures over the lookup channel
(`LookupClient.metrics`). Workers answer running totals; the deltas since the last
answer become one `LMCacheConnectorStats` for vLLM (`take_stats`), and the tiers'
chunk events become vLLM KV events (`take_events`, kv_events.py).

With tensor parallelism every rank moves the same tokens, so token and request
figures come from rank 0; bytes, chunk counts, usage and errors add up over ranks.
"""

from __future__ import annotations

import time
from typing import Sequence

from lmcache.integration.vllm.metrics.stats import LMCacheConnectorStats
from lmcache.integration.vllm.vllm_compat import CacheHitSource

POLL_INTERVAL_S = 0.5
BACKOFF_S = 5.0  # after a rank did not answer: the scheduler must not wait on it every step
MAX_REMEMBERED_LOOKUPS = 8192
TIER_SOURCES = {"cpu": CacheHitSource.HOST, "disk": CacheHitSource.DISK, "remote": CacheHitSource.EXTERNAL_UNSPECIFIED}

# worker total -> (metric key, labels); token figures from rank 0 only
_RANK0 = {
    "load_requests": ("retrieve_requests", ()),
    "loaded_tokens": ("loaded_tokens", ()),
    "load_failed_tokens": ("load_failed_tokens", ()),
    "requested_tokens": ("requested_tokens", ()),
    "save_requests": ("store_requests", ()),
    "saved_tokens": ("stored_tokens", ()),
    "cpu.hit_tokens": ("tier_hit_tokens", ("cpu",)),
    "disk.hit_tokens": ("tier_hit_tokens", ("disk",)),
    "remote.hit_tokens": ("tier_hit_tokens", ("remote",)),
}
_SUMMED = {
    "loaded_bytes": ("loaded_bytes", ()),
    "stored_bytes": ("stored_bytes", ()),
    "no_memory": ("skipped_saves", ("no_memory",)),
    "queue_full": ("skipped_saves", ("queue_full",)),
    "save_failures": ("skipped_saves", ("failed",)),
}
for _tier in ("cpu", "disk", "remote"):
    _SUMMED[f"{_tier}.evicted"] = ("evictions", (_tier,))
    for _cause in ("corrupt", "refused", "tier_down", "dropped"):
        _SUMMED[f"{_tier}.{_cause}"] = ("tier_errors", (_tier, _cause))


class SchedulerMetrics:
    def __init__(self, client, events=None, clock=time.monotonic):
        self._client = client  # asks the workers for their figures (LookupClient.metrics)
        self._events = events  # KVEventTracker or None
        self._clock = clock
        self._pending = LMCacheConnectorStats()
        self._last_totals: dict[int, dict[str, int]] = {}
        self._gauges: dict[int, dict[str, int]] = {}
        self._last_poll = float("-inf")
        self._quiet_until = float("-inf")
        self._activity = False
        self._fresh = False  # a worker answered since the last take_stats
        self._hit_runs: dict[str, tuple[int, tuple | None]] = {}

    # -- lookups ----------------------------------------------------------------------
    def observe_lookup(self, answer, num_tokens: int, seconds: float, kinds: Sequence[str] = ("text",)) -> None:
        """Count one lookup of `num_tokens` tokens and its `LookupAnswer`."""
        self._pending.observe("lookup_seconds", [seconds])
        self._pending.inc("lookup_requests", 1)
        self._pending.inc("lookup_tokens", num_tokens)
        self._pending.inc("lookup_hit_tokens", answer.hit)
        for kind in kinds:  # a request of several kinds counts under each
            self._pending.inc("lookup_requests_by_kind", 1, kind)
            self._pending.inc("lookup_tokens_by_kind", num_tokens, kind)
            self._pending.inc("lookup_hit_tokens_by_kind", answer.hit, kind)

    def remember_sources(self, req_id: str, num_computed_tokens: int, runs) -> None:
        """Keep an admitted lookup's tier runs for `get_external_cache_hit_sources`."""
        if len(self._hit_runs) >= MAX_REMEMBERED_LOOKUPS:
            self._hit_runs.clear()
        self._hit_runs[req_id] = (num_computed_tokens, runs)

    def hit_sources(self, req_id: str, num_external_tokens: int) -> dict[CacheHitSource, int]:
        """Where the tokens [num_computed, num_computed + num_external) come from."""
        computed, runs = self._hit_runs.pop(req_id, (0, None))
        if num_external_tokens <= 0:
            return {}
        if not runs:
            return {CacheHitSource.HOST: num_external_tokens}
        out: dict[CacheHitSource, int] = {}
        lo, hi, pos = computed, computed + num_external_tokens, 0
        for tier, n in runs:
            overlap = min(hi, pos + int(n)) - max(lo, pos)
            if overlap > 0:
                source = TIER_SOURCES.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)
                out[source] = out.get(source, 0) + overlap
            pos += int(n)
        rest = num_external_tokens - sum(out.values())
        if rest > 0:  # the tiers changed between lookup and admission
            out[CacheHitSource.EXTERNAL_UNSPECIFIED] = out.get(CacheHitSource.EXTERNAL_UNSPECIFIED, 0) + rest
        return out

    def forget(self, req_id: str) -> None:
        self._hit_runs.pop(req_id, None)

    # -- the workers' figures ---------------------------------------------------------
    def note_activity(self) -> None:
        """Loads, saves or finished transfers this step: ask the workers this time."""
        self._activity = True

    def poll(self, force: bool = False) -> None:
        now = self._clock()
        if not force and (now < self._quiet_until
                          or not (self._activity or now - self._last_poll >= POLL_INTERVAL_S)):
            return
        self._activity = False
        self._last_poll = now
        for rank, reply in enumerate(self._client.metrics()):
            if not isinstance(reply, dict) or "totals" not in reply:
                # no answer this time: the totals catch up later
                self._quiet_until = self._clock() + BACKOFF_S
                continue
            self._absorb(int(reply.get("rank", rank)), reply)

    def _absorb(self, rank: int, reply: dict) -> None:
        now = {k: v for k, v in reply["totals"].items() if isinstance(v, (int, float))}
        last = self._last_totals.get(rank, {})
        self._last_totals[rank] = now
        for name, value in now.items():
            delta = value - last.get(name, 0)
            if delta < 0:  # the worker restarted
                delta = value
            target = _SUMMED.get(name) or (_RANK0.get(name) if rank == 0 else None)
            if target and delta:
                self._pending.inc(target[0], delta, *target[1])
        samples = reply.get("samples") or {}
        if rank == 0:
            for key in ("load_seconds", "store_seconds"):
                self._pending.observe(key, samples.get(key) or [])
        self._gauges[rank] = dict(reply.get("gauges") or {})
        self._fresh = True
        if self._events is not None and reply.get("events"):
            self._events.on_worker_events(reply["events"])

    # -- what vLLM takes ------------------------------------------------------------
    def take_stats(self, held_requests: int | None = None) -> LMCacheConnectorStats | None:
        self.poll()
        stats, self._pending = self._pending, LMCacheConnectorStats()
        fresh, self._fresh = self._fresh, False
        if fresh:
            for key in ("local_cache_usage", "local_storage_usage"):
                values = [g[key] for g in self._gauges.values() if key in g]
                if values:
                    stats.set(key, sum(values))
        tokens = stats.counter("lookup_tokens")
        if tokens:
            stats.set("lookup_hit_rate", stats.counter("lookup_hit_tokens") / tokens)
        if held_requests is not None and (fresh or not stats.is_empty()):
            stats.set("held_requests", held_requests)
        return stats

    def take_events(self) -> list:
        if self._events is None:
            return []
        self.poll()
        return self._events.take()
