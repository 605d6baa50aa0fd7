"""Several processes writing the same and different chunks to one disk directory
and one Redis server, while another process reads: never a corrupt or wrong read."""

import os

import pytest

from lmcache.v1.config import LMCacheEngineConfig
from tests.storage.workload import check_prompt, make_engine

CS, N = 64, 512  # 8 chunks of 64 KiB per prompt


@pytest.mark.redis
def test_concurrent_writers_and_reader_see_only_whole_chunks(tmp_path, redis_url, run_children):
    cfg = dict(chunk_size=CS, max_local_cpu_size=0.05, local_disk=str(tmp_path), max_local_disk_size=0.1,
               remote_url=redis_url)
    writer_a = dict(config=cfg, mode="rewrite", prompts=[0, 1, 2, 3, 4, 5], tokens=N, rounds=3)
    writer_b = dict(config=cfg, mode="rewrite", prompts=[3, 4, 5, 6, 7, 8], tokens=N, rounds=3)
    reader = dict(config=dict(cfg, local_cpu=False), mode="check", prompts=list(range(9)), tokens=N, rounds=3)
    a, b, r = run_children(writer_a, writer_b, reader)

    assert a["stored"] == b["stored"] == 2 * 6 * 8 * 3  # disk + Redis, every chunk, every round
    assert r["wrong"] == 0, r
    assert r["stats"]["misses_corrupt"] == 0, r  # no torn or half-written file or value was seen
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**dict(cfg, local_cpu=False)), N)
    for p in range(9):
        assert check_prompt(engine, conn, p, N) == (N, True)
    engine.close()
