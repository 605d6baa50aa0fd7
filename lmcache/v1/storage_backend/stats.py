"""EngineStats: counters of the engine and its tiers (thread-safe)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

# Why a chunk was not found or not kept:
#   absent     looked for and found in no tier
#   corrupt    a tier held bytes that failed to parse or verify (they were removed)
#   tier_down  a tier (the remote server) was unreachable or timed out
#   evicted    removed from a tier to make room (it will miss later)
#   dropped    not stored: writer queue full, no host memory, disk full, write failed
MISS_CAUSES = ("absent", "corrupt", "tier_down", "evicted", "dropped")


@dataclass
class EngineStats:
    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    stored_chunks: int = 0
    stored_tokens: int = 0
    stored_bytes: int = 0
    loaded_chunks: int = 0
    loaded_tokens: int = 0
    loaded_bytes: int = 0
    misses: dict = field(default_factory=lambda: dict.fromkeys(MISS_CAUSES, 0))

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # not a field: asdict()/replace() stay usable

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def miss(self, cause: str, n: int = 1) -> None:
        if cause not in MISS_CAUSES:
            raise ValueError(f"unknown miss cause {cause!r}; known: {', '.join(MISS_CAUSES)}")
        with self._lock:
            self.misses[cause] += n

    def as_dict(self) -> dict:
        with self._lock:
            out = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "misses"}
            out.update({f"misses_{cause}": n for cause, n in self.misses.items()})
        return out

    to_dict = as_dict
