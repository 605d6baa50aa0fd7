"""`python -m lmcache bench connector` runs and reports its figures (tiny sizes; speed is not tested)."""

import subprocess
import sys

import pytest

from tests.helpers.bench_cli import run_bench


def test_bench_connector_prints_figures_and_json_last(cpu_platform):
    result, stdout = run_bench("connector", "--device", "cpu", "--layouts", "hpu_kv,flash_attn", "--tokens", "512",
                               "--layers", "2", "--repeat", "1", "--threads", "1", timeout=120)
    assert result["bench"] == "connector" and result["device"] == "cpu" and not result["emulated"]
    for key in ("store_gbps", "load_gbps", "store_vs_memcpy", "load_vs_memcpy", "store_vs_upstream_pattern",
                "load_vs_upstream_pattern", "flash_attn_store_vs_memcpy", "hpu_kv_store_vs_upstream_pattern"):
        assert result[key] > 0, key
    assert isinstance(result["targets_met"], bool)
    assert "layout" in stdout and "hpu_kv" in stdout


@pytest.mark.parametrize("args,message", [
    (["--device", "hpu"], "--emulate-hpu"),
    (["--layouts", "paged_attention"], "accepted: flash_attn, cpu_attn, cpu_attn_portable, hpu_kv"),
])
def test_bench_connector_refuses_what_it_cannot_measure(args, message):
    from lmcache.platforms.hpu import HpuPlatform

    if args[:2] == ["--device", "hpu"] and HpuPlatform.is_present():
        pytest.skip("a real Gaudi is present here, so --device hpu runs instead of refusing")
    out = subprocess.run([sys.executable, "-m", "lmcache", "bench", "connector", "--tokens", "256", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr + out.stdout


def test_bench_connector_counts_shapes_on_the_emulated_hpu():
    """--device hpu --emulate-hpu: distinct op shapes over varied steps, ours (bucketed) against
    ours unbucketed and upstream's pattern (emulation: shapes, not Gaudi speed)."""
    from lmcache.testing.hpu_emulation import real_bridge_present

    if real_bridge_present():
        pytest.skip("a real Gaudi stack is present; the emulation refuses to run over it")
    result, stdout = run_bench("connector", "--device", "hpu", "--emulate-hpu", "--tokens", "1024", "--layers", "2",
                               "--repeat", "1", "--shape-steps", "8", timeout=300)
    assert result["emulated"] and result["targets_met"] is False
    ours = result["hpu_kv_distinct_data_op_shapes_ours"]
    assert 0 < ours < result["hpu_kv_distinct_data_op_shapes_ours_unbucketed"]
    assert ours < result["hpu_kv_distinct_data_op_shapes_upstream_pattern"]
    assert "upstream_pattern" in stdout and "EMULATED HPU" in stdout


def test_bench_connector_server_path_through_a_real_server(cpu_platform):
    """--server: the same store/load through slots of a real `lmcache server` process, its
    bytes checked against the in-process path before timing (tiny sizes; speed not tested)."""
    result, stdout = run_bench("connector", "--device", "cpu", "--layouts", "cpu_attn_portable", "--tokens", "512",
                               "--layers", "2", "--repeat", "1", "--threads", "1", "--server", timeout=180)
    for key in ("server_store_gbps", "server_load_gbps", "server_store_vs_memcpy", "server_load_vs_in_process"):
        assert result[f"cpu_attn_portable_{key}"] > 0, key
    assert "server store GB/s" in stdout
