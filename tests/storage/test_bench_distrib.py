"""`bench storage` on the distributed tiers runs and reports each tier against its
raw client (tiny sizes; speed itself is not tested)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.redis
def test_bench_storage_distributed_tiers_against_their_raw_clients():
    out = subprocess.run([sys.executable, "-m", "lmcache", "bench", "storage", "--tiers", "redis,redis-cluster,s3",
                          "--chunks", "2", "--tokens", "16", "--layers", "2", "--repeat", "1"],
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for ratio in ("redis_cluster_put_vs_redis_cluster_raw_set", "redis_cluster_get_vs_redis_cluster_raw_get",
                  "redis_cluster_put_vs_redis", "redis_cluster_get_vs_redis", "s3_put_vs_s3_raw_set",
                  "s3_get_vs_s3_raw_get", "redis_put_vs_raw_set"):
        assert result[ratio] > 0, ratio
    assert isinstance(result["targets_met"], bool)
