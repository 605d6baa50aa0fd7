"""`LMCacheEngineBuilder`: one LMCacheEngine per name in the process (vLLM's
integration uses ENGINE_NAME; its examples call `LMCacheEngineBuilder.destroy`)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmcache.v1.cache_engine import LMCacheEngine, LMCacheEngineMetadata
    from lmcache.v1.config import LMCacheEngineConfig


class LMCacheEngineBuilder:
    """One engine per name in the process (vLLM uses ENGINE_NAME)."""

    _engines: dict[str, LMCacheEngine] = {}
    _lock = threading.Lock()

    @classmethod
    def get_or_create(
        cls,
        instance_id: str,
        config: LMCacheEngineConfig,
        metadata: LMCacheEngineMetadata,
        gpu_connector=None,
    ) -> LMCacheEngine:
        with cls._lock:
            engine = cls._engines.get(instance_id)
            if engine is None:
                from lmcache.v1.cache_engine import LMCacheEngine

                engine = LMCacheEngine(config, metadata, gpu_connector)
                cls._engines[instance_id] = engine
            elif gpu_connector is not None and engine.gpu_connector is None:
                engine.set_gpu_connector(gpu_connector)
            return engine

    @classmethod
    def get(cls, instance_id: str) -> LMCacheEngine | None:
        with cls._lock:
            return cls._engines.get(instance_id)

    @classmethod
    def destroy(cls, instance_id: str) -> None:
        with cls._lock:
            engine = cls._engines.pop(instance_id, None)
        if engine is not None:
            engine.close()
