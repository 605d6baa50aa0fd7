"""Drives every configuration's server through a scenario side by side.

Warm-ups (not timed) run on two servers at a time: each vLLM CPU worker computes on one
thread, so two keep both cores busy. The measured requests go in rounds of C (the
concurrency), ROUNDS_PER_TURN of them to one configuration, then the same ones to the next,
C in flight on one server while the others are idle, the order of configurations rotating
from turn to turn, so the machine's noise (other jobs on it) falls on all of them alike.
After each turn the runner waits out vLLM's worker spin (`VllmServer.wait_idle`) so that no
server is measured while the previous one still burns a core. A round's time on a
server includes waiting for that server's queued LMCache writes (`flush`), so background
stores never run into another configuration's round and are charged to their own.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from lmcache.bench.workload.clients import Completion, complete, run_in_flight
from lmcache.bench.workload.scenarios import Chats, Sizes, TokenSource, long_doc_qa
from lmcache.bench.workload.services import VllmServer

WARM_PARALLEL = 2  # servers warmed at once (2 cores, one compute thread each)
FLOOR_ROUNDS = 1
# Rounds of C sent to one server before the next one gets its turn: each turn ends with
# waiting out vLLM's spin (about a second), so two rounds a turn halve that wait.
ROUNDS_PER_TURN = 2


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
    # TTFT of short fresh prompts (question-sized, nothing to load): the serving path's floor
    floor: list[Completion] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return self.warmup_errors + [c.error for c in (*self.completions, *self.floor) if c.error]


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


Servers = dict[str, VllmServer]


def each_server(servers: Servers, job: Callable[[str, VllmServer], object], parallel: int = WARM_PARALLEL) -> dict:
    """`job(name, server)` for every server, `parallel` at a time (untimed work)."""
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {name: pool.submit(job, name, server) for name, server in servers.items()}
        return {name: f.result() for name, f in futures.items()}


def rotated(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


def _send(server: VllmServer, sizes: Sizes, prompts: list[list[int]]) -> list[Completion]:
    return run_in_flight([lambda p=p: complete(server.base_url, server.model, p, sizes.max_tokens)
                          for p in prompts], sizes.concurrency)


def _timed_round(server: VllmServer, sizes: Sizes, prompts: list[list[int]], phase: Phase) -> list[Completion]:
    start = time.perf_counter()
    done = _send(server, sizes, prompts)
    server.flush()
    phase.wall_s += time.perf_counter() - start
    phase.completions += done
    phase.prompt_tokens += sum(len(p) for p in prompts)
    return done


def _warm(server: VllmServer, sizes: Sizes, prompts: list[list[int]], phase: Phase) -> list[Completion]:
    start = time.perf_counter()
    done = _send(server, sizes, prompts)
    server.flush()
    phase.warmup_s = time.perf_counter() - start
    phase.warmup_errors = [c.error for c in done if c.error]
    server.wait_idle()
    return done


def run_long_doc_qa(servers: Servers, sizes: Sizes, source: TokenSource) -> dict[str, Phase]:
    warmup, queries = long_doc_qa(sizes, source)
    phases = {name: Phase() for name in servers}
    each_server(servers, lambda n, s: _warm(s, sizes, [r.prompt for r in warmup], phases[n]))
    counters = {name: Counters(s) for name, s in servers.items()}
    names = list(servers)
    for k, turn in enumerate(batches(batches(queries, sizes.concurrency), ROUNDS_PER_TURN)):
        for name in rotated(names, k):
            for batch in turn:
                _timed_round(servers[name], sizes, [r.prompt for r in batch], phases[name])
            servers[name].wait_idle()
    for name, c in counters.items():
        c.into(phases[name])
    _measure_floor(servers, sizes, source, phases)
    return phases


def _measure_floor(servers: Servers, sizes: Sizes, source: TokenSource, phases: dict[str, Phase]) -> None:
    """Rounds of C short fresh prompts, alternated like the measured rounds: what a request
    costs with (almost) nothing to compute or load."""
    names = list(servers)
    for k in range(FLOOR_ROUNDS):
        prompts = [source.tokens(sizes.question_tokens, "floor", k, i) for i in range(sizes.concurrency)]
        for name in rotated(names, k):
            phases[name].floor += _send(servers[name], sizes, prompts)
            servers[name].wait_idle()


def run_multi_round(servers: Servers, sizes: Sizes, source: TokenSource) -> dict[str, Phase]:
    # one Chats per server (the same seed: the same users in the same order everywhere);
    # each server's histories hold its own answers
    chats = {name: Chats(sizes, source) for name in servers}
    phases = {name: Phase() for name in servers}

    def first_round(name: str, server: VllmServer) -> None:
        wave = chats[name].wave(0)
        done = _warm(server, sizes, [r.prompt for _, r in wave], phases[name])
        for (user, request), completion in zip(wave, done):
            chats[name].answered(user, request, completion.token_ids)

    each_server(servers, first_round)
    counters = {name: Counters(s) for name, s in servers.items()}
    names, k = list(servers), 0
    for round_index in range(1, sizes.rounds):
        waves = {name: chats[name].wave(round_index) for name in servers}
        for turn in batches(batches(list(range(sizes.users)), sizes.concurrency), ROUNDS_PER_TURN):
            for name in rotated(names, k):
                for part in turn:
                    batch = [waves[name][i] for i in part]
                    done = _timed_round(servers[name], sizes, [r.prompt for _, r in batch], phases[name])
                    for (user, request), completion in zip(batch, done):
                        chats[name].answered(user, request, completion.token_ids)
                servers[name].wait_idle()
            k += 1
    for name, c in counters.items():
        c.into(phases[name])
    return phases


RUNNERS = {"long-doc-qa": run_long_doc_qa, "multi-round": run_multi_round}


def warm_engine(server: VllmServer, source: TokenSource) -> None:
    """The first requests of a fresh engine are slow (allocations, first kernels, LMCache's
    compiled copy loops on first store and first load): not timed."""
    prompt = source.tokens(2 * 256 + 44, "engine-warmup")
    for _ in range(3):  # cold (LMCache stores), then hits from LMCache (loads)
        complete(server.base_url, server.model, prompt, 2)
        server.flush()
        server.reset_prefix_cache()
