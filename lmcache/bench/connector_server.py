"""`bench connector --server`: the same batched store and load, into and out of slots of a
real `lmcache server`'s shared memory instead of this process's memory objects.

  server_store   reserve one slot per chunk (one round trip), gather the paged KV into the
                 slots, commit them, and a round trip so the server holds them all; fresh
                 keys each round (the server's LRU evicts older rounds)
  server_load    pin the chunks of a stored batch (one round trip), scatter from the slots
                 into the paged cache, unpin

Before timing, the stored batch is read back from the server and compared bit for bit with
what the in-process path gathers (a mismatch ends the bench). They run in the same interleaved rounds as the in-process store/load and memcpy, so
`server_store_vs_memcpy` and `server_store_vs_in_process` (and the load's) are side by side.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable

import torch

from lmcache.v1.memory import MemoryFormat
from lmcache.v1.token_database import CacheEngineKey


def _key(round_: int, i: int) -> CacheEngineKey:
    return CacheEngineKey("bench/connector", 1, 0, f"{round_:08x}{i:024x}", "server", "kv")


def _check_bytes(s, connector, storage, keys) -> None:
    """The server's slots hold what the in-process path gathers from the same cache, bit for bit."""
    connector.batched_from_gpu(s.objs, s.starts, s.ends, slot_mapping=s.slots)
    objs = storage.get_many(keys)
    try:
        bad = [i for i, (got, want) in enumerate(zip(objs, s.objs)) if not torch.equal(got.tensor, want.tensor)]
    finally:
        for obj in objs:
            storage.release(obj)
    if len(objs) != len(keys) or bad:
        raise SystemExit(f"the lmcache server's slots differ from the in-process objects (chunks {bad}, "
                         f"{len(objs)} of {len(keys)} found)")


def server_cases(s, dtype: torch.dtype, connector, stack: contextlib.ExitStack) -> dict[str, Callable[[], object]]:
    from lmcache.testing.cache_server import CacheServerProcess
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.mp.client_storage import ServerStorage
    from lmcache.v1.storage_backend.stats import EngineStats

    # the load batch and three store rounds: the load batch, used every round, is never the
    # least recently used (the interleaved rounds run each case once per round)
    budget_gb = (4 * s.nbytes + len(s.objs) * (1 << 20)) / 1024**3
    server = CacheServerProcess(l1_gb=budget_gb, log_level="WARNING").start()
    stack.callback(server.stop)
    config = LMCacheEngineConfig.from_defaults(remote_timeout=60.0)
    storage = ServerStorage(config, EngineStats(), "127.0.0.1", server.port)
    stack.callback(storage.close)
    shapes = [o.tensor.shape for o in s.objs]
    rounds = itertools.count(1)

    def store_batch(keys) -> None:
        objs = storage.reserve(keys, shapes, dtype, MemoryFormat.KV_2LTD)
        if len(objs) != len(keys) or any(not hasattr(o, "tensor") for o in objs):
            raise SystemExit(f"the lmcache server gave {len(objs)} of {len(keys)} slots: its memory is too small")
        connector.batched_from_gpu(objs, s.starts, s.ends, slot_mapping=s.slots)
        for key, obj in zip(keys, objs):
            storage.put(key, obj)
        storage.flush()

    loaded_keys = [_key(0, i) for i in range(len(s.objs))]
    store_batch(loaded_keys)
    _check_bytes(s, connector, storage, loaded_keys)

    def store() -> None:
        store_batch([_key(next(rounds), i) for i in range(len(s.objs))])

    def load() -> None:
        objs = storage.get_many(loaded_keys)
        if len(objs) != len(loaded_keys):
            raise SystemExit("a chunk of the load batch left the lmcache server during the benchmark")
        connector.batched_to_gpu(objs, s.starts, s.ends, slot_mapping=s.slots)
        for obj in objs:
            storage.release(obj)

    return {"server_store": store, "server_load": load}
