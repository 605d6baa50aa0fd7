"""Lookup leases in the engine (host-tensor connector): a leased lookup's chunks stay
through eviction pressure from concurrent stores until the retrieve that names the
lease; every tier's hit is held in host memory; renewals and shared chunks are held
once; the ttl bounds a lost request."""

import threading

import pytest
import torch

from lmcache.v1.cache_engine import TransferSpec
from lmcache.v1.config import ConfigError, LMCacheEngineConfig
from lmcache.v1.leases import LeaseTable
from tests.helpers.workload import check_prompt, make_engine, prompt_kv, prompt_tokens

CS = 16
N = 64  # tokens per prompt: 4 chunks
CHUNK_BYTES = CS * 2 * 2 * 4 * 32 * 2  # tokens * planes * layers * heads * head_size * fp16


def config(chunks: int, **kw):
    return LMCacheEngineConfig.from_defaults(chunk_size=CS, max_local_cpu_size=chunks * CHUNK_BYTES / 1024**3, **kw)


def store(eng, conn, p, base):
    slots = torch.arange(base, base + N)
    conn.cache[slots] = prompt_kv(p, N, conn.kv_dtype)
    return eng.store(prompt_tokens(p, N), slot_mapping=slots)


def test_leased_chunks_survive_concurrent_stores_and_unleased_ones_do_not():
    eng, conn = make_engine(config(chunks=8), 4096)
    try:
        assert store(eng, conn, 1, 0) == N and store(eng, conn, 2, N) == N  # the tier is full
        assert eng.lookup(prompt_tokens(1, N), lease_id="1:r1") == N
        assert eng.lookup(prompt_tokens(2, N)) == N

        def pressure(first):
            for p in range(first, first + 5):
                store(eng, conn, p, 64 * p)

        threads = [threading.Thread(target=pressure, args=(first,)) for first in (10, 20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert eng.stats.misses["evicted"] >= 4

        conn.cache.zero_()
        slots = torch.arange(N)
        loaded = eng.batched_retrieve([TransferSpec(prompt_tokens(1, N), slots, lease_id="1:r1")])
        assert loaded == [N]
        assert torch.equal(conn.cache[:N].view(torch.int16), prompt_kv(1, N, conn.kv_dtype).view(torch.int16))
        assert len(eng.leases) == 0 and eng.leases.held_chunks == 0
        assert check_prompt(eng, conn, 2, N)[0] < N  # the same pressure took the unleased prompt
    finally:
        eng.close()


def test_remote_and_disk_hits_are_held_in_host_memory(tmp_path):
    eng, conn = make_engine(config(chunks=8, local_cpu=False, local_disk=str(tmp_path), max_local_disk_size=0.01), 4096)
    try:
        store(eng, conn, 1, 0)
        assert eng.flush(10)
        assert eng.lookup(prompt_tokens(1, N), lease_id="1:r") == N
        for f in tmp_path.iterdir():  # the files go (another process evicts them, say)
            f.unlink()
        first = eng.token_db.chunks(prompt_tokens(1, N))[0].key
        assert eng.storage.get(first) is None  # the tiers no longer have it
        conn.cache.zero_()
        assert eng.batched_retrieve([TransferSpec(prompt_tokens(1, N), torch.arange(N), lease_id="1:r")]) == [N]
        assert torch.equal(conn.cache[:N].view(torch.int16), prompt_kv(1, N, conn.kv_dtype).view(torch.int16))
        assert eng.storage.pool.used_bytes == 0  # the lease's copies went back to the pool
    finally:
        eng.close()


def test_a_renewed_or_shared_lease_holds_each_chunk_once():
    eng, conn = make_engine(config(chunks=8), 4096)
    try:
        store(eng, conn, 1, 0)
        tokens = prompt_tokens(1, N)
        assert eng.lookup(tokens, lease_id="1:a") == N
        assert eng.lookup(tokens[:40], lease_id="1:a") == 32  # renewed: now 2 chunks
        assert eng.lookup(tokens, lease_id="2:b") == N
        assert eng.leases.held_chunks == 4 and len(eng.leases) == 2
        assert eng.release_lease("2:b") and not eng.release_lease("2:b")
        assert eng.leases.held_chunks == 2
        eng.release_lease("1:a")
        assert eng.leases.held_chunks == 0
        assert all(not obj.in_use for obj in eng.storage.cpu._objs.values())
    finally:
        eng.close()


def test_a_prefix_the_caller_holds_is_checked_not_held():
    eng, conn = make_engine(config(chunks=8), 4096)
    try:
        store(eng, conn, 1, 0)
        tokens = prompt_tokens(1, N)
        assert eng.lookup(tokens, lease_id="1:a", hold_from=40) == N  # vLLM holds 40: 2 whole chunks
        assert eng.leases.held_chunks == 2
        eng.release_lease("1:a")
        assert eng.storage.cpu.remove(eng.token_db.chunks(tokens)[3].key)
        assert eng.lookup(tokens, lease_id="2:a", hold_from=40) == 48  # still checked up to the gap
    finally:
        eng.close()


def test_a_chunk_of_the_wrong_shape_ends_the_leased_answer(tmp_path):
    eng, conn = make_engine(config(chunks=8, local_cpu=False, local_disk=str(tmp_path), max_local_disk_size=0.01), 4096)
    try:
        store(eng, conn, 1, 0)
        assert eng.flush(10)
        key = eng.token_db.chunks(prompt_tokens(1, N))[2].key
        other = eng.storage.pool.allocate((2, 2, CS, 64), torch.float16, eng.metadata.memory_format)
        eng.storage.disk.remove(key)
        assert eng.storage.disk.put(key, other)  # a well-formed chunk of another model under that key
        other.free()
        assert eng.lookup(prompt_tokens(1, N)) == N  # existence alone says 4 chunks
        assert eng.lookup(prompt_tokens(1, N), lease_id="1:r") == 2 * CS
        assert eng.stats.misses["refused"] == 1 and eng.leases.held_chunks == 2
        assert eng.lookup(prompt_tokens(1, N)) == 2 * CS  # refused: removed, no longer reported
        assert not eng.storage.disk.contains(key)
    finally:
        eng.close()


def test_the_ttl_ends_a_lost_lease():
    now = [100.0]
    held, released = {}, []

    def get(key):
        from lmcache.v1.memory import MemoryFormat, MemoryObj

        held[key] = MemoryObj(torch.zeros(2, 1, 1, 1), MemoryFormat.KV_2LTD)
        return held[key]

    table = LeaseTable(get, released.append, ttl=5, clock=lambda: now[0])
    assert table.acquire("1:r", ["k1", "k2"]) == 2
    now[0] = 104.0
    table.acquire("2:s", ["k3"])
    assert table.expired == 0 and table.held_chunks == 3
    now[0] = 105.5
    table.release("nothing")
    assert table.expired == 1 and table.held_chunks == 1
    assert released == [held["k1"], held["k2"]]
    with pytest.raises(ValueError, match="ttl"):
        LeaseTable(get, released.append, ttl=0)


def test_lookup_lease_ttl_is_validated():
    assert LMCacheEngineConfig().lookup_lease_ttl == 60.0
    assert LMCacheEngineConfig.from_defaults(lookup_lease_ttl="2.5").lookup_lease_ttl == 2.5
    for bad in (0, -1, "soon", float("inf")):
        with pytest.raises(ConfigError, match="lookup_lease_ttl.*seconds > 0"):
            LMCacheEngineConfig.from_defaults(lookup_lease_ttl=bad)
