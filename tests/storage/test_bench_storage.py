"""`python -m lmcache bench storage` and `bench lookup` run and report their figures
(tiny sizes, so they are quick; speed itself is not tested)."""

import pytest

from tests.helpers.bench_cli import run_bench


def bench(*args) -> tuple[dict, str]:
    return run_bench(*args, timeout=180)


@pytest.mark.redis
def test_bench_storage_reports_every_tier_against_its_baseline(tmp_path):
    result, text = bench("storage", "--chunks", "2", "--tokens", "16", "--layers", "2", "--repeat", "1",
                         "--disk-dir", str(tmp_path))
    assert result["bench"] == "storage" and isinstance(result["targets_met"], bool)
    for ratio in ("cpu_put_vs_memcpy", "cpu_get_vs_memcpy", "disk_put_vs_raw_write", "disk_get_vs_raw_read",
                  "redis_put_vs_raw_set", "redis_get_vs_raw_get", "lm_put_vs_socket_send", "lm_get_vs_socket_recv",
                  "server_put_vs_in_process_put", "server_get_vs_in_process_get"):
        assert result[ratio] > 0, ratio
    assert "raw_read" in text and list(tmp_path.iterdir()) == []  # its files are cleaned up


def test_bench_lookup_finds_the_whole_prompt():
    result, _ = bench("lookup", "--tokens", "4100", "--chunk-size", "256", "--repeat", "2")
    assert result["hit_tokens"] == 4096 and result["chunks"] == 16  # the partial chunk is not stored
    for figure in ("lookup_ms", "lookup_tensor_ms", "lookup_ndarray_ms", "hash_ms", "tier_walk_ms"):
        assert result[figure] > 0, figure
