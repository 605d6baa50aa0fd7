"""Helpers shared by the benchmarks: timing, tables, and the final JSON line."""

from __future__ import annotations

import json
import platform as _host
import time
from typing import Callable, Iterable, Sequence


def best_seconds(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """The fastest of `repeat` timed calls (the machine is shared and noisy)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved_best(fns: dict[str, Callable[[], object]], repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Best time of each function, measured in alternating rounds so that noise on
    the machine hits all of them alike (ratios stay meaningful)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def machine_name() -> str:
    return f"{_host.node()} ({_host.machine()}, {_host.processor() or 'unknown cpu'})"


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def emit_result(result: dict) -> None:
    """The LAST line a benchmark prints: one JSON object that scripts and CI read."""
    print(json.dumps(result, sort_keys=False), flush=True)
