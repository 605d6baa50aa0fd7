"""What the server's tiers gained and lost, numbered, for the clients to follow.

The server's tiers report every chunk they store, evict or lose (EngineStats
observers, as in process); the log keeps the last `capacity` of them, each with a
sequence number. A client asks for the events after the number it has seen
(`events` op): a client that fell further behind than the log reaches is told so
(`lost`), and treats everything it had heard of as gone.
"""

from __future__ import annotations

import threading
from collections import deque
from itertools import islice

MAX_EVENTS_PER_REPLY = 4096  # ~150 bytes of JSON each: well under a frame


class EventLog:
    def __init__(self, capacity: int = 65536):
        self._entries: deque = deque(maxlen=capacity)  # (tier, stored, CacheEngineKey or None)
        self._next = 0  # the sequence number the next event gets
        self._lock = threading.Lock()

    @property
    def next(self) -> int:
        with self._lock:
            return self._next

    def record(self, tier: str, stored: bool, key) -> None:
        """EngineStats observer of the server's tiers."""
        with self._lock:
            self._entries.append((tier, bool(stored), key))
            self._next += 1

    def since(self, seq: int, limit: int = MAX_EVENTS_PER_REPLY) -> tuple[list, int, bool]:
        """([tier, stored, key string or None] ...) from number `seq` on, at most `limit`;
        the number to ask from next; whether events before the first returned are lost
        (`seq` older than the log reaches, or newer than any event: another server's)."""
        with self._lock:
            oldest = self._next - len(self._entries)
            lost = not oldest <= seq <= self._next
            start = max(seq, oldest) if seq <= self._next else self._next
            taken = list(islice(self._entries, start - oldest, start - oldest + limit))
        events = [[tier, stored, None if key is None else key.to_string()] for tier, stored, key in taken]
        return events, start + len(taken), lost
