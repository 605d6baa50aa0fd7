"""`EngineHandle`: the worker's engine as its parts (saves, loads, layerwise) see it.

The engine and its device connector exist from `register_kv_caches` on; while vLLM
sleeps (its KV cache memory released) the connector is gone and nothing may touch the
KV cache. The parts share this one handle instead of reaching into each other.
"""

from __future__ import annotations

import threading

from lmcache.integration.vllm.runner import VLLM_RUNNER, RunnerTraits


class EngineHandle:
    def __init__(self, block_size: int, lease_ttl: float):
        self.block_size = block_size
        self.lease_ttl = lease_ttl  # for the message of a short load on Gaudi
        self.engine = None  # LMCacheEngine, from register_kv_caches on
        self.gpu_connector = None
        self.lock = threading.RLock()  # held while the engine or its connector changes
        self.asleep = False  # sleep mode: the KV caches are unregistered
        self.runner: RunnerTraits = VLLM_RUNNER  # told by the KV caches' device at registration
        self.layer_index: dict[str, int] = {}  # layer name -> its index in the KV caches
