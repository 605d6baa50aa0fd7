"""The lease prefetch pins over a connection of its own: while the server waits on its
L2 for a prefetch (here a Redis that stopped answering: SIGSTOP), the step's own round
trips (a store: reserve, commits) are answered at once, and the prefetch completes once
Redis answers again, its load bit-exact. The server answers each connection in order, so
on one shared connection the store would wait behind the prefetch's pin."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import torch

from lmcache.testing.processes import wait_until
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.engine_types import TransferSpec
from lmcache.v1.mp.client_storage import ServerStorage
from tests.helpers.workload import bits, make_engine, prompt_kv, prompt_tokens, store_prompt

pytestmark = pytest.mark.redis

N = 64  # tokens: 4 chunks of 16


def test_a_prefetch_waiting_on_the_servers_l2_does_not_hold_up_the_steps_round_trips(
        cache_server_factory, redis_factory, monkeypatch):
    redis = redis_factory()
    adapter = json.dumps({"type": "resp", "host": "127.0.0.1", "port": redis.port})
    monkeypatch.setenv("LMCACHE_REMOTE_TIMEOUT", "60")  # the server's Redis reads wait for the stopped Redis
    server = cache_server_factory(extra_args=("--l2-adapter", adapter)).start()
    config = LMCacheEngineConfig.from_defaults(**server.config(remote_timeout=60))
    writer, conn = make_engine(config, N)
    try:
        assert store_prompt(writer, conn, 1, N) == N
        writer.storage.flush()
    finally:
        writer.close()  # the server's Redis writes finish when it stops
    server.stop()
    server.start()  # host memory empty: only Redis holds prompt 1
    assert wait_until(lambda: len(redis.client().keys("*")) >= 4, timeout=10)

    gate = threading.Event()
    real = ServerStorage.get_many_in_background

    def after_gate(self, keys):
        gate.wait(60)
        return real(self, keys)

    monkeypatch.setattr(ServerStorage, "get_many_in_background", after_gate)
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**server.config(remote_timeout=60)), N)
    stopped = False
    try:
        assert engine.lookup(prompt_tokens(1, N), lease_id="1:req", prefetch=True) == N
        os.kill(redis.proc.pid, signal.SIGSTOP)
        stopped = True
        pins_before = server.status()["requests"].get("pin", 0)
        gate.set()  # the prefetch's pin reaches the server, which now waits on Redis
        assert wait_until(lambda: server.status()["requests"].get("pin", 0) == pins_before + 1, timeout=10)
        assert store_prompt(engine, conn, 2, N) == N  # the step's round trips, answered meanwhile
        assert not engine.leases.wait("1:req", timeout=0)  # the prefetch is still waiting on Redis
        os.kill(redis.proc.pid, signal.SIGCONT)
        stopped = False
        assert engine.leases.wait("1:req", timeout=60)
        conn.cache.zero_()
        loaded = engine.batched_retrieve([TransferSpec(prompt_tokens(1, N), torch.arange(N), lease_id="1:req")])[0]
        assert loaded == N and torch.equal(bits(conn.cache[:N]), bits(prompt_kv(1, N, conn.kv_dtype)))
        assert engine.leases.prefetched == 4
    finally:
        if stopped:
            os.kill(redis.proc.pid, signal.SIGCONT)
        gate.set()
        engine.close()
