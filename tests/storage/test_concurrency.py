"""Two processes write the same and different chunks to one disk directory and one
Redis server while this process keeps reading them: never a corrupt or wrong read."""

import os
import time

import pytest

from lmcache.v1.config import LMCacheEngineConfig
from tests.helpers.children import child_result, spawn_child
from tests.helpers.workload import check_prompt, check_remote, make_engine

CS, N = 64, 512  # 8 chunks of 64 KiB per prompt


@pytest.mark.redis
def test_concurrent_writers_and_reader_see_only_whole_chunks(tmp_path, redis_url):
    cfg = dict(chunk_size=CS, max_local_cpu_size=0.05, local_disk=str(tmp_path), max_local_disk_size=0.1,
               remote_url=redis_url)
    writers = [
        spawn_child(dict(config=cfg, mode="rewrite", prompts=[0, 1, 2, 3, 4], tokens=N, rounds=3)),
        spawn_child(dict(config=cfg, mode="rewrite", prompts=[2, 3, 4, 5, 6], tokens=N, rounds=3)),
    ]
    reader, conn = make_engine(LMCacheEngineConfig.from_defaults(**dict(cfg, local_cpu=False)), N)
    reads = wrong = remote_found = 0
    try:
        while any(w.poll() is None for w in writers) or reads == 0:
            for p in range(7):  # read while they write: every hit must be exact
                loaded, exact = check_prompt(reader, conn, p, N)
                found, bad = check_remote(reader, p, N)
                reads += loaded // CS
                remote_found += found
                wrong += (not exact) + bad
            time.sleep(0.005)  # leave the writers some CPU on small machines
        results = [child_result(w) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    assert [r["stored"] for r in results] == [2 * 5 * 8 * 3] * 2  # disk + Redis, every chunk, every round
    assert reads > 0 and remote_found > 0
    assert wrong == 0
    assert reader.stats.misses["corrupt"] == 0, reader.stats  # no torn or half-written file or value
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    for p in range(7):
        assert check_prompt(reader, conn, p, N) == (N, True)
    reader.close()
