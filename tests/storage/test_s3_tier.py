"""The s3:// tier against a real S3-compatible server (SeaweedFS on 127.0.0.1,
tests/helpers/s3_server.py): a second process's hits, the request cost of a
lookup, parallel multipart upload and ranged reads of a large chunk, a bad object,
and the server SIGKILLed mid-run and started again."""

from __future__ import annotations

import logging
import time

import torch

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory import HostMemoryPool, MemoryFormat, MemoryObj
from lmcache.v1.storage_backend.s3 import PART_BYTES, S3Backend
from lmcache.v1.token_database import CacheEngineKey
from tests.helpers.s3_server import BUCKET, CREDENTIALS, s3_env, s3_server  # noqa: F401 - fixtures
from tests.helpers.workload import check_prompt, make_engine, prompt_tokens, store_prompt

CS, N = 16, 64
URL = f"s3://{BUCKET}/kv/run1"


def s3_config(server, **kw) -> LMCacheEngineConfig:
    return LMCacheEngineConfig.from_defaults(chunk_size=CS, max_local_cpu_size=0.05, local_cpu=False,
                                             remote_url=URL, s3_endpoint_url=server.endpoint, remote_timeout=2.0,
                                             remote_connect_timeout=0.3, remote_retry_interval=0.5, **kw)


def requests_of(tier: S3Backend) -> list[str]:
    """The names of the S3 operations `tier` sends from now on."""
    seen: list[str] = []
    tier._client.meta.events.register("before-call.s3", lambda model, **_: seen.append(model.name))
    return seen


def test_a_second_process_hits_what_the_first_stored(s3_env, run_children):
    cfg = dict(chunk_size=CS, max_local_cpu_size=0.05, local_cpu=False, remote_url=URL,
               s3_endpoint_url=s3_env.endpoint)
    (stored,) = run_children(dict(config=cfg, mode="store", prompts=[1, 2], tokens=N), env=CREDENTIALS)
    assert stored["stored"] == 2 * N
    listed = s3_env.client().list_objects_v2(Bucket=BUCKET, Prefix="kv/run1/")
    assert listed["KeyCount"] == 2 * N // CS
    engine, conn = make_engine(s3_config(s3_env), N)
    for p in (1, 2):
        assert engine.lookup(prompt_tokens(p, N)) == N
        assert check_prompt(engine, conn, p, N) == (N, True)
    assert engine.lookup(prompt_tokens(3, N)) == 0
    engine.close()


def _key(i: int) -> CacheEngineKey:
    return CacheEngineKey("m", 1, 0, f"{i:032x}", "bfloat16", "kv")


def test_a_lookup_costs_parallel_heads_in_waves_stopping_at_a_miss(s3_env):
    tier = S3Backend(URL, endpoint_url=s3_env.endpoint, concurrency=8)
    small = MemoryObj(torch.ones(2, 1, 16, 8, dtype=torch.bfloat16), MemoryFormat.KV_2LTD)
    keys = [_key(i) for i in range(40)]
    for key in keys[:20]:
        assert tier.put(key, small)
    sent = requests_of(tier)
    assert tier.prefix_count(keys) == 20
    assert sent.count("HeadObject") == 24  # three waves of 8: the third has the first miss
    sent.clear()
    assert tier.prefix_count(keys[18:]) == 2 and len(sent) == 8  # one wave
    tier.close()


def test_a_large_chunk_is_uploaded_in_parallel_parts_and_read_in_ranges(s3_env):
    tier = S3Backend(URL, endpoint_url=s3_env.endpoint, timeout=10.0)
    tensor = torch.empty(2, 20, 256, 1024, dtype=torch.bfloat16)  # 20 MiB
    tensor.view(torch.int16).random_()
    obj = MemoryObj(tensor, MemoryFormat.KV_2LTD)
    sent = requests_of(tier)
    assert tier.put(_key(1), obj)
    assert sent.count("UploadPart") == -(-(obj.tensor.nbytes + 64) // PART_BYTES) >= 3
    sent.clear()
    pool = HostMemoryPool(2 * obj.tensor.nbytes)
    back = tier.get(_key(1), pool.allocate)
    assert back is not None and torch.equal(back.tensor.view(torch.int16), tensor.view(torch.int16))
    assert sent.count("GetObject") >= 3
    tier.close()


def test_a_bad_object_is_a_miss_and_deleted(s3_env, caplog):
    tier = S3Backend(URL, endpoint_url=s3_env.endpoint)
    name = tier.object_key(_key(7))
    s3_env.client().put_object(Bucket=BUCKET, Key=name, Body=b"\x80\x04\x95not a chunk")
    pool = HostMemoryPool(1 << 20)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert tier.get(_key(7), pool.allocate) is None
    assert "not a valid chunk" in caplog.text
    assert tier.prefix_count([_key(7)]) == 0
    tier.close()


def test_server_killed_mid_run_is_misses_then_hits_come_back(s3_env, caplog):
    engine, conn = make_engine(s3_config(s3_env), N)
    store_prompt(engine, conn, 1, N)
    assert engine.flush(10) and check_prompt(engine, conn, 1, N) == (N, True)
    caplog.set_level(logging.WARNING, logger="lmcache")
    s3_env.stop()
    started = time.monotonic()
    for p in range(2, 6):  # the run goes on: stores and loads are misses, nothing raises
        store_prompt(engine, conn, p, N)
        assert engine.lookup(prompt_tokens(p, N)) == 0
        assert check_prompt(engine, conn, 1, N)[0] == 0
    assert engine.flush(20)
    assert time.monotonic() - started < 15, "stuck on the dead server"
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
    assert engine.stats.misses["tier_down"] > 0 and engine.stats.misses["dropped"] > 0

    s3_env.start()  # same ports and directory: what was stored before is there again
    deadline = time.monotonic() + 10
    while engine.lookup(prompt_tokens(1, N)) != N and time.monotonic() < deadline:
        time.sleep(0.2)
    assert check_prompt(engine, conn, 1, N) == (N, True)
    store_prompt(engine, conn, 7, N)
    assert engine.flush(10) and check_prompt(engine, conn, 7, N) == (N, True)
    assert "reachable again" in caplog.text
    engine.close()
