"""The server's tier events for this engine's chunks, told to this process's observers.

In process, the tiers tell the engine's EngineStats observers (vLLM's KV events) which
chunks they stored and lost. With the host tier in the server, the server's tiers do
that, for every instance's chunks: `sync()` asks the server for the events since the
last ask (one round trip; the worker's metrics reply calls it, a few times a second
while vLLM runs steps) and re-emits those of this engine's keys (`owns`: same model,
shard, dtype and layout) under the server's tier names ("cpu" its host memory, "disk",
"remote"), so a chunk another instance's store pushed out of the server is reported
removed here too.

What this process can no longer know counts as lost (`key` None: the tier lost
everything, which vLLM's KV events turn into BlockRemoved for all it announced): the
server is down, a different server answers now (restarted: its host memory is gone),
or this process fell further behind than the server's log reaches. When the same
server answers again after an outage, its log is replayed from where this process
first joined it, so the chunks it still holds are told again (as far as the log,
the last 65,536 events, reaches).
"""

from __future__ import annotations

import logging
from typing import Callable

from lmcache.v1.mp.client import RequestFailed, ServerLink
from lmcache.v1.mp.event_log import MAX_EVENTS_PER_REPLY
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger("lmcache.v1.mp")

SERVER_TIERS = ("cpu", "disk", "remote")
MAX_PAGES = 16  # per sync: a process further behind catches up over the next syncs


class ServerEvents:
    def __init__(self, link: ServerLink, stats: EngineStats, owns: Callable[[CacheEngineKey], bool]):
        self.link = link
        self.stats = stats
        self.owns = owns
        self.cursor: tuple[str, int] | None = None  # (server_id, next event number to ask for)
        self._told = False  # a chunk event was told since the last loss
        self._bad_logged = False

    def sync(self) -> None:
        conn = None if self.link.outage.is_down else self.link.connection()  # never waits on a dead server
        epoch = self.link.epoch
        if conn is None or epoch is None:
            self._lose_all()
            self.cursor = None  # when it answers again: its log replayed from where this process joined it
            return
        if self.cursor is None or self.cursor[0] != epoch[0]:
            if self.cursor is not None:
                self._lose_all()  # a restarted (or another) server: what the last one held is gone
            self.cursor = epoch
        for _ in range(MAX_PAGES):
            try:
                reply = conn.call("events", since=self.cursor[1])
            except RequestFailed as exc:
                self.link.failed(conn, exc)
                return
            events, after = reply.get("events"), reply.get("next")
            if (not isinstance(events, list) or isinstance(after, bool) or not isinstance(after, int)
                    or after < self.cursor[1]):
                self._bad(f"events reply without a list of events and a next number >= {self.cursor[1]}")
                return
            if reply.get("lost"):
                self._lose_all()
            for item in events:
                self._emit(item)
            self.cursor = (self.cursor[0], after)
            if len(events) < MAX_EVENTS_PER_REPLY:
                return

    def _emit(self, item) -> None:
        if (not isinstance(item, list) or len(item) != 3 or item[0] not in SERVER_TIERS
                or not isinstance(item[1], bool) or not (item[2] is None or isinstance(item[2], str))):
            self._bad(f"event {str(item)[:80]!r} is not [tier in {SERVER_TIERS}, stored, key or null]")
            return
        tier, stored, text = item
        if text is None:
            if not stored:
                self.stats.chunk_event(tier, False, None)
            return
        try:
            key = CacheEngineKey.from_string(text)
        except ValueError as exc:
            self._bad(str(exc)[:120])
            return
        if self.owns(key):
            self._told = True
            self.stats.chunk_event(tier, stored, key)

    def _lose_all(self) -> None:
        """Everything told from the server is out of reach (said once per loss)."""
        if not self._told:
            return
        self._told = False
        for tier in SERVER_TIERS:
            self.stats.chunk_event(tier, False, None)

    def _bad(self, what: str) -> None:
        if not self._bad_logged:
            self._bad_logged = True
            logger.warning("lmcache server %s sent a malformed KV event (%s): ignored", self.link.address, what)
