"""The server's memory: entries under a byte budget, least recently used evicted first.

A PUT first reserves its bytes (evicting old entries to make room), then reads
its body into a buffer of exactly that size, then commits it; a body cut short
releases the reservation and is never stored. Entries being sent to a reader
are plain references, so an eviction meanwhile does not disturb the send.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    data: bytearray
    fmt: int
    dtype: int
    shape: tuple[int, int, int, int]
    location: int

    @property
    def length(self) -> int:
        return len(self.data)


class LRUByteStore:
    def __init__(self, budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError(f"the store needs a budget > 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._used = 0  # stored bytes
        self._reserved = 0  # bytes of PUT bodies being received
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def reserve(self, nbytes: int) -> bool:
        """Make room for a body of `nbytes` (evicting LRU entries); False if even an
        empty store could not hold it next to the bodies already being received."""
        with self._lock:
            if nbytes > self.budget_bytes - self._reserved:
                return False
            while self._used + self._reserved + nbytes > self.budget_bytes and self._entries:
                _, old = self._entries.popitem(last=False)
                self._used -= old.length
                self.evictions += 1
            self._reserved += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def commit(self, key: bytes, entry: Entry) -> None:
        """Store an entry whose bytes were reserved (the reservation becomes the entry)."""
        with self._lock:
            self._reserved -= entry.length
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= old.length
            self._entries[key] = entry
            self._used += entry.length

    def get(self, key: bytes) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used = 0
