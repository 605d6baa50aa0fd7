"""Property: the CPU and disk tiers never exceed their byte budgets, whatever
sequence of stores, lookups, reads (holding chunks) and releases happens."""

import os
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory import MemoryFormat
from lmcache.v1.storage_backend.storage_manager import StorageManager
from lmcache.v1.token_database import CacheEngineKey

ROW = 2 * 2 * 64  # bytes per token of a [2, 2, T, 32] fp16 object
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 30), st.integers(1, 40)),  # key, tokens
        st.tuples(st.just("get"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("release"), st.integers(0, 10), st.just(0)),
        st.tuples(st.just("lookup"), st.integers(0, 30), st.just(0)),
    ),
    max_size=60,
)


def key(i):
    return CacheEngineKey("m", 1, 0, f"{i:032x}", "float16", "kv")


def dir_bytes(path):
    return sum(e.stat().st_size for e in os.scandir(path) if e.name.endswith(".kv"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, cpu_tokens=st.integers(20, 200), disk_tokens=st.integers(20, 200))
def test_tiers_never_exceed_budgets(ops, cpu_tokens, disk_tokens):
    with tempfile.TemporaryDirectory() as disk:
        config = LMCacheEngineConfig.from_defaults(
            max_local_cpu_size=cpu_tokens * ROW / 1024**3,
            local_disk=disk,
            max_local_disk_size=(disk_tokens * ROW + 64 * 4) / 1024**3,
        )
        m = StorageManager(config)
        held = []
        try:
            for op, i, n in ops:
                if op == "put":
                    obj = m.allocate((2, 2, n, 32), torch.float16, MemoryFormat.KV_2LTD)
                    if obj is not None:
                        obj.tensor.fill_(i)
                        m.put(key(i), obj)
                    m.flush(10)
                elif op == "get":
                    obj = m.get(key(i))
                    if obj is not None:
                        assert bool((obj.tensor == i).all())  # never someone else's bytes
                        held.append(obj)
                elif op == "release" and held:
                    m.release(held.pop(i % len(held)))
                elif op == "lookup":
                    m.lookup_prefix([key(i), key(i + 1)])
                assert m.cpu.used_bytes <= m.cpu.budget_bytes
                assert m.pool.used_bytes + m.pool.idle_bytes <= m.pool.budget_bytes
                assert m.disk.used_bytes <= m.disk.budget_bytes
                assert dir_bytes(disk) <= m.disk.budget_bytes
        finally:
            for obj in held:
                m.release(obj)
            m.close()


few_keys_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 8), st.integers(1, 40)),
        st.tuples(st.just("get"), st.integers(0, 8), st.just(0)),
        st.tuples(st.just("release"), st.integers(0, 10), st.just(0)),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=60, deadline=None)
@given(ops=few_keys_ops, budget_tokens=st.integers(20, 120))
def test_cpu_tier_alone_never_exceeds_its_budget_and_keeps_what_is_read(ops, budget_tokens):
    """The tier's own limit (its pool here is larger), and eviction skipping held objects."""
    from lmcache.v1.memory import HostMemoryPool
    from lmcache.v1.storage_backend.local_cpu import LocalCPUBackend

    pool = HostMemoryPool(10 * budget_tokens * ROW)
    tier = LocalCPUBackend(budget_tokens * ROW)
    held = []
    for op, i, n in ops:
        if op == "put":
            obj = pool.allocate((2, 2, n, 32), torch.float16, MemoryFormat.KV_2LTD)
            obj.tensor.fill_(i)
            if not tier.put(key(i), obj):
                obj.free()
        elif op == "get":
            obj = tier.get(key(i))
            if obj is not None:
                held.append((i, obj))
        elif op == "release" and held:
            held.pop(i % len(held))[1].ref_count_down()
        assert tier.used_bytes <= tier.budget_bytes
        for j, obj in held:
            assert tier.contains(key(j)) and bool((obj.tensor == j).all())
