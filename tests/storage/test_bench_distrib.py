"""`bench storage` on the distributed tiers runs and reports each tier against its
raw client (tiny sizes; speed itself is not tested)."""

import pytest

from tests.helpers.bench_cli import run_bench


@pytest.mark.redis
def test_bench_storage_distributed_tiers_against_their_raw_clients():
    result, _ = run_bench("storage", "--tiers", "redis,redis-cluster,s3", "--chunks", "2", "--tokens", "16",
                          "--layers", "2", "--repeat", "1", timeout=300)
    for ratio in ("redis_cluster_put_vs_redis_cluster_raw_set", "redis_cluster_get_vs_redis_cluster_raw_get",
                  "redis_cluster_put_vs_redis", "redis_cluster_get_vs_redis", "s3_put_vs_s3_raw_set",
                  "s3_get_vs_s3_raw_get", "redis_put_vs_raw_set"):
        assert result[ratio] > 0, ratio
    assert isinstance(result["targets_met"], bool)
