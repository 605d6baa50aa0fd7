"""Saving at the end of a step, in the step or on a background thread.

A mixin of the worker half of `LMCacheConnectorV1Impl`. With `async_save` (our own
connector class turns it on), `wait_for_save` only hands the step's stores to one
background thread; a finished request's blocks stay allocated (request_finished
returned True) until `get_finished` reports its saves done, and a preempted request's
saves are awaited before its blocks are reused (handle_preemptions).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

from lmcache.integration.vllm.connector_metadata import transfer_specs
from lmcache.integration.vllm.request_tracker import ReqMeta

logger = logging.getLogger(__name__)


class WorkerSaves:
    def _init_saves(self) -> None:
        self._save_pool: ThreadPoolExecutor | None = None
        self._saves_in_flight: dict[str, list[Future]] = defaultdict(list)
        self._requests_with_saves: set[str] = set()
        self._awaiting_report: set[str] = set()

    def _start_save_pool(self) -> None:
        if self.async_save and self._save_pool is None:
            self._save_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-save")

    def handle_preemptions(self, metadata) -> None:
        # A preempted request's blocks are reused this step: its saves must be done.
        if metadata is not None and metadata.preempted_req_ids & set(self._saves_in_flight):
            self._wait_saves(metadata.preempted_req_ids)

    def wait_for_save(self) -> None:
        md = self._bound()
        if md is None or self.engine is None:
            return
        if self.use_layerwise:
            self._finish_layerwise_saves()
            return
        saves = md.saves
        if not saves:
            return
        if getattr(self, "_kv_asleep", None) is not None:  # asleep: nothing may touch the KV cache
            logger.warning("LMCache: %d save(s) skipped: the KV cache is unregistered (sleep mode)", len(saves))
            return
        if self._save_pool is None:
            self._store(saves)
            return
        future = self._save_pool.submit(self._store, saves)
        for r in saves:
            self._requests_with_saves.add(r.req_id)
            self._saves_in_flight[r.req_id].append(future)

    def _store(self, saves: list[ReqMeta]) -> None:
        specs = transfer_specs(r.save for r in saves)
        start = time.perf_counter()
        try:
            stored = self.engine.batched_store(specs)
        except Exception:  # noqa: BLE001 - a failed save loses cache, never a request
            logger.exception("LMCache: batched store of %d request(s) failed", len(saves))
            self.counters.save_failures += 1
            return
        seconds = time.perf_counter() - start
        self.worker_metrics.timing("store_seconds", seconds)
        logger.debug("LMCache: stored %s tokens for %d request(s) in %.1f ms", stored, len(saves), seconds * 1000)
        self.counters.save_requests += len(saves)
        self.counters.saved_tokens += sum(int(n) for n in stored)

    def _wait_saves(self, req_ids=None) -> None:
        ids = list(self._saves_in_flight) if req_ids is None else [i for i in req_ids if i in self._saves_in_flight]
        for req_id in ids:
            for future in self._saves_in_flight.pop(req_id, []):
                future.result()

    def _finished_saves(self, finished_req_ids: set[str]) -> set[str] | None:
        """Finished requests whose saves are all done (their blocks may be freed)."""
        if self._save_pool is None:
            return None
        self._awaiting_report.update(i for i in finished_req_ids if i in self._requests_with_saves)
        done = set()
        for req_id in list(self._awaiting_report):
            futures = self._saves_in_flight.get(req_id, [])
            if all(f.done() for f in futures):
                self._saves_in_flight.pop(req_id, None)
                self._requests_with_saves.discard(req_id)
                self._awaiting_report.discard(req_id)
                done.add(req_id)
        self.counters.held_requests_released += len(done)
        for req_id in list(self._saves_in_flight):
            self._saves_in_flight[req_id] = [f for f in self._saves_in_flight[req_id] if not f.done()]
            if not self._saves_in_flight[req_id]:
                del self._saves_in_flight[req_id]
        return done or None

    def _stop_save_pool(self) -> None:
        if self._save_pool is not None:
            self._wait_saves()
            self._save_pool.shutdown(wait=True)
            self._save_pool = None
