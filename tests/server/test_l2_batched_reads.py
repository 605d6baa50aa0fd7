"""The lmcache server reads a pin's chunks that only its lower tier (L2) holds in one
batched read: with a Redis L2 (`--l2-adapter resp`), one pipelined round trip,
counted by the Redis server itself (`total_reads_processed`, `cmdstat_get`); a
server that read them one key at a time costs a round trip per chunk and fails."""

from __future__ import annotations

import json

import pytest

from lmcache.v1.config import LMCacheEngineConfig
from tests.helpers.workload import check_prompt, make_engine, prompt_tokens, store_prompt
from tests.helpers.redis_counters import round_trips_and_calls

pytestmark = pytest.mark.redis
N = 256  # tokens: 16 chunks of 16


def test_a_pin_reads_its_l2_chunks_in_one_round_trip(cache_server_factory, redis_server, redis_url):
    adapter = json.dumps({"type": "resp", "host": "127.0.0.1", "port": redis_server.port})
    server = cache_server_factory(extra_args=("--l2-adapter", adapter)).start()
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**server.config()), N)
    try:
        assert store_prompt(engine, conn, 1, N) == N
        assert engine.flush(20)
    finally:
        engine.close()
    server.stop()  # SIGTERM: its queued L2 writes are finished; host memory (L1) is gone
    server.start()
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**server.config()), N)
    try:
        assert engine.lookup(prompt_tokens(2, N)) == 0  # the server's L2 connection is made
        client = redis_server.client()
        client.ping()
        before = round_trips_and_calls(client, "get")
        assert engine.lookup(prompt_tokens(1, N), lease_id="load") == N  # pins the 16 chunks: read from L2
        after = round_trips_and_calls(client, "get")
        gets, reads = after[1] - before[1], after[0] - before[0] - 2  # less the INFO commands' own 2 reads
        assert gets == N // 16
        # the lookup's EXISTS round trip and the pin's GET round trip
        assert reads <= 2, f"{gets} GETs cost {reads} reads (round trips): not batched"
        assert check_prompt(engine, conn, 1, N) == (N, True)
        engine.release_lease("load")
    finally:
        engine.close()
    assert server.status()["stats"]["tier_remote.hit_tokens"] == N
