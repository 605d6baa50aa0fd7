"""What the soak checks while it runs: outputs against vLLM alone, memory, the disk budget."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lmcache.bench.workload.clients import Completion


def mismatches(reference: Completion, got: Completion, tolerance: float, near_ties: bool = False) -> list[str]:
    """Differences in generated tokens and in the top log-probabilities both report.

    `near_ties`: where the two pick different tokens whose log-probabilities (as the
    reference saw them) lie within `tolerance`, rounding decided a tie: positions up to
    there are compared, the rest (a different context from then on) are not."""
    problems = []
    upto = min(len(reference.token_ids), len(got.token_ids))
    for pos, (a, b) in enumerate(zip(reference.token_ids, got.token_ids)):
        if a != b:
            ref_top = reference.logprobs[pos] if pos < len(reference.logprobs) else {}
            tie = near_ties and a in ref_top and b in ref_top and abs(ref_top[a] - ref_top[b]) <= tolerance
            if not tie:
                problems.append(f"tokens {reference.token_ids} vs {got.token_ids}")
            upto = pos + 1
            break
    if len(reference.token_ids) != len(got.token_ids):
        problems.append(f"{len(reference.token_ids)} vs {len(got.token_ids)} tokens")
    for pos, (ref, cand) in enumerate(zip(reference.logprobs[:upto], got.logprobs[:upto])):
        common = set(ref) & set(cand)
        if not common or len(common) < min(len(ref), len(cand)) - 1:  # a near-tie may swap the last
            problems.append(f"position {pos}: top tokens {sorted(ref)} vs {sorted(cand)}")
        for token in sorted(common):
            if abs(ref[token] - cand[token]) > tolerance:
                problems.append(f"position {pos} token {token}: logprob {ref[token]:.4f} vs {cand[token]:.4f}")
    return problems


def dir_bytes(path: Path) -> int:
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    pass  # evicted while we looked
    except FileNotFoundError:
        return 0
    return total


@dataclass
class Samples:
    peak_rss: int = 0
    peak_disk: int = 0
    disk_over_budget: list[int] = field(default_factory=list)
    samples: int = 0


class Sampler:
    """Every `interval` s: resident memory of the serving processes, bytes in the disk tier."""

    def __init__(self, rss, disk_dir: Path, disk_budget: int, interval: float = 0.25):
        self._rss, self._disk_dir, self._budget, self._interval = rss, disk_dir, disk_budget, interval
        self.samples = Samples()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def sample(self) -> None:
        s = self.samples
        s.peak_rss = max(s.peak_rss, self._rss())
        used = dir_bytes(self._disk_dir)
        s.peak_disk = max(s.peak_disk, used)
        if used > self._budget:
            s.disk_over_budget.append(used)
        s.samples += 1

    def stop(self) -> Samples:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        return self.samples
