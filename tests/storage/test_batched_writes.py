"""What storing a step's chunks costs on each shared store, counted by the real server:
the step's SETs go as one pipeline per Redis node (single server, sentinel master,
every cluster master: the server's own `total_reads_processed` grows by a few socket
reads for all of them, where one SET per round trip costs at least one read each), and
to S3 as parallel PUTs (several in flight at once). Small chunks (2 KiB), so that a
pipeline's bytes fit in a few of the server's 16 KiB reads."""

from __future__ import annotations


import pytest

from lmcache.v1.config import LMCacheEngineConfig
from tests.helpers.s3_calls import CallsInFlight
from tests.helpers.s3_server import BUCKET, s3_env, s3_server  # noqa: F401 - fixtures
from tests.helpers.workload import check_prompt, make_engine, prompt_tokens, store_prompt
from tests.helpers.redis_counters import round_trips_and_calls

pytestmark = pytest.mark.redis
CS, N = 2, 64  # 32 chunks of 2 KiB per prompt


def engine_for(url: str, **kw):
    config = LMCacheEngineConfig.from_defaults(chunk_size=CS, max_local_cpu_size=0.1, local_cpu=False,
                                               remote_url=url, remote_timeout=5.0, remote_connect_timeout=1.0,
                                               remote_retry_interval=1.0, **kw)
    return make_engine(config, N)


def assert_pipelined_per_node(url: str, nodes: list) -> None:
    engine, conn = engine_for(url)
    assert engine.lookup(prompt_tokens(1, N)) == 0  # connections made, topology learnt
    clients = [node.client() for node in nodes]
    for client in clients:
        client.ping()
    before = [round_trips_and_calls(client, "set") for client in clients]
    assert store_prompt(engine, conn, 1, N) == N  # one step: 32 chunks
    assert engine.flush(20)
    after = [round_trips_and_calls(client, "set") for client in clients]
    sets = [a[1] - b[1] for a, b in zip(after, before)]
    # less the INFO commands' own 2 reads, and maybe a replica's REPLCONF ACK (one a second)
    reads = [a[0] - b[0] - 2 for a, b in zip(after, before)]
    assert sum(sets) == N // CS, sets
    for read, set_calls in zip(reads, sets):
        # pipelined: the node's ~2 KiB SETs arrive in a few 16 KiB reads; one by one: a read each
        assert read <= set_calls // 3 + 2, f"{set_calls} SETs cost {read} reads (round trips): not pipelined"
    engine.close()
    reader, rconn = engine_for(url)
    assert check_prompt(reader, rconn, 1, N) == (N, True)  # what was pipelined reads back exactly
    reader.close()


def test_single_server_step_is_one_pipeline(redis_server, redis_url):
    assert_pipelined_per_node(redis_url, [redis_server])


def test_sentinel_master_step_is_one_pipeline(redis_sentinels):
    master = redis_sentinels.current_master()
    master.client().flushall()
    assert_pipelined_per_node(redis_sentinels.url, [master])


def test_cluster_step_is_one_pipeline_per_master(redis_cluster):
    redis_cluster.flushall()
    assert_pipelined_per_node(redis_cluster.url, redis_cluster.running_masters())


def test_s3_step_sends_its_puts_in_parallel(s3_env):
    url = f"s3://{BUCKET}/batched-writes/"
    engine, conn = engine_for(url, s3_endpoint_url=s3_env.endpoint)
    puts = CallsInFlight(engine.storage.remote._client, "PutObject")
    assert store_prompt(engine, conn, 1, N) == N
    assert engine.flush(20)
    assert puts.calls == N // CS  # one PUT per (small) chunk
    assert puts.most > 1, "the step's PUTs went one after another"
    engine.close()
    reader, rconn = engine_for(url, s3_endpoint_url=s3_env.endpoint)
    loaded, exact = check_prompt(reader, rconn, 1, N)
    assert (loaded, exact) == (N, True)
    reader.close()
