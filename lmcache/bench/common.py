"""Helpers shared by the benchmarks: timing and the machine's name (what they print:
lmcache/console.py)."""

from __future__ import annotations

import platform as _host
import time
from typing import Callable


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
