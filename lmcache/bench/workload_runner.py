"""Drives one running server through the scenarios and measures the measured phases."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lmcache.bench.workload_clients import Completion, complete, run_in_flight
from lmcache.bench.workload_scenarios import Chats, Request, Sizes, TokenSource, long_doc_qa
from lmcache.bench.workload_services import VllmServer


@dataclass
class Phase:
    """What one measured phase of one scenario did on one configuration."""

    completions: list[Completion] = field(default_factory=list)
    prompt_tokens: int = 0
    wall_s: float = 0.0
    warmup_s: float = 0.0
    lmcache_loaded_tokens: int = 0
    lmcache_bytes_moved: int = 0  # loaded + stored
    vllm_prefix_hit_tokens: float = 0.0
    vllm_prefix_query_tokens: float = 0.0
    warmup_errors: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return self.warmup_errors + [c.error for c in self.completions if c.error]


class Counters:
    """LMCache's worker counters and vLLM's prefix-cache metrics, read before and after."""

    def __init__(self, server: VllmServer):
        self.server = server
        self.before = self._read()

    def _read(self) -> tuple:
        stats = self.server.worker_stats()
        loaded = moved = 0
        if stats:
            loaded = stats["adapter"]["loaded_tokens"]
            moved = stats["engine"]["loaded_bytes"] + stats["engine"]["stored_bytes"]
        return (loaded, moved, *self.server.prefix_cache_counters())

    def into(self, phase: Phase) -> None:
        after = self._read()
        d = [a - b for a, b in zip(after, self.before)]
        phase.lmcache_loaded_tokens, phase.lmcache_bytes_moved = int(d[0]), int(d[1])
        phase.vllm_prefix_query_tokens, phase.vllm_prefix_hit_tokens = d[2], d[3]


def _send(server: VllmServer, sizes: Sizes, requests: list[Request]) -> list[Completion]:
    return run_in_flight([lambda r=r: complete(server.base_url, server.model, r.prompt, sizes.max_tokens)
                          for r in requests], sizes.concurrency)


def run_long_doc_qa(server: VllmServer, sizes: Sizes, source: TokenSource) -> Phase:
    warmup, queries = long_doc_qa(sizes, source)
    phase = Phase()
    start = time.perf_counter()
    warm = _send(server, sizes, warmup)
    server.flush()
    phase.warmup_s = time.perf_counter() - start
    counters = Counters(server)
    start = time.perf_counter()
    phase.completions = _send(server, sizes, queries)
    phase.wall_s = time.perf_counter() - start
    counters.into(phase)
    phase.warmup_errors = [c.error for c in warm if c.error]
    phase.prompt_tokens = sum(len(r.prompt) for r in queries)
    return phase


def run_multi_round(server: VllmServer, sizes: Sizes, source: TokenSource) -> Phase:
    chats = Chats(sizes, source)
    phase = Phase()
    counters = None
    for round_index in range(sizes.rounds):
        wave = chats.wave(round_index)
        if round_index == 1:
            server.flush()
            counters = Counters(server)
        start = time.perf_counter()
        done = _send(server, sizes, [r for _, r in wave])
        seconds = time.perf_counter() - start
        for (user, request), completion in zip(wave, done):
            chats.answered(user, request, completion.token_ids)
        if round_index == 0:
            phase.warmup_s = seconds
            phase.warmup_errors = [c.error for c in done if c.error]
            continue
        phase.wall_s += seconds
        phase.completions += done
        phase.prompt_tokens += sum(len(r.prompt) for _, r in wave)
    if counters is not None:
        counters.into(phase)
    return phase


RUNNERS = {"long-doc-qa": run_long_doc_qa, "multi-round": run_multi_round}


def warm_engine(server: VllmServer, source: TokenSource) -> None:
    """The first requests of a fresh engine are slow (allocations, first kernels, LMCache's
    compiled copy loops on first store and first load): not timed."""
    prompt = source.tokens(2 * 256 + 44, "engine-warmup")
    for _ in range(3):  # cold (LMCache stores), then hits from LMCache (loads)
        complete(server.base_url, server.model, prompt, 2)
        server.flush()
        server.reset_prefix_cache()
