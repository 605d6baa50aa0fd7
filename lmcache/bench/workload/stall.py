"""The `stall` scenario: what a long load from the disk tier does to requests already decoding.

On two LMCache-disk servers (our LMCacheConnectorV1Dynamic with "async_load" false and
true; the disk tier alone, so a hit can only come from disk): a long prefix of P tokens is
computed once and written to disk, and vLLM's own prefix cache is reset, so only the disk
holds it. Measured, one server at a time (the order alternating between repetitions): S
streams decode short prompts; once each has produced a few tokens, one more request (the
prefix and a few tokens of its own) arrives and LMCache loads the prefix from disk. The
load window runs from that request's sending to its first token. Per configuration:
decode tokens/s of the streams during the window and before it, the longest gap between
two tokens of one stream that overlaps the window, and the loading request's TTFT.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lmcache.bench.workload.clients import Completion, complete
from lmcache.bench.workload.runner import each_server, rotated
from lmcache.bench.workload.scenarios import STALL_LOADER_TOKENS, STALL_SUFFIX_TOKENS, Sizes, TokenSource
from lmcache.bench.workload.services import VllmServer

BEFORE_TOKENS = 6  # tokens each stream has produced before the loading request goes out
SYNC, ASYNC = "disk", "disk-async"  # the two configurations (tiers.py)


@dataclass
class StallRun:
    """One repetition on one server."""

    tps_before: float = 0.0
    tps_during: float = 0.0
    max_gap_before_s: float = 0.0
    max_gap_during_s: float = 0.0
    window_s: float = 0.0
    loader_ttft_s: float = 0.0
    loaded_tokens: int = 0
    streams_outlasted_window: bool = True
    errors: list[str] = field(default_factory=list)


def _prefix(sizes: Sizes, source: TokenSource) -> list[int]:
    return source.tokens(sizes.stall_prefix_tokens, "stall-prefix")


def prepare(servers: dict[str, VllmServer], sizes: Sizes, source: TokenSource) -> dict[str, list[str]]:
    """Compute the long prefix on each server, wait for its disk write, drop it from vLLM's cache."""
    prefix = _prefix(sizes, source)

    def store(name: str, server: VllmServer) -> list[str]:
        done = complete(server.base_url, server.model, prefix, 1)
        server.flush()
        if not server.reset_prefix_cache():
            return ["POST /reset_prefix_cache refused: the prefix may still be in vLLM's own cache"]
        return [done.error] if done.error else []

    return each_server(servers, store)


def _loaded_tokens(server: VllmServer) -> int:
    stats = server.worker_stats()
    return int(stats["adapter"]["loaded_tokens"]) if stats else 0


def tokens_in(times: list[float], lo: float, hi: float) -> int:
    return sum(1 for t in times if lo < t <= hi)


def max_gap(times: list[float], lo: float, hi: float) -> float:
    """Longest gap between consecutive tokens that overlaps (lo, hi]."""
    gaps = [b - a for a, b in zip(times, times[1:]) if b > lo and a < hi]
    return max(gaps, default=0.0)


def measure_once(server: VllmServer, sizes: Sizes, source: TokenSource, rep: int) -> StallRun:
    run = StallRun()
    streams = [Completion() for _ in range(sizes.stall_streams)]
    prompts = [source.tokens(sizes.stall_stream_prompt_tokens, "stall-stream", rep, i) for i in range(len(streams))]
    loader_prompt = _prefix(sizes, source) + source.tokens(STALL_SUFFIX_TOKENS, "stall-suffix", rep)
    loaded_before = _loaded_tokens(server)
    with ThreadPoolExecutor(max_workers=len(streams) + 1) as pool:
        futures = [pool.submit(complete, server.base_url, server.model, p, sizes.stall_stream_tokens, out=out)
                   for p, out in zip(prompts, streams)]
        deadline = time.monotonic() + 300
        while any(len(s.token_times) < BEFORE_TOKENS for s in streams) and not all(f.done() for f in futures):
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        sent = time.perf_counter()
        loader = complete(server.base_url, server.model, loader_prompt, STALL_LOADER_TOKENS)
        for f in futures:
            f.result()
    run.errors = [c.error for c in (*streams, loader) if c.error]
    if run.errors:
        return run
    first = loader.sent_at + loader.ttft
    run.loader_ttft_s, run.window_s = loader.ttft, first - sent
    # "before": from every stream's second token (the first one is its own prefill) to the sending
    since = max(s.token_times[1] for s in streams)
    run.tps_before = sum(tokens_in(s.token_times, since, sent) for s in streams) / max(sent - since, 1e-9)
    run.tps_during = sum(tokens_in(s.token_times, sent, first) for s in streams) / max(first - sent, 1e-9)
    run.max_gap_before_s = max(max_gap(s.token_times[1:], since, sent) for s in streams)
    run.max_gap_during_s = max(max_gap(s.token_times, sent, first) for s in streams)
    run.streams_outlasted_window = all(s.token_times[-1] >= first for s in streams)
    run.loaded_tokens = _loaded_tokens(server) - loaded_before
    return run


def run_stall(servers: dict[str, VllmServer], sizes: Sizes, source: TokenSource) -> dict[str, dict]:
    """Per configuration, the figures of `sizes.stall_reps` repetitions."""
    prep_errors = prepare(servers, sizes, source)
    for server in servers.values():
        server.wait_idle()
    runs: dict[str, list[StallRun]] = {name: [] for name in servers}
    names = list(servers)
    for rep in range(sizes.stall_reps):
        for name in rotated(names, rep):
            if rep:  # the last repetition left the prefix in vLLM's own cache
                servers[name].reset_prefix_cache()
            runs[name].append(measure_once(servers[name], sizes, source, rep))
            servers[name].wait_idle()
    return {name: _figures(runs[name], prep_errors[name], sizes) for name in servers}


def _figures(runs: list[StallRun], prep_errors: list[str], sizes: Sizes) -> dict:
    ok = [r for r in runs if not r.errors]
    failures = prep_errors + [e for r in runs for e in r.errors]

    def mean(values: list[float]) -> float:
        return round(statistics.fmean(values), 4) if values else float("nan")

    return {
        "repetitions": len(runs), "failed": len(failures), "errors": failures[:3],
        "prefix_tokens": sizes.stall_prefix_tokens, "streams": sizes.stall_streams,
        "decode_tps_before": mean([r.tps_before for r in ok]),
        "decode_tps_during_load": mean([r.tps_during for r in ok]),
        "max_gap_before_s": round(max((r.max_gap_before_s for r in ok), default=float("nan")), 4),
        "max_gap_during_load_s": round(max((r.max_gap_during_s for r in ok), default=float("nan")), 4),
        "load_window_s": mean([r.window_s for r in ok]),
        "loader_ttft_s": mean([r.loader_ttft_s for r in ok]),
        "lmcache_loaded_tokens": sum(r.loaded_tokens for r in ok),
        "streams_outlasted_window": all(r.streams_outlasted_window for r in ok),
    }


def stall_ratios(stall: dict[str, dict]) -> dict:
    sync, asyn = stall.get(SYNC), stall.get(ASYNC)
    if not sync or not asyn:
        return {}

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2) if b else float("inf")

    return {
        "stall_decode_tps_async_vs_sync": ratio(asyn["decode_tps_during_load"], sync["decode_tps_during_load"]),
        "stall_max_gap_sync_vs_async": ratio(sync["max_gap_during_load_s"], asyn["max_gap_during_load_s"]),
        "stall_loader_ttft_async_vs_sync": ratio(asyn["loader_ttft_s"], sync["loader_ttft_s"]),
    }

