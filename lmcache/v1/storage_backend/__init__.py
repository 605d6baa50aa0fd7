"""Storage tiers (host memory, local disk, Redis/Valkey), their blob format, and
the storage manager that walks them. The remote tier imports redis-py lazily."""

from lmcache.v1.storage_backend.local_cpu import LocalCPUBackend
from lmcache.v1.storage_backend.local_disk import LocalDiskBackend
from lmcache.v1.storage_backend.stats import MISS_CAUSES, EngineStats
from lmcache.v1.storage_backend.storage_manager import StorageManager

__all__ = ["EngineStats", "LocalCPUBackend", "LocalDiskBackend", "MISS_CAUSES", "StorageManager"]
