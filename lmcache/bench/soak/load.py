"""The soak's traffic: concurrent clients on a shared prompt pool, and lone probe requests.

Clients draw prompts from `pool` and compare every answer with vLLM alone's answer for
that prompt within bf16 tolerance (a batched request is computed in other pieces). Probe
prompts are sent only one at a time, with the clients paused and vLLM's prefix cache
reset, so the KV LMCache holds for them was computed by a lone request too: a probe that
loaded its whole prefix must equal vLLM alone's own prefix-cache hit at the same split
exactly, and one that loaded nothing must equal vLLM alone's cold answer exactly.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, field

from lmcache.bench.soak.checks import mismatches
from lmcache.testing.tolerances import EXACT_TOLERANCE, LOGPROB_TOLERANCE
from lmcache.bench.workload.clients import Completion, Gate, complete


@dataclass
class Reference:
    cold: Completion  # vLLM alone, nothing cached
    hit: Completion  # vLLM alone, its own prefix cache holding every full block


@dataclass
class Tally:
    requests: int = 0
    failed: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    probes: int = 0
    probes_exact: int = 0
    probe_loaded_tokens: list[int] = field(default_factory=list)
    recent: deque = field(default_factory=lambda: deque(maxlen=6))  # pool prompts served last
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Clients:
    def __init__(self, base_url, model: str, pool: list[list[int]], references: dict[int, Reference],
                 concurrency: int, max_tokens: int, tally: Tally, seed: int = 0):
        self.base_url, self.model, self.pool, self.references = base_url, model, pool, references
        self.max_tokens, self.tally = max_tokens, tally
        self.gate = Gate()
        self._threads = [threading.Thread(target=self._loop, args=(seed + i,), name=f"soak-client-{i}", daemon=True)
                         for i in range(concurrency)]

    def start(self) -> "Clients":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self.gate.stopped.set()
        for t in self._threads:
            t.join(timeout=600)

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.gate.enter():
            try:
                index = rng.randrange(len(self.pool))
                got = complete(self.base_url(), self.model, self.pool[index], self.max_tokens, stream=False)
                self._judge(index, got)
            finally:
                self.gate.leave()

    def _judge(self, index: int, got: Completion) -> None:
        with self.tally.lock:
            self.tally.requests += 1
            if got.error:
                self.tally.failed.append(f"prompt {index}: {got.error}")
                return
            self.tally.recent.append(index)
            problems = mismatches(self.references[index].cold, got, LOGPROB_TOLERANCE, near_ties=True)
            if problems:
                self.tally.wrong.append(f"prompt {index} (batched): {'; '.join(problems[:3])}")


def probe(server, model: str, prompt: list[int], reference: Reference, full_prefix: int, max_tokens: int,
          tally: Tally, label: str, exact: bool = True) -> int:
    """One lone request after vLLM's prefix cache is emptied; returns the tokens LMCache loaded.
    `exact=False` for pool prompts (their stored KV may come from a batched computation)."""
    if not server.reset_prefix_cache():
        tally.wrong.append(f"{label}: vLLM would not reset its prefix cache (blocks still held)")
    before = server.worker_stats()["adapter"]["loaded_tokens"]
    got = complete(server.base_url, model, prompt, max_tokens, stream=False)
    loaded = server.worker_stats()["adapter"]["loaded_tokens"] - before
    with tally.lock:
        tally.requests += 1
        tally.probes += 1
        tally.probe_loaded_tokens.append(loaded)
        if got.error:
            tally.failed.append(f"{label}: {got.error}")
            return loaded
        if exact and loaded in (0, full_prefix):  # the very same split as one of vLLM alone's answers
            expected = reference.hit if loaded else reference.cold
            problems = mismatches(expected, got, EXACT_TOLERANCE)
            tally.probes_exact += 1
        else:  # part of the prefix was evicted: another split, bf16 rounding differs
            problems = mismatches(reference.cold, got, LOGPROB_TOLERANCE, near_ties=True)
        if problems:
            tally.wrong.append(f"{label} (lone, {loaded} tokens loaded): {'; '.join(problems[:3])}")
    return loaded


def references(server, model: str, prompts: list[list[int]], max_tokens: int) -> dict[int, Reference]:
    """vLLM alone's answers: each prompt cold, then again as its own prefix-cache hit."""
    out = {}
    for i, prompt in enumerate(prompts):
        if not server.reset_prefix_cache():
            raise RuntimeError("the vLLM-alone server would not reset its prefix cache")
        cold = complete(server.base_url, model, prompt, max_tokens, stream=False)
        hit = complete(server.base_url, model, prompt, max_tokens, stream=False)
        for what, c in (("cold", cold), ("hit", hit)):
            if c.error:
                raise RuntimeError(f"vLLM alone failed on prompt {i} ({what}): {c.error}")
        out[i] = Reference(cold, hit)
    return out
