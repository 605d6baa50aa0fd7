"""Loads off the step: the worker's half of vLLM's asynchronous load protocol.

A mixin of the worker half of `LMCacheConnectorV1Impl`. The scheduler answers a hit
that needs the disk or remote tier as asynchronous (scheduler_side.py); vLLM then parks
the request (WAITING_FOR_REMOTE_KVS) with its blocks allocated, and the next step's
metadata carries its load marked `async_load`. `start_load_kv` hands such loads to one
background thread, which waits for the lookup's prefetch (lmcache.v1.leases) and copies
the chunks into the request's blocks while the model runs the other requests. Each
step's `get_finished` reports the loads that are done as received; positions a load
did not fill are reported as load errors in that same step (vLLM recomputes them).
Nothing else touches a parked request's blocks, so the copy needs no step boundary.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from lmcache.integration.vllm.connector_metadata import transfer_specs
from lmcache.integration.vllm.request_tracker import ReqMeta

logger = logging.getLogger(__name__)


class WorkerLoads:
    def _init_loads(self) -> None:
        self._load_pool: ThreadPoolExecutor | None = None
        # one entry per submitted batch: its requests and the future of their loaded ends
        self._loads_in_flight: list[tuple[list[ReqMeta], Future]] = []

    def _retrieve(self, loads: list[ReqMeta]) -> list[int]:
        """Load these requests now; per request the end of the prefix now in its blocks
        (a cache fault is a miss: nothing loaded, the request recomputes)."""
        specs = transfer_specs(r.load for r in loads)
        for spec, r in zip(specs, loads):
            spec.lease_id = r.lease_id
        start = time.perf_counter()
        try:
            loaded = list(self.engine.batched_retrieve(specs))
        except Exception:  # noqa: BLE001 - a cache fault is a miss, never a failed step
            logger.exception("LMCache: batched retrieve failed; %d request(s) will recompute", len(loads))
            loaded = [0] * len(loads)
        seconds = time.perf_counter() - start
        self.worker_metrics.timing("load_seconds", seconds)
        logger.debug("LMCache: loaded %s tokens for %d request(s) in %.1f ms", loaded, len(loads), seconds * 1000)
        # the engine answers tokens loaded after skip_tokens (cache_engine.py, "Units")
        return [r.load.skip_tokens + n for r, n in zip(loads, loaded)]

    def _start_async_loads(self, loads: list[ReqMeta]) -> None:
        if self._load_pool is None:
            self._load_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-load")
        self._loads_in_flight.append((loads, self._load_pool.submit(self._retrieve, loads)))
        self.counters.async_loads += len(loads)

    def _finished_loads(self) -> set[str]:
        """Requests whose asynchronous load is done (their short parts are now load errors)."""
        done: set[str] = set()
        still: list = []
        for loads, future in self._loads_in_flight:
            if not future.done():
                still.append((loads, future))
                continue
            try:
                ends = future.result()
            except Exception:  # noqa: BLE001 - _retrieve already turns faults into misses
                logger.exception("LMCache: an asynchronous load failed; %d request(s) will recompute", len(loads))
                ends = [r.load_from for r in loads]
            self._account_loads(loads, ends)
            done.update(r.req_id for r in loads)
        self._loads_in_flight = still
        return done

    def _wait_loads(self) -> None:
        # waits (a cancelled future counts as done); the results are read by the next _finished_loads
        wait_futures([future for _, future in self._loads_in_flight])

    def _abandon_async_loads(self) -> None:
        """Sleep mode: the parked requests' blocks are about to lose their contents. Loads
        not started are cancelled, running ones awaited; every parked request is then
        reported done at the next get_finished with all its positions as load errors, so
        that vLLM recomputes them (and frees the blocks of those it aborted)."""
        if not self._loads_in_flight:
            return
        for _, future in self._loads_in_flight:
            future.cancel()
        self._wait_loads()
        abandoned = []
        for loads, _ in self._loads_in_flight:
            nothing: Future = Future()
            nothing.set_result([r.load_from for r in loads])
            abandoned.append((loads, nothing))
        self._loads_in_flight = abandoned
        logger.info("LMCache: %d parked load(s) stopped for sleep mode; vLLM recomputes them",
                    sum(len(loads) for loads, _ in abandoned))

    def _stop_load_pool(self) -> None:
        if self._load_pool is not None:
            self._wait_loads()
            self._load_pool.shutdown(wait=True)
            self._load_pool = None
