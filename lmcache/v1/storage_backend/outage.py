"""When a remote server is down: a miss, ONE log line per outage, and back-off.

The first failure marks the server down; until the back-off has passed the tier
is not asked (each skipped call is a `tier_down` miss, so requests never wait
on a dead server). The back-off doubles from `first_retry` up to
`retry_interval`; the first call that works again logs one line and resets it.
"""

from __future__ import annotations

import logging
import threading
import time

from lmcache.v1.storage_backend.stats import EngineStats


class Outage:
    def __init__(self, what: str, logger: logging.Logger, stats: EngineStats, retry_interval: float,
                 first_retry: float = 0.25):
        self.what = what
        self._logger = logger
        self._stats = stats
        self.retry_interval = retry_interval
        self._first = min(first_retry, retry_interval)
        self._backoff = self._first
        self._down = False
        self._down_until = 0.0
        self._lock = threading.Lock()

    @property
    def is_down(self) -> bool:
        return self._down

    def usable(self) -> bool:
        """False (and a tier_down miss counted) while backing off."""
        if self._down and time.monotonic() < self._down_until:
            self._stats.miss("tier_down")
            return False
        return True

    def failed(self, exc: BaseException) -> None:
        self._stats.miss("tier_down")
        with self._lock:
            if self._down:
                self._backoff = min(self._backoff * 2, self.retry_interval)
                self._down_until = time.monotonic() + self._backoff
                return
            self._down = True
            self._backoff = self._first
            self._down_until = time.monotonic() + self._backoff
        self._logger.warning(
            "remote tier %s unreachable (%s: %s): treated as misses, retrying with back-off up to %.1fs",
            self.what, type(exc).__name__, exc, self.retry_interval,
        )

    def worked(self) -> None:
        if not self._down:
            return
        with self._lock:
            was_down, self._down = self._down, False
            self._backoff = self._first
        if was_down:
            self._logger.warning("remote tier %s reachable again", self.what)
