"""`bench storage --tiers server`: the host tier through a real `lmcache server` process
next to the in-process host tier, in the same run (interleaved rounds).

  put  allocate a slot, copy the chunk in, commit (in process: pool buffer, copy, LRU insert);
       the round ends with a round trip, so the server holds every chunk
  get  a hit: look the prefix up, pin every chunk (one round trip), copy it out, unpin
       (in process: look up, hold, copy out, release)
"""

from __future__ import annotations

from lmcache.testing.cache_server import CacheServerProcess
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory import MemoryFormat
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.storage_backend.storage_manager import ALREADY_HELD, StorageManager
from lmcache.v1.token_database import CacheEngineKey


def _key(i: int, round_: int = 0) -> CacheEngineKey:
    return CacheEngineKey("bench/llama-3.1-8b", 1, 0, f"{round_:08x}{i:024x}", "server", "kv.L32.H8.D128")


def bench_server(sources, shape, dtype, repeat, interleaved) -> dict[str, float]:
    from lmcache.v1.mp.client_storage import ServerStorage

    nbytes = sources[0].nbytes
    budget_gb = (3 * len(sources) + 1) * nbytes / 1024**3
    server = CacheServerProcess(l1_gb=budget_gb, log_level="WARNING").start()
    config = LMCacheEngineConfig.from_defaults(max_local_cpu_size=budget_gb, remote_timeout=30.0)
    local = StorageManager(config)
    remote = ServerStorage(config, EngineStats(), "127.0.0.1", server.port)
    keys = [_key(i) for i in range(len(sources))]
    dsts = [src.clone() for src in sources]
    rounds = iter(range(1, 1 << 30))

    def putter(storage, fresh_keys: bool):
        def put():
            # new chunks each round: the in-process tier is cleared before its round, the
            # server's cannot be (its LRU evicts the older rounds' chunks instead)
            round_keys = [_key(i, next(rounds)) for i in range(len(sources))] if fresh_keys else keys
            objs = storage.reserve(round_keys, [shape] * len(keys), dtype, MemoryFormat.KV_2LTD)
            assert len(objs) == len(keys) and ALREADY_HELD not in objs, "no room for a chunk"
            for key, src, obj in zip(round_keys, sources, objs):
                obj.tensor.copy_(src)
                storage.put(key, obj)
            storage.flush()
        return put

    def getter(storage):
        def get():
            assert storage.lookup_prefix(keys) == len(keys)
            objs = storage.get_many(keys)
            assert len(objs) == len(keys), "a chunk went missing during the benchmark"
            for obj, dst in zip(objs, dsts):
                dst.copy_(obj.tensor)
                storage.release(obj)
        return get

    try:
        putter(local, False)()
        putter(remote, False)()
        return interleaved({
            "in_process_put": (local.cpu.clear, putter(local, False)),
            "server_put": (lambda: None, putter(remote, True)),
            "in_process_get": (lambda: None, getter(local)),
            "server_get": (lambda: None, getter(remote)),
        }, repeat)
    finally:
        remote.close()
        local.close()
        server.stop()
