"""A value read from a shared store (Redis/Valkey, S3) turned back into a chunk, with
the miss accounting every such tier shares: absent, not a valid chunk (logged, counted,
deleted so lookups stop reporting it), or no host memory for it."""

from __future__ import annotations

import logging
from typing import Callable

from lmcache.v1.memory import MemoryObj
from lmcache.v1.storage_backend import serde
from lmcache.v1.storage_backend.serde import Allocator, SerdeError
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger(__name__)


def chunk_or_miss(blob, key: CacheEngineKey, allocate: Allocator, integrity: serde.Integrity, stats: EngineStats,
                  tier: str, where: str, delete: Callable[[], None]) -> MemoryObj | None:
    """The chunk `blob` holds (read under `key`, at `where`), or None with the cause counted;
    `delete()` removes a value that is not a valid chunk."""
    if blob is None:
        stats.miss("absent")
        return None
    try:
        obj = serde.from_bytes(blob, allocate, key, integrity)
    except SerdeError as exc:
        logger.warning("%s tier: %s is not a valid chunk (%s): treated as a miss and deleted", tier, where, exc)
        stats.miss(serde.miss_cause(exc), tier=tier)
        stats.chunk_event(tier, False, key)
        delete()
        return None
    if obj is None:
        stats.miss("dropped", tier=tier)
    return obj
