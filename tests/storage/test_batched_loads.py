"""What a multi-chunk load costs on each shared store, counted by the real server: the
chunks a lookup holds for a load (the lease path vLLM takes) are read as one pipelined
round trip per Redis node (single server, sentinel master, every cluster master: the
server's own `total_reads_processed` grows by one, its GET count by the chunks it holds),
and from S3 as parallel GETs (several in flight at once). A one-by-one load costs a
round trip per chunk and fails these tests."""

from __future__ import annotations


import pytest
import torch

from lmcache.v1.cache_engine import TransferSpec
from lmcache.v1.config import LMCacheEngineConfig
from tests.helpers.host_connector import bits
from tests.helpers.s3_calls import CallsInFlight
from tests.helpers.s3_server import BUCKET, s3_env, s3_server  # noqa: F401 - fixtures
from tests.helpers.workload import make_engine, prompt_kv, prompt_tokens, store_prompt
from tests.helpers.redis_counters import round_trips_and_calls

pytestmark = pytest.mark.redis
CS, N = 16, 512  # 32 chunks per prompt


def engine_for(url: str, **kw):
    config = LMCacheEngineConfig.from_defaults(chunk_size=CS, max_local_cpu_size=0.1, local_cpu=False,
                                               remote_url=url, remote_timeout=5.0, remote_connect_timeout=1.0,
                                               remote_retry_interval=1.0, **kw)
    return make_engine(config, N)


def leased_load_is_exact(engine, conn, p: int) -> bool:
    """The lease's chunks, scattered into the paged cache, are prompt p's KV."""
    slots = torch.arange(N)
    conn.cache.zero_()
    loaded = engine.batched_retrieve([TransferSpec(prompt_tokens(p, N), slots, lease_id="load")])[0]
    return loaded == N and torch.equal(bits(conn.cache[:N]), bits(prompt_kv(p, N, conn.kv_dtype)))


def assert_one_round_trip_per_node(url: str, nodes: list) -> None:
    writer, wconn = engine_for(url)
    store_prompt(writer, wconn, 1, N)
    assert writer.flush(20)
    writer.close()
    engine, conn = engine_for(url)
    assert engine.lookup(prompt_tokens(1, N)) == N  # connections made, topology learnt
    clients = [node.client() for node in nodes]
    for client in clients:
        client.ping()
    before = [round_trips_and_calls(client, "get") for client in clients]
    assert engine.lookup(prompt_tokens(1, N), lease_id="load") == N  # reads the 32 chunks
    after = [round_trips_and_calls(client, "get") for client in clients]
    gets = [a[1] - b[1] for a, b in zip(after, before)]
    # less the INFO commands' own 2 reads: the lookup's EXISTS round trip, the load's GET
    # round trip, and maybe a replica's REPLCONF ACK (one a second)
    reads = [a[0] - b[0] - 2 for a, b in zip(after, before)]
    assert sum(gets) == N // CS, gets
    for read, get in zip(reads, gets):
        assert read <= (2 if get else 0) + 1, f"{get} GETs cost {read} reads (round trips): not pipelined"
    assert leased_load_is_exact(engine, conn, 1)
    engine.close()


def assert_load_without_lease_is_one_round_trip_per_node(url: str, nodes: list) -> None:
    """A retrieve with no lookup before it (no lease) reads its chunks with one get_many."""
    writer, wconn = engine_for(url)
    store_prompt(writer, wconn, 1, N)
    assert writer.flush(20)
    writer.close()
    engine, conn = engine_for(url)
    assert engine.lookup(prompt_tokens(2, N)) == 0  # connections made, topology learnt; prompt 1 not read
    clients = [node.client() for node in nodes]
    for client in clients:
        client.ping()
    before = [round_trips_and_calls(client, "get") for client in clients]
    conn.cache.zero_()
    loaded = engine.batched_retrieve([TransferSpec(prompt_tokens(1, N), torch.arange(N))])[0]
    after = [round_trips_and_calls(client, "get") for client in clients]
    gets = [a[1] - b[1] for a, b in zip(after, before)]
    reads = [a[0] - b[0] - 2 for a, b in zip(after, before)]  # less the INFO commands' own 2 reads
    assert sum(gets) == N // CS, gets
    for read, get in zip(reads, gets):
        assert read <= (1 if get else 0) + 1, f"{get} GETs cost {read} reads (round trips): not pipelined"
    assert loaded == N and torch.equal(bits(conn.cache[:N]), bits(prompt_kv(1, N, conn.kv_dtype)))
    engine.close()


def test_single_server_load_without_a_lease_is_one_pipelined_round_trip(redis_server, redis_url):
    assert_load_without_lease_is_one_round_trip_per_node(redis_url, [redis_server])


def test_cluster_load_without_a_lease_is_one_pipelined_round_trip_per_master(redis_cluster):
    redis_cluster.flushall()
    assert_load_without_lease_is_one_round_trip_per_node(redis_cluster.url, redis_cluster.running_masters())


def test_single_server_load_is_one_pipelined_round_trip(redis_server, redis_url):
    assert_one_round_trip_per_node(redis_url, [redis_server])


def test_sentinel_master_load_is_one_pipelined_round_trip(redis_sentinels):
    master = redis_sentinels.current_master()
    master.client().flushall()
    assert_one_round_trip_per_node(redis_sentinels.url, [master])


def test_cluster_load_is_one_pipelined_round_trip_per_master(redis_cluster):
    redis_cluster.flushall()
    masters = redis_cluster.running_masters()
    assert_one_round_trip_per_node(redis_cluster.url, masters)


def test_s3_load_sends_its_gets_in_parallel(s3_env):
    url = f"s3://{BUCKET}/batched/"
    writer, wconn = engine_for(url, s3_endpoint_url=s3_env.endpoint)
    store_prompt(writer, wconn, 1, N)
    assert writer.flush(20)
    writer.close()
    engine, conn = engine_for(url, s3_endpoint_url=s3_env.endpoint)
    gets = CallsInFlight(engine.storage.remote._client, "GetObject")
    assert engine.lookup(prompt_tokens(1, N), lease_id="load") == N
    assert gets.calls == N // CS  # one GET per (small) chunk
    assert gets.most > 1, "the load's GETs went one after another"
    assert leased_load_is_exact(engine, conn, 1)
    engine.close()
