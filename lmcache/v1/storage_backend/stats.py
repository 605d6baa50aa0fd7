"""EngineStats: counters of the engine and its tiers (thread-safe).

Besides the totals, each tier counts what happened in it (`tier_counts`, keys
"<tier>.<what>": hits in tokens, evictions, errors by cause) and tells observers
which chunks it gained or lost (`chunk_event`), so the vLLM integration can report
per-tier metrics and KV cache events. Both are additive: tiers that pass no
`tier=` are counted in the totals only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger(__name__)

# Why a chunk was not found or not kept:
#   absent     looked for and found in no tier
#   corrupt    a tier held bytes that failed to parse or verify (they were removed)
#   refused    a valid chunk that may not be loaded under its key: it names another key,
#              its MAC is missing or wrong (chunk_secret), or its shape/dtype is not this
#              engine's (removed from every tier that allows it)
#   tier_down  a tier (the remote server) was unreachable or timed out
#   evicted    removed from a tier to make room (it will miss later)
#   dropped    not stored: writer queue full, no host memory, disk full, write failed
MISS_CAUSES = ("absent", "corrupt", "refused", "tier_down", "evicted", "dropped")

# observer(tier, stored, key): `stored` True when the tier now holds the chunk `key`
# (a CacheEngineKey), False when it lost it; key None with stored False: the tier
# lost everything it held (e.g. the remote server went away).
ChunkObserver = Callable[[str, bool, object], None]


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
    tier_counts: dict = field(default_factory=dict)  # "<tier>.<what>" -> count

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # not a field: asdict()/replace() stay usable
        self._observers: list[ChunkObserver] = []

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def miss(self, cause: str, n: int = 1, tier: str | None = None) -> None:
        if cause not in MISS_CAUSES:
            raise ValueError(f"unknown miss cause {cause!r}; known: {', '.join(MISS_CAUSES)}")
        with self._lock:
            self.misses[cause] += n
            if tier is not None:
                name = f"{tier}.{cause}"
                self.tier_counts[name] = self.tier_counts.get(name, 0) + n

    def tier_hit(self, tier: str, tokens: int) -> None:
        """A chunk of `tokens` tokens was read from `tier`."""
        with self._lock:
            name = f"{tier}.hit_tokens"
            self.tier_counts[name] = self.tier_counts.get(name, 0) + tokens

    def add_observer(self, observer: ChunkObserver) -> None:
        with self._lock:
            self._observers.append(observer)

    def chunk_event(self, tier: str, stored: bool, key) -> None:
        for observer in self._observers:
            try:
                observer(tier, stored, key)
            except Exception:  # noqa: BLE001 - an observer never breaks a tier
                logger.exception("chunk observer failed")

    def as_dict(self) -> dict:
        with self._lock:
            out = {name: getattr(self, name) for name in self.__dataclass_fields__
                   if name not in ("misses", "tier_counts")}
            out.update({f"misses_{cause}": n for cause, n in self.misses.items()})
            out.update({f"tier_{name}": n for name, n in self.tier_counts.items()})
        return out

    to_dict = as_dict
