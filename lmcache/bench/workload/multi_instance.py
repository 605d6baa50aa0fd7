"""`bench workload --scenarios multi-instance`: two vLLM instances behind a round-robin
router, each with its own LMCache host tier (private) vs both on one `lmcache server`
(shared), side by side in one run.

Four OpenAI-compatible vLLM servers (separate processes) and one `lmcache server` are up
for the whole run: `private` is instances A and B, each with an in-process host tier;
`shared` is instances A and B whose host tier is the server's shared memory. Both run the
same connector class, chunk size and synchronous loads.

Workload: D documents of L tokens; each document is asked Q questions, one per round; a
round asks about every document once, in a shuffled order. The router has no session
affinity: question q about document d goes to instance (d + q) mod 2, so a document's
successive questions alternate between the instances. Nothing is warmed beforehand: a
document's first question is part of the measured stream in both configurations (with a
private cache, a document read on A is still a miss the first time B is asked about it).

What makes the comparison fair: vLLM's own prefix cache is off on all four instances
(--no-enable-prefix-caching), so every reused token is a hit of the LMCache tier under
test and no instance-level device cache hides (or adds) anything; each host tier (one per
instance, or the server's one) holds every document, so neither side evicts; the same
requests go to both configurations, C in flight, in turns of ROUNDS_PER_TURN batches whose
order rotates, the idle configuration waiting (and each turn waits out vLLM's worker spin).

Host memory of the cached chunks is measured, not estimated: the bytes the host tiers hold
at the end minus at the start (after the engines' warm-up), summed over the two instances'
in-process tiers (`host_tier_used_bytes` of each worker's stats) vs the server's
`l1_chunk_bytes` (its /status).
"""

from __future__ import annotations

import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmcache.bench.workload.clients import Completion, complete, run_in_flight
from lmcache.bench.workload.runner import ROUNDS_PER_TURN, batches, each_server, rotated, warm_engine
from lmcache.bench.workload.scenarios import Sizes, TokenSource
from lmcache.bench.workload.services import VllmServer
from lmcache.bench.workload.tiers import CHUNK_TOKENS, SYNC_LOAD

NAME = "multi-instance"
INSTANCES = 2
BLOCK_TOKENS = 128
# Targets (issue 22): the shared server's hit rate above the private caches', its TTFT p50
# at least 1.5x lower, and host memory about 1x (server) vs 2x (private).
TTFT_P50_TARGET = 1.5
MEMORY_RATIO_TARGET = 1.8  # private bytes / shared bytes at least this (2.0 is one copy per instance)


@dataclass(frozen=True)
class Question:
    doc: int
    round: int
    prompt: list[int]

    @property
    def instance(self) -> int:
        return (self.doc + self.round) % INSTANCES


def questions(sizes: Sizes, source: TokenSource, seed: int = 0) -> list[list[Question]]:
    """One list per round: a question about every document, in a shuffled order."""
    docs = [source.tokens(sizes.doc_tokens, "mi-doc", seed, d) for d in range(sizes.docs)]
    order = random.Random(seed)
    rounds = []
    for r in range(sizes.instance_rounds):
        ds = list(range(sizes.docs))
        order.shuffle(ds)
        rounds.append([Question(d, r, docs[d] + source.tokens(sizes.question_tokens, "mi-question", seed, d, r))
                       for d in ds])
    return rounds


@dataclass
class Side:
    """One configuration: its two instances and how to read its host tiers' bytes."""

    name: str
    label: str
    instances: list[VllmServer]
    host_bytes: Callable[[], int]
    completions: list[Completion] = field(default_factory=list)
    prompt_tokens: int = 0
    wall_s: float = 0.0


def _loaded_tokens(side: Side) -> int:
    return sum(int(s.worker_stats()["adapter"]["loaded_tokens"]) for s in side.instances)


def _private_bytes(instances: list[VllmServer]) -> Callable[[], int]:
    return lambda: sum(int(s.worker_stats()["host_tier_used_bytes"]) for s in instances)


def _round(side: Side, sizes: Sizes, batch: list[Question]) -> None:
    start = time.perf_counter()
    done = run_in_flight([lambda q=q: complete(side.instances[q.instance].base_url, side.instances[q.instance].model,
                                               q.prompt, sizes.max_tokens) for q in batch], sizes.concurrency)
    for s in side.instances:
        s.flush()  # the next question about a document may go to the other instance
    side.wall_s += time.perf_counter() - start
    side.completions += done
    side.prompt_tokens += sum(len(q.prompt) for q in batch)


def _start(stack: ExitStack, model: str, workdir: Path, sizes: Sizes, host_gb: float,
           progress: Callable[[str], None]) -> list[Side]:
    from lmcache.testing.cache_server import CacheServerProcess

    server = CacheServerProcess(l1_gb=host_gb, chunk_size=CHUNK_TOKENS, log_path=workdir / "lmcache-server.log",
                                log_level="WARNING")
    stack.callback(server.stop)
    server.start()
    request = sizes.doc_tokens + sizes.question_tokens + sizes.max_tokens
    max_model_len = -(-request // BLOCK_TOKENS) * BLOCK_TOKENS
    blocks = -(-(sizes.concurrency + 1) * max_model_len // BLOCK_TOKENS) + 1
    settings = {
        "private": {"chunk_size": CHUNK_TOKENS, "local_cpu": True, "max_local_cpu_size": host_gb},
        "shared": {"chunk_size": CHUNK_TOKENS, "mp.host": "127.0.0.1", "mp.port": server.port,
                   "remote_retry_interval": 0.5},
    }
    vllms = {name: [VllmServer(model, workdir, lmcache=keys, device_blocks=blocks, block_size=BLOCK_TOKENS,
                               max_model_len=max_model_len, max_num_batched_tokens=max_model_len,
                               name=f"{name}-{'AB'[i]}", connector_extra=dict(SYNC_LOAD), prefix_caching=False)
                    for i in range(INSTANCES)] for name, keys in settings.items()}
    every = [s for pair in vllms.values() for s in pair]
    progress(f"{NAME}: starting {len(every)} vLLM servers and one lmcache server (L1 {host_gb:g} GB) ...")
    for s in every:
        stack.callback(s.stop)
        s.launch()
    for s in every:
        s.wait_ready()
        progress(f"[{s.name}] ready after {s.start_seconds:.0f} s")

    def server_bytes() -> int:
        return int(server.status()["l1_chunk_bytes"])

    return [Side("private", f"private host tiers ({INSTANCES} in-process, {host_gb:g} GB each)", vllms["private"],
                 _private_bytes(vllms["private"])),
            Side("shared", f"one shared lmcache server ({host_gb:g} GB)", vllms["shared"], server_bytes)]


def run_multi_instance(model: str, workdir: Path, sizes: Sizes, source: TokenSource, host_gb: float,
                       progress: Callable[[str], None]) -> dict[str, dict]:
    """Figures per side: `private` and `shared`."""
    from lmcache.bench.workload.report import percentile

    with ExitStack() as stack:
        sides = _start(stack, model, workdir, sizes, host_gb, progress)
        each_server({s.name: s for side in sides for s in side.instances}, lambda n, s: warm_engine(s, source))
        before = {side.name: (side.host_bytes(), _loaded_tokens(side)) for side in sides}
        k = 0
        for round_questions in questions(sizes, source):
            for turn in batches(batches(round_questions, sizes.concurrency), ROUNDS_PER_TURN):
                for side in rotated(sides, k):
                    for batch in turn:
                        _round(side, sizes, batch)
                    for s in side.instances:
                        s.wait_idle()
                k += 1
        out = {}
        for side in sides:
            ok = [c for c in side.completions if not c.error]
            ttft = [c.ttft for c in ok]
            loaded = _loaded_tokens(side) - before[side.name][1]
            out[side.name] = {
                "label": side.label,
                "requests": len(side.completions),
                "failed": len(side.completions) - len(ok),
                "ttft_p50_s": round(percentile(ttft, 50), 4),
                "ttft_p90_s": round(percentile(ttft, 90), 4),
                "output_tokens_per_s": round(sum(len(c.token_ids) for c in ok) / side.wall_s, 2) if side.wall_s else 0.0,
                "wall_s": round(side.wall_s, 2),
                "lmcache_loaded_tokens": loaded,
                "prompt_tokens": side.prompt_tokens,
                "lmcache_hit_rate": round(loaded / side.prompt_tokens, 4) if side.prompt_tokens else 0.0,
                "host_cached_bytes": side.host_bytes() - before[side.name][0],
                "engine_start_s": [round(s.start_seconds, 1) for s in side.instances],
            }
    return out


def ratios(figures: dict[str, dict]) -> dict:
    """`multi_instance_*_shared_vs_private` figures of the JSON line."""
    private, shared = figures["private"], figures["shared"]

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2) if b else float("inf")

    return {
        "multi_instance_ttft_p50_speedup_shared_vs_private": ratio(private["ttft_p50_s"], shared["ttft_p50_s"]),
        "multi_instance_ttft_p90_speedup_shared_vs_private": ratio(private["ttft_p90_s"], shared["ttft_p90_s"]),
        "multi_instance_throughput_shared_vs_private": ratio(shared["output_tokens_per_s"], private["output_tokens_per_s"]),
        "multi_instance_hit_rate_shared_minus_private": round(shared["lmcache_hit_rate"] - private["lmcache_hit_rate"], 4),
        "multi_instance_host_bytes_private_vs_shared": ratio(private["host_cached_bytes"], shared["host_cached_bytes"]),
    }


def targets_met(figures: dict[str, dict], ratio_figures: dict) -> bool:
    return bool(all(f["failed"] == 0 for f in figures.values())
                and ratio_figures["multi_instance_hit_rate_shared_minus_private"] > 0
                and ratio_figures["multi_instance_ttft_p50_speedup_shared_vs_private"] >= TTFT_P50_TARGET
                and ratio_figures["multi_instance_host_bytes_private_vs_shared"] >= MEMORY_RATIO_TARGET)


def print_figures(figures: dict[str, dict], ratio_figures: dict) -> None:
    from lmcache.console import print_table

    print(f"\n{NAME} ({INSTANCES} vLLM instances, round-robin, vLLM's own prefix cache off on all):")
    rows = [[f["label"], f["ttft_p50_s"] * 1000, f["ttft_p90_s"] * 1000, f["output_tokens_per_s"],
             f"{f['lmcache_hit_rate']:.0%}", f"{f['host_cached_bytes'] / 2**20:.1f}", f"{f['requests']}/{f['failed']}"]
            for f in figures.values()]
    print_table(["configuration", "ttft_p50_ms", "ttft_p90_ms", "out_tok/s", "lmcache_hit", "host_MiB_cached",
                 "requests/failed"], rows)
    print(f"shared vs private: TTFT p50 {ratio_figures['multi_instance_ttft_p50_speedup_shared_vs_private']}x lower "
          f"(target >= {TTFT_P50_TARGET}), p90 {ratio_figures['multi_instance_ttft_p90_speedup_shared_vs_private']}x; "
          f"throughput {ratio_figures['multi_instance_throughput_shared_vs_private']}x; hit rate "
          f"{ratio_figures['multi_instance_hit_rate_shared_minus_private']:+.0%} (target > 0); host bytes private / "
          f"shared {ratio_figures['multi_instance_host_bytes_private_vs_shared']} (target >= {MEMORY_RATIO_TARGET})")
