"""The server's memory: entries under a byte budget, least recently used evicted first.

A PUT first reserves a buffer of exactly its length (evicting old entries to make
room), then receives its body into it, then commits it as an entry; a body cut
short gives the buffer back and is never stored.

Buffers of replaced and evicted entries are kept for the next PUT of the same
length (chunks of one model all have one length), so a busy server does not pay
fresh page faults for every PUT. Kept buffers count against the budget and go
first when room is needed. An entry being sent to a reader is never recycled
while the send runs (readers hold it); if it is evicted meanwhile its buffer is
simply dropped after the send, so the budget is exceeded at most by the entries
in flight to readers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class Entry:
    __slots__ = ("data", "fmt", "dtype", "shape", "location", "readers", "retired")

    def __init__(self, data, fmt: int, dtype: int, shape: tuple[int, int, int, int], location: int):
        self.data = data  # a flat uint8 buffer (bytearray or numpy array) of exactly the length
        self.fmt, self.dtype, self.shape, self.location = fmt, dtype, shape, location
        self.readers = 0
        self.retired = False

    @property
    def length(self) -> int:
        return len(self.data)


def new_buffer(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, dtype=np.uint8)  # not zeroed: the body overwrites every byte


class LRUByteStore:
    def __init__(self, budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError(f"the store needs a budget > 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._used = 0  # bytes of stored entries
        self._reserved = 0  # bytes of PUT bodies being received
        self._idle: OrderedDict[int, list] = OrderedDict()  # length -> kept buffers
        self._idle_bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- PUT: reserve, receive, commit (or release) ---------------------------
    def reserve(self, nbytes: int):
        """A buffer for a body of `nbytes`, room made by evicting LRU entries; None
        if even an empty store could not hold it next to the bodies being received."""
        with self._lock:
            if nbytes > self.budget_bytes - self._reserved:
                return None
            buf = self._take_idle(nbytes)
            while buf is None and self._used + self._reserved + self._idle_bytes + nbytes > self.budget_bytes:
                if self._idle_bytes:
                    self._drop_oldest_idle()
                    continue
                _, old = self._entries.popitem(last=False)
                self._used -= old.length
                self.evictions += 1
                if old.length == nbytes and not old.readers:
                    buf = old.data
                else:
                    old.retired = True
            self._reserved += nbytes
        return buf if buf is not None else new_buffer(nbytes)

    def release(self, buf) -> None:
        """Give back a reserved buffer whose body did not arrive."""
        with self._lock:
            self._reserved -= len(buf)
            self._keep(buf)

    def commit(self, key: bytes, entry: Entry) -> None:
        """Store an entry whose buffer came from reserve()."""
        with self._lock:
            self._reserved -= entry.length
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= old.length
                self._retire(old)
            self._entries[key] = entry
            self._used += entry.length

    # -- GET / EXIST ------------------------------------------------------------
    def hold(self, key: bytes) -> Entry | None:
        """The entry (most recently used now), held until done(entry): its buffer is not reused meanwhile."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.readers += 1
            return entry

    def done(self, entry: Entry) -> None:
        with self._lock:
            entry.readers -= 1

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._idle.clear()
            self._used = self._idle_bytes = 0

    # -- kept buffers (caller holds the lock) -------------------------------------
    def _retire(self, entry: Entry) -> None:
        entry.retired = True
        if not entry.readers:
            self._keep(entry.data)

    def _keep(self, buf) -> None:
        n = len(buf)
        if self._used + self._reserved + self._idle_bytes + n <= self.budget_bytes:
            self._idle.setdefault(n, []).append(buf)
            self._idle.move_to_end(n)
            self._idle_bytes += n

    def _take_idle(self, nbytes: int):
        bucket = self._idle.get(nbytes)
        if not bucket:
            return None
        buf = bucket.pop()
        if not bucket:
            del self._idle[nbytes]
        self._idle_bytes -= nbytes
        return buf

    def _drop_oldest_idle(self) -> None:
        n, bucket = next(iter(self._idle.items()))
        bucket.pop(0)
        self._idle_bytes -= n
        if not bucket:
            del self._idle[n]
