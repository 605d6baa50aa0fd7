"""The remote tier on a real Redis Cluster (3 masters + 1 replica each on 127.0.0.1,
tests/helpers/redis_fixtures.py): chunks on every shard, a second process's hits, lost keys
as misses, a slot migration and a master SIGKILLed mid-traffic, with no failed
operation and no wrong data. The tests share one cluster and run in file order."""

from __future__ import annotations

import logging
import time

import pytest

from lmcache.v1.config import LMCacheEngineConfig
from tests.helpers.workload import check_prompt, make_engine, prompt_tokens, store_prompt

pytestmark = pytest.mark.redis
CS, N = 16, 64  # 4 chunks per prompt


def cluster_config(url: str, **kw) -> LMCacheEngineConfig:
    return LMCacheEngineConfig.from_defaults(chunk_size=CS, max_local_cpu_size=0.05, local_cpu=False,
                                             remote_url=url, remote_timeout=3.0, remote_connect_timeout=1.0,
                                             remote_retry_interval=1.0, **kw)


def keys_per_master(cluster) -> list[int]:
    return [m.client().dbsize() for m in cluster.running_masters()]


def chunk_names(engine, p: int) -> list[str]:
    return [c.key.to_string() for c in engine.token_db.chunks(prompt_tokens(p, N))]


def test_chunks_spread_over_every_shard_and_a_second_process_hits(redis_cluster, run_children):
    redis_cluster.flushall()
    cfg = dict(chunk_size=CS, max_local_cpu_size=0.05, local_cpu=False, remote_url=redis_cluster.url)
    (stored,) = run_children(dict(config=cfg, mode="store", prompts=list(range(1, 9)), tokens=N))
    assert stored["stored"] == 8 * N
    per_master = keys_per_master(redis_cluster)
    assert sum(per_master) == 8 * N // CS and all(n > 0 for n in per_master), per_master

    engine, conn = make_engine(cluster_config(redis_cluster.url), N)
    for p in range(1, 9):
        assert engine.lookup(prompt_tokens(p, N)) == N
        assert check_prompt(engine, conn, p, N) == (N, True)
    assert engine.lookup(prompt_tokens(99, N)) == 0
    engine.close()


def test_keys_lost_on_one_shard_are_misses_not_short_loads(redis_cluster):
    redis_cluster.flushall()
    engine, conn = make_engine(cluster_config(redis_cluster.url), N)
    for p in range(1, 9):
        store_prompt(engine, conn, p, N)
    assert engine.flush(10)
    lost = redis_cluster.running_masters()[0]
    lost.client().flushall()  # what maxmemory eviction or a failover without a synced replica does
    client = redis_cluster_client(redis_cluster)
    with_lost_chunk = 0
    for p in range(1, 9):
        present = [bool(client.exists(n)) for n in chunk_names(engine, p)]
        expected = present.index(False) * CS if False in present else N
        with_lost_chunk += expected < N
        assert engine.lookup(prompt_tokens(p, N)) == expected
        assert check_prompt(engine, conn, p, N) == (expected, True)
    assert with_lost_chunk > 0  # the flushed shard held some prompt's chunk
    client.close()
    engine.close()


def redis_cluster_client(cluster):
    from redis.cluster import RedisCluster

    node = cluster.running_masters()[0]
    return RedisCluster(host="127.0.0.1", port=node.port, require_full_coverage=False)


def node_id(server) -> str:
    return server.client().execute_command("CLUSTER MYID").decode()


def test_a_slot_migration_during_traffic_is_followed(redis_cluster):
    """Slots holding chunks move from one master to another, step by step as
    `redis-cli --cluster reshard` moves them, with traffic after each step: while a
    slot is migrating its moved keys answer ASK, once it moved its old owner MOVED."""
    redis_cluster.flushall()
    engine, conn = make_engine(cluster_config(redis_cluster.url), N)
    for p in range(1, 9):
        store_prompt(engine, conn, p, N)
    assert engine.flush(10)

    def traffic():
        for p in range(1, 9):
            assert engine.lookup(prompt_tokens(p, N)) == N
            assert check_prompt(engine, conn, p, N) == (N, True)

    traffic()  # the tier has learnt the slot map
    src, dst = redis_cluster.running_masters()[:2]
    src_c, dst_c = src.client(), dst.client()
    names = sorted(src_c.keys())[:3]
    assert names, "no chunk on the first master"
    slots = sorted({src_c.execute_command("CLUSTER KEYSLOT", n) for n in names})
    for slot in slots:
        dst_c.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", node_id(dst))
        src_c.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", node_id(dst))
    for name in names:  # keys moved, slots still migrating: the old owner answers ASK
        src_c.execute_command("MIGRATE", "127.0.0.1", dst.port, name, 0, 5000)
    traffic()
    for slot in slots:  # the move is final: the old owner answers MOVED
        for master in redis_cluster.running_masters():
            master.client().execute_command("CLUSTER SETSLOT", slot, "NODE", node_id(dst))
    traffic()
    assert not set(names) & set(src_c.keys()) and set(names) <= set(dst_c.keys())
    store_prompt(engine, conn, 20, N)  # writes land on the new owners
    assert engine.flush(10) and check_prompt(engine, conn, 20, N) == (N, True)
    assert engine.stats.misses["tier_down"] == 0 and engine.stats.misses["dropped"] == 0
    engine.close()


def test_master_killed_mid_traffic_then_failed_over(redis_cluster, caplog):
    redis_cluster.flushall()
    engine, conn = make_engine(cluster_config(redis_cluster.url), N)
    for p in range(1, 9):
        store_prompt(engine, conn, p, N)
    assert engine.flush(10)
    for master in redis_cluster.running_masters():  # the replicas hold everything stored so far
        master.client().execute_command("WAIT", 1, 2000)
    victim = redis_cluster.running_masters()[0]
    caplog.set_level(logging.WARNING, logger="lmcache")
    p, killed_at, recovered = 100, None, False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # traffic: a store and two checks per round
        p += 1
        store_prompt(engine, conn, p, N)
        for old in (p % 8 + 1, p - 1):
            loaded, exact = check_prompt(engine, conn, old, N)
            assert exact, f"prompt {old}: wrong KV after {loaded} tokens"
        if killed_at is None and p == 105:
            victim.kill()
            killed_at = p
        if killed_at is not None and p > killed_at + 2 and len(redis_cluster.running_masters()) == 3:
            engine.flush(10)
            if all(engine.lookup(prompt_tokens(q, N)) == N for q in range(1, 9)):
                recovered = True
                break
        time.sleep(0.05)
    assert recovered, "hits did not come back after the replica was promoted"
    assert engine.flush(10)
    store_prompt(engine, conn, 999, N)  # after the failover: stored and loaded whole again
    assert engine.flush(10) and check_prompt(engine, conn, 999, N) == (N, True)
    outage_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_lines) == 1, [r.getMessage() for r in outage_lines]
    assert "reachable again" in caplog.text
    assert engine.stats.misses["tier_down"] > 0
    engine.close()
    victim.start()  # rejoins as a replica of the promoted node
    redis_cluster.wait_healthy()
