"""The worker's figures for vLLM's metrics and KV events, answered over the lookup
channel (`[b"metrics"]`).

vllm-gaudi never calls a connector's worker-side stats or events hooks in a forward
step, so the workers do not report through them on any device: the scheduler asks
every rank (metrics/scheduler.py) and reports from there, which works everywhere.

A reply holds the worker's running totals (the scheduler turns them into deltas, so
a lost reply loses nothing), its tiers' usage, and what happened since the last ask:
the step timings (histogram samples) and, where KV events are on, which chunks the
tiers gained or lost.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, is_dataclass

MAX_SAMPLES = 4096  # per histogram between two asks (the scheduler asks several times a second)
MAX_EVENTS = 65536
_TIERS = ("cpu", "disk", "remote")
SERVER_L2 = "server_l2"  # a hit's run outside the lmcache server's host memory: a pin there reads its L2
_ERROR_CAUSES = ("corrupt", "refused", "tier_down", "dropped")


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
        self.async_loads = 0  # loads run off the step (vLLM parked their requests)

    def to_dict(self) -> dict:
        return dict(vars(self))


def stats_reply(rank: int, world_size: int, flags, saves_in_background: bool, counters, gpu_connector, config,
                engine) -> dict:
    """A worker's answer to the lookup channel's `[b"stats"]` (metrics/worker_stats.py)."""
    out = {"rank": rank, "world_size": world_size, "layerwise": flags.use_layerwise,
           "async_save": saves_in_background, "async_load": flags.async_load,
           "adapter": counters.to_dict(),
           "host_format": getattr(gpu_connector, "host_format_tag", "") or "portable",
           "host_tier_gb": config.max_local_cpu_size if config.local_cpu else 0.0}
    leases = getattr(engine, "leases", None)
    if leases is not None:
        out["leases"] = {"active": len(leases), "held_chunks": leases.held_chunks, "expired": leases.expired,
                         "prefetched": leases.prefetched, "prefetch_stopped": leases.prefetch_stopped}
    storage = getattr(engine, "storage", None)
    if storage is not None and hasattr(storage, "pins"):
        out["host_pins"] = storage.pins()
    if getattr(storage, "cpu", None) is not None:  # bytes of chunks in this process's host tier
        out["host_tier_used_bytes"] = storage.cpu.used_bytes
    engine_stats = getattr(engine, "stats", None)
    if engine_stats is not None:
        if is_dataclass(engine_stats):
            out["engine"] = asdict(engine_stats)
        elif hasattr(engine_stats, "to_dict"):
            out["engine"] = engine_stats.to_dict()
        else:
            out["engine"] = dict(vars(engine_stats))
    return out


class WorkerMetrics:
    def __init__(self, rank: int, collect_events: bool = False):
        self.rank = rank
        self.collect_events = collect_events
        self._lock = threading.Lock()
        self._samples = {"load_seconds": deque(maxlen=MAX_SAMPLES), "store_seconds": deque(maxlen=MAX_SAMPLES)}
        self._events: deque = deque(maxlen=MAX_EVENTS)
        self.events_lost = 0

    def timing(self, key: str, seconds: float) -> None:
        self._samples[key].append(seconds)

    def observe_chunk(self, tier: str, stored: bool, key) -> None:
        """EngineStats observer: a tier gained (stored) or lost a chunk (key None: all of them)."""
        with self._lock:
            if len(self._events) == MAX_EVENTS:
                self.events_lost += 1
            if key is None:
                self._events.append([tier, bool(stored), None, self.rank])
            else:
                self._events.append([tier, bool(stored), key.chunk_hash, int(key.worker_id)])

    def reply(self, counters, engine) -> dict:
        if self.collect_events and engine is not None:
            engine.storage.sync_events()  # a server's tiers tell their events when asked
        with self._lock:
            events, self._events = list(self._events), deque(maxlen=MAX_EVENTS)
        samples = {}
        for key, queue in self._samples.items():
            taken = []
            while queue:
                taken.append(queue.popleft())
            samples[key] = taken
        return {"rank": self.rank, "totals": totals(counters, engine), "gauges": usage(engine),
                "samples": samples, "events": events, "events_lost": self.events_lost}


def totals(counters, engine) -> dict[str, int]:
    """Running totals, flat: adapter counters, bytes moved, per-tier counts."""
    out = {
        "load_requests": counters.load_requests,
        "loaded_tokens": counters.loaded_tokens,
        "load_failed_tokens": counters.load_failed_tokens,
        "requested_tokens": counters.loaded_tokens + counters.load_failed_tokens,
        "save_requests": counters.save_requests,
        "saved_tokens": counters.saved_tokens,
        "save_failures": counters.save_failures,
    }
    stats = getattr(engine, "stats", None)
    if stats is None:
        return out
    snapshot = stats.as_dict()
    tiers = {k[len("tier_"):]: v for k, v in snapshot.items() if k.startswith("tier_")}
    out["loaded_bytes"] = snapshot.get("loaded_bytes", 0)
    out["stored_bytes"] = snapshot.get("stored_bytes", 0)
    tagged_drops = sum(v for k, v in tiers.items() if k.endswith(".dropped"))
    # A drop no tier claims is the engine's: no host memory for the chunk.
    out["no_memory"] = max(0, snapshot.get("misses_dropped", 0) - tagged_drops)
    out["queue_full"] = tiers.get("queue.dropped", 0)
    for tier in _TIERS:
        out[f"{tier}.hit_tokens"] = tiers.get(f"{tier}.hit_tokens", 0)
        out[f"{tier}.evicted"] = tiers.get(f"{tier}.evicted", 0)
        for cause in _ERROR_CAUSES:
            out[f"{tier}.{cause}"] = tiers.get(f"{tier}.{cause}", 0)
    return out


def usage(engine) -> dict[str, int]:
    storage = getattr(engine, "storage", None)
    out = {}
    for key, tier in (("local_cache_usage", "cpu"), ("local_storage_usage", "disk")):
        backend = getattr(storage, tier, None)
        if backend is not None:
            out[key] = int(backend.used_bytes)
    return out


def hit_runs(engine, tokens, hit: int, key_material=None) -> list | None:
    """[[tier, tokens], ...] in prefix order for the first `hit` tokens; None where
    the engine has only the CPU tier (every hit is a host-memory hit)."""
    storage = engine.storage
    if storage.cpu is None and storage.disk is None and storage.remote is None:
        # the tiers are the lmcache server's: its host memory, then whatever its L2 holds
        chunks = list(engine.token_db.chunks(tokens, hit, key_material))
        in_host = sum(c.end - c.start for c in chunks[:storage.host_prefix([c.key for c in chunks])]) if chunks else 0
        return [[tier, n] for tier, n in (("cpu", in_host), (SERVER_L2, hit - in_host)) if n > 0]
    if storage.disk is None and storage.remote is None:
        return None
    runs: list = []
    for chunk in engine.token_db.chunks(tokens, hit, key_material):
        if storage.cpu is not None and storage.cpu.contains(chunk.key):
            tier = "cpu"
        elif storage.disk is not None and storage.disk.contains(chunk.key):
            tier = "disk"
        else:
            tier = "remote"
        n = chunk.end - chunk.start
        if runs and runs[-1][0] == tier:
            runs[-1][1] += n
        else:
            runs.append([tier, n])
    return runs


def clip_runs(runs: list | None, hit: int) -> list | None:
    """`runs` cut to the first `hit` tokens."""
    if runs is None:
        return None
    out, left = [], hit
    for tier, n in runs:
        if left <= 0:
            break
        out.append([tier, min(n, left)])
        left -= n
    return out
