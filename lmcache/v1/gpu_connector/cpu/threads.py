"""Host copies spread over torch's CPU thread count, on helper threads that release the GIL.

vLLM's CPU worker binds its OpenMP threads one per core (GOMP_CPU_AFFINITY / KMP_AFFINITY),
the main thread included, and a new thread inherits the affinity of the thread that
creates it: helpers started from the main thread would all share its single core. Each
helper therefore widens its affinity, at start, to every CPU some thread of this process
may run on (the worker's own cores, never another worker's).
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)


def process_cpus() -> set[int]:
    """The CPUs any thread of this process may run on (empty where Linux affinity is unknown)."""
    cpus: set[int] = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                cpus |= os.sched_getaffinity(int(tid))
            except OSError:  # the thread ended meanwhile
                continue
    except (OSError, AttributeError):
        return set()
    return cpus


def widen_affinity() -> None:
    """Let the calling thread run on every CPU of this process (see the module doc)."""
    cpus = process_cpus()
    if not cpus:
        return
    try:
        if os.sched_getaffinity(0) != cpus:
            os.sched_setaffinity(0, cpus)
    except OSError as exc:  # a cpuset that forbids it: the thread stays where it is
        logger.debug("could not widen a helper thread's CPU affinity to %s: %s", sorted(cpus), exc)


@functools.lru_cache(maxsize=None)
def thread_pool(workers: int) -> ThreadPoolExecutor:
    """Helper threads for copies that release the GIL, one pool per size, kept."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmcache-copy", initializer=widen_affinity)


def run_threaded(calls: list) -> None:
    """Run (fn, *args) calls, split over torch's intra-op thread count (they must release the GIL
    and touch disjoint memory)."""
    threads = min(torch.get_num_threads(), len(calls))
    if threads <= 1:
        for fn, *args in calls:
            fn(*args)
        return

    def work(share):
        for fn, *args in share:
            fn(*args)

    shares = [calls[i::threads] for i in range(threads)]
    futures = [thread_pool(threads - 1).submit(work, share) for share in shares[1:]]
    work(shares[0])
    for future in futures:
        future.result()
