"""Loads in the step, and off the step: the worker's half of vLLM's asynchronous load protocol.

The scheduler answers a hit that needs the disk or remote tier as asynchronous
(scheduler/connector.py); vLLM then parks the request (WAITING_FOR_REMOTE_KVS) with its
blocks allocated, and the next step's metadata carries its load marked `async_load`.
`start_async` hands such loads to one background thread, which waits for the lookup's
prefetch (lmcache.v1.leases) and copies the chunks into the request's blocks while the
model runs the other requests. Each step's `finished` reports the loads that are done
as received; positions a load did not fill become load errors in that same step (vLLM
recomputes them). Nothing else touches a parked request's blocks, so the copy needs no
step boundary.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from lmcache.integration.vllm.metadata import ReqMeta

logger = logging.getLogger(__name__)


class Loads:
    def __init__(self, handle, counters, metrics, accounting):
        self._handle = handle
        self._counters = counters
        self._metrics = metrics
        self._accounting = accounting
        self._pool: ThreadPoolExecutor | None = None
        # one entry per submitted batch: its requests and the future of their loaded ends
        self._in_flight: list[tuple[list[ReqMeta], Future]] = []

    @property
    def in_flight(self) -> bool:
        return bool(self._in_flight)

    def load_now(self, loads: list[ReqMeta]) -> None:
        self._accounting.account(loads, self.retrieve(loads))

    def retrieve(self, loads: list[ReqMeta]) -> list[int]:
        """Load these requests; per request the end of the prefix now in its blocks (a
        cache fault is a miss: nothing loaded, the request recomputes)."""
        start = time.perf_counter()
        try:
            loaded = list(self._handle.engine.batched_retrieve([r.load for r in loads]))
        except Exception:  # noqa: BLE001 - a cache fault is a miss, never a failed step
            logger.exception("LMCache: batched retrieve failed; %d request(s) will recompute", len(loads))
            loaded = [0] * len(loads)
        seconds = time.perf_counter() - start
        self._metrics.timing("load_seconds", seconds)
        logger.debug("LMCache: loaded %s tokens for %d request(s) in %.1f ms", loaded, len(loads), seconds * 1000)
        # the engine answers tokens loaded after skip_tokens (cache_engine.py, "Units")
        return [r.load.skip_tokens + n for r, n in zip(loads, loaded)]

    def start_async(self, loads: list[ReqMeta]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-load")
        self._in_flight.append((loads, self._pool.submit(self.retrieve, loads)))
        self._counters.async_loads += len(loads)

    def finished(self) -> set[str]:
        """Requests whose asynchronous load is done (their short parts are now load errors)."""
        done: set[str] = set()
        still: list = []
        for loads, future in self._in_flight:
            if not future.done():
                still.append((loads, future))
                continue
            try:
                ends = future.result()
            except Exception:  # noqa: BLE001 - retrieve already turns faults into misses
                logger.exception("LMCache: an asynchronous load failed; %d request(s) will recompute", len(loads))
                ends = [r.load_from for r in loads]
            self._accounting.account(loads, ends)
            done.update(r.req_id for r in loads)
        self._in_flight = still
        return done

    def wait(self) -> None:
        """Until the loads in flight are done (a cancelled one counts as done); `finished`
        reads their results."""
        wait_futures([future for _, future in self._in_flight])

    def abandon(self) -> None:
        """Sleep mode: the parked requests' blocks are about to lose their contents. Loads
        not started are cancelled, running ones awaited; every parked request is then
        reported done at the next `finished` with all its positions as load errors, so
        that vLLM recomputes them (and frees the blocks of those it aborted)."""
        if not self._in_flight:
            return
        for _, future in self._in_flight:
            future.cancel()
        self.wait()
        abandoned = []
        for loads, _ in self._in_flight:
            nothing: Future = Future()
            nothing.set_result([r.load_from for r in loads])
            abandoned.append((loads, nothing))
        self._in_flight = abandoned
        logger.info("LMCache: %d parked load(s) stopped for sleep mode; vLLM recomputes them",
                    sum(len(loads) for loads, _ in abandoned))

    def stop(self) -> None:
        if self._pool is not None:
            self.wait()
            self._pool.shutdown(wait=True)
            self._pool = None
