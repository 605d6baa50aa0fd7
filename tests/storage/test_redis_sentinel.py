"""The remote tier through Redis Sentinel (1 master, 1 replica, 3 sentinels on
127.0.0.1, tests/helpers/redis_fixtures.py): master discovery, reads from the replica, the
service name from the environment, and a master SIGKILLed mid-traffic, followed
to the promoted replica without a restart or a failed operation."""

from __future__ import annotations

import logging
import time

import pytest

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.remote_urls import parse_redis_seeds
from lmcache.v1.storage_backend.remote import RemoteBackend
from tests.helpers.workload import check_prompt, make_engine, prompt_tokens, store_prompt

pytestmark = pytest.mark.redis
CS, N = 16, 64


def sentinel_config(url: str) -> LMCacheEngineConfig:
    return LMCacheEngineConfig.from_defaults(chunk_size=CS, max_local_cpu_size=0.05, local_cpu=False,
                                             remote_url=url, remote_timeout=3.0, remote_connect_timeout=1.0,
                                             remote_retry_interval=1.0)


def test_service_name_from_the_url_then_the_environment_then_the_default():
    assert parse_redis_seeds("redis-sentinel://h:1,h:2/mine", environ={"REDIS_SERVICE_NAME": "env"}).service == "mine"
    assert parse_redis_seeds("redis-sentinel://h:1,h:2", environ={"REDIS_SERVICE_NAME": "env"}).service == "env"
    assert parse_redis_seeds("redis-sentinel://h:1,h:2", environ={}).service == "redismaster"


def test_stores_on_the_master_and_reads_from_the_replica(redis_sentinels, monkeypatch):
    master = redis_sentinels.current_master()
    master.client().flushall()
    monkeypatch.setenv("REDIS_SERVICE_NAME", redis_sentinels.service)
    url = redis_sentinels.url.rsplit("/", 1)[0]  # the service name from the environment
    engine, conn = make_engine(sentinel_config(url), N)
    store_prompt(engine, conn, 1, N)
    assert engine.flush(10)
    assert master.client().dbsize() == N // CS
    assert check_prompt(engine, conn, 1, N) == (N, True)
    engine.close()

    master.client().execute_command("WAIT", 1, 2000)
    replica = next(n for n in redis_sentinels.data_nodes if n is not master)
    reader = RemoteBackend(redis_sentinels.url + "?read_from_replicas=true", timeout=1.0)
    key = engine.token_db.chunks(prompt_tokens(1, N))[0].key
    before = replica.client().info("stats")["total_commands_processed"]
    assert reader.prefix_count([key]) == 1
    assert replica.client().info("stats")["total_commands_processed"] > before + 1  # the EXISTS went there
    reader.close()


def test_master_killed_mid_traffic_then_failed_over(redis_sentinels, caplog):
    old = redis_sentinels.current_master()
    old.client().flushall()
    engine, conn = make_engine(sentinel_config(redis_sentinels.url), N)
    for p in range(1, 5):
        store_prompt(engine, conn, p, N)
    assert engine.flush(10)
    old.client().execute_command("WAIT", 1, 2000)
    caplog.set_level(logging.WARNING, logger="lmcache")
    p, killed, recovered = 100, False, False
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        p += 1
        store_prompt(engine, conn, p, N)
        for q in (p % 4 + 1, p - 1):
            loaded, exact = check_prompt(engine, conn, q, N)
            assert exact, f"prompt {q}: wrong KV after {loaded} tokens"
        if not killed and p == 103:
            old.kill()
            killed = True
        elif killed and engine.flush(10) and all(engine.lookup(prompt_tokens(q, N)) == N for q in range(1, 5)):
            if check_prompt(engine, conn, p, N) == (N, True):  # a store after the failover, whole
                recovered = True
                break
        time.sleep(0.05)
    assert recovered, "hits did not come back after the replica was promoted"
    assert redis_sentinels.current_master() is not old
    lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "reachable again" in caplog.text
    engine.close()
    # The last test of the module: the old master stays down (the sentinels would take
    # ~10 s to make it a replica of the new one).
