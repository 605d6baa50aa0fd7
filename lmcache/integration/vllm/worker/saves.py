"""Saving at the end of a step, in the step or on a background thread.

With `async_save` (our own connector class turns it on), `submit` only hands the
step's stores to one background thread; a finished request's blocks stay allocated
(request_finished returned True) until `finished` reports its saves done, and a
preempted request's saves are awaited before its blocks are reused (handle_preemptions).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

from lmcache.integration.vllm.metadata import ReqMeta

logger = logging.getLogger(__name__)


class Saves:
    def __init__(self, handle, counters, metrics, async_save: bool):
        self._handle = handle
        self._counters = counters
        self._metrics = metrics
        self._async = async_save
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: dict[str, list[Future]] = defaultdict(list)
        self._requests_with_saves: set[str] = set()
        self._awaiting_report: set[str] = set()

    @property
    def in_background(self) -> bool:
        return self._pool is not None

    def start(self) -> None:
        if self._async and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-save")

    def handle_preemptions(self, metadata) -> None:
        # A preempted request's blocks are reused this step: its saves must be done.
        if metadata is not None and metadata.preempted_req_ids & set(self._in_flight):
            self.wait(metadata.preempted_req_ids)

    def submit(self, saves: list[ReqMeta]) -> None:
        """This step's saves: stored now, or handed to the background thread."""
        if not saves:
            return
        if self._handle.asleep:  # nothing may touch the KV cache
            logger.warning("LMCache: %d save(s) skipped: the KV cache is unregistered (sleep mode)", len(saves))
            return
        if self._pool is None:
            self.store(saves)
            return
        future = self._pool.submit(self.store, saves)
        for r in saves:
            self._requests_with_saves.add(r.req_id)
            self._in_flight[r.req_id].append(future)

    def store(self, saves: list[ReqMeta]) -> None:
        start = time.perf_counter()
        try:
            stored = self._handle.engine.batched_store([r.save for r in saves])
        except Exception:  # noqa: BLE001 - a failed save loses cache, never a request
            logger.exception("LMCache: batched store of %d request(s) failed", len(saves))
            self._counters.save_failures += 1
            return
        seconds = time.perf_counter() - start
        self._metrics.timing("store_seconds", seconds)
        logger.debug("LMCache: stored %s tokens for %d request(s) in %.1f ms", stored, len(saves), seconds * 1000)
        self._counters.save_requests += len(saves)
        self._counters.saved_tokens += sum(int(n) for n in stored)

    def wait(self, req_ids=None) -> None:
        """Until the saves of `req_ids` (default: all) are done."""
        ids = list(self._in_flight) if req_ids is None else [i for i in req_ids if i in self._in_flight]
        for req_id in ids:
            for future in self._in_flight.pop(req_id, []):
                future.result()

    def finished(self, finished_req_ids: set[str]) -> set[str] | None:
        """Finished requests whose saves are all done (their blocks may be freed)."""
        if self._pool is None:
            return None
        self._awaiting_report.update(i for i in finished_req_ids if i in self._requests_with_saves)
        done = set()
        for req_id in list(self._awaiting_report):
            futures = self._in_flight.get(req_id, [])
            if all(f.done() for f in futures):
                self._in_flight.pop(req_id, None)
                self._requests_with_saves.discard(req_id)
                self._awaiting_report.discard(req_id)
                done.add(req_id)
        self._counters.held_requests_released += len(done)
        for req_id in list(self._in_flight):
            self._in_flight[req_id] = [f for f in self._in_flight[req_id] if not f.done()]
            if not self._in_flight[req_id]:
                del self._in_flight[req_id]
        return done or None

    def stop(self) -> None:
        if self._pool is not None:
            self.wait()
            self._pool.shutdown(wait=True)
            self._pool = None
