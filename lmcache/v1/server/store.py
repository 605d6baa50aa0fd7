"""The server's memory: entries under a byte budget, least recently used evicted first.

A PUT's body is received into a buffer reserved from the in-flight allowance (a
cap of its own, not the budget), and only once the whole body has arrived is it
committed: then, and only then, are old entries evicted to make room. A body cut
short gives its buffer back and evicts nothing; a header with no body reserves
nothing (the handler reserves at the body's first byte).

Every buffer of an entry counts against the budget until it is freed: current
entries, buffers kept for reuse (the next PUT of the same length takes one, so a
busy server does not pay fresh page faults), and replaced or evicted entries that
a reader is still sending ("pinned"). Eviction skips entries being read, and a
commit that cannot make room (the budget pinned by readers) is not stored. So the
memory of the buffers stays within budget + in-flight allowance, whatever clients do.

Buffers of 64 KiB and more are anonymous memory maps: freeing one returns its
pages to the system at once (malloc's heaps would keep them, and the RSS with them).
"""

from __future__ import annotations

import mmap
import threading
import time
from collections import OrderedDict

import numpy as np

_MAPPED_FROM = 64 * 1024


class Entry:
    __slots__ = ("data", "fmt", "dtype", "shape", "location", "readers", "aborts", "retired")

    def __init__(self, data, fmt: int, dtype: int, shape: tuple[int, int, int, int], location: int):
        self.data = data  # a flat uint8 buffer (numpy array) of exactly the length
        self.fmt, self.dtype, self.shape, self.location = fmt, dtype, shape, location
        self.readers = 0
        self.aborts: list = []  # one callable per reader that can, ends its send (closes its connection)
        self.retired = False

    @property
    def length(self) -> int:
        return len(self.data)


def new_buffer(nbytes: int) -> np.ndarray:
    """Not zeroed: the body overwrites every byte."""
    if nbytes < _MAPPED_FROM:
        return np.empty(nbytes, dtype=np.uint8)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


class LRUByteStore:
    def __init__(self, budget_bytes: int, inflight_bytes: int | None = None):
        if budget_bytes <= 0:
            raise ValueError(f"the store needs a budget > 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.inflight_cap = budget_bytes if inflight_bytes is None else inflight_bytes
        if self.inflight_cap <= 0:
            raise ValueError(f"the store needs an in-flight allowance > 0 bytes, got {self.inflight_cap}")
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._used = 0  # bytes of current entries
        self._pinned = 0  # bytes of replaced entries still being sent to readers
        self._pinned_entries: set[Entry] = set()
        self._inflight = 0  # bytes of PUT bodies being received
        self._idle: OrderedDict[int, list] = OrderedDict()  # length -> kept buffers
        self._idle_bytes = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # in-flight allowance given back
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def held_bytes(self) -> int:
        """Every byte the buffers hold: entries, kept, pinned and in-flight."""
        with self._lock:
            return self._used + self._pinned + self._idle_bytes + self._inflight

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def fits(self, nbytes: int) -> bool:
        """Whether a body of `nbytes` could ever be stored (else it is read and thrown away)."""
        return 0 <= nbytes <= min(self.budget_bytes, self.inflight_cap)

    # -- PUT: reserve, receive, commit (or release) ---------------------------
    def reserve(self, nbytes: int, timeout: float | None = None):
        """A buffer for a body of `nbytes` from the in-flight allowance, waiting up to
        `timeout` seconds for room; None if it never fits or no room came in time.
        Evicts nothing."""
        if not self.fits(nbytes):
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._room:
            while self._inflight + nbytes > self.inflight_cap:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._room.wait(left)
            self._inflight += nbytes
            buf = self._take_idle(nbytes)
        return buf if buf is not None else new_buffer(nbytes)

    def release(self, buf) -> None:
        """Give back a reserved buffer whose body did not arrive."""
        with self._room:
            self._inflight -= len(buf)
            self._keep(buf)
            self._room.notify_all()

    def commit(self, key: bytes, entry: Entry, wait: float = 1.0) -> bool:
        """Store an entry whose buffer came from reserve() and whose body has fully
        arrived, evicting least recently used entries that no one is reading. If
        readers hold the room it needs, their reads are ended and it waits up to
        `wait` seconds for them; False (not stored, buffer dropped) if that fails."""
        n = entry.length
        with self._room:
            self._inflight -= n
            self._room.notify_all()
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= old.length
                self._retire(old, keep=True)  # kept for the next PUT of its length, room allowing
            deadline = time.monotonic() + wait
            while not self._make_room(n):
                left = deadline - time.monotonic()
                if left <= 0 or not self._end_reads():
                    return False
                self._room.wait(min(left, 0.05))
            self._entries[key] = entry
            self._used += n
            return True

    # -- GET / EXIST ------------------------------------------------------------
    def hold(self, key: bytes, abort=None) -> Entry | None:
        """The entry (most recently used now), held until done(entry): its buffer is
        neither reused nor freed meanwhile, and it counts against the budget.
        `abort()`: ends this read (closes the reader's connection) when room is needed."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.readers += 1
                if abort is not None:
                    entry.aborts.append(abort)
            return entry

    def done(self, entry: Entry, abort=None) -> None:
        with self._room:
            entry.readers -= 1
            if abort in entry.aborts:
                entry.aborts.remove(abort)
            if entry.retired and not entry.readers:
                self._pinned -= entry.length
                self._pinned_entries.discard(entry)
                self._keep(entry.data)
                self._room.notify_all()

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def clear(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                entry.retired = True
            self._entries.clear()
            self._idle.clear()
            self._used = self._idle_bytes = 0

    # -- accounting (caller holds the lock) ---------------------------------------
    def _make_room(self, nbytes: int) -> bool:
        while self._used + self._pinned + self._idle_bytes + nbytes > self.budget_bytes:
            if self._idle_bytes:
                self._drop_oldest_idle()
                continue
            victim = next((k for k, e in self._entries.items() if not e.readers), None)
            if victim is None:
                return False
            old = self._entries.pop(victim)
            self._used -= old.length
            self.evictions += 1
            self._retire(old, keep=False)
        return True

    def _retire(self, entry: Entry, keep: bool) -> None:
        entry.retired = True
        if entry.readers:
            self._pinned += entry.length  # freed (or kept) by the last reader's done()
            self._pinned_entries.add(entry)
        elif keep:
            self._keep(entry.data)

    def _end_reads(self) -> bool:
        """Ask the readers of pinned entries, else of the least recently used entry
        being read, to stop; False if there is no reader to ask."""
        targets = list(self._pinned_entries) or [next((e for e in self._entries.values() if e.readers), None)]
        asked = False
        for entry in targets:
            if entry is None:
                continue
            asked = asked or entry.readers > 0
            for abort in entry.aborts:
                abort()
            entry.aborts.clear()
        return asked

    def _keep(self, buf) -> None:
        n = len(buf)
        if n and self._used + self._pinned + self._idle_bytes + n <= self.budget_bytes:
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
