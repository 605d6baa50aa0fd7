"""Upstream 0.5.6, patched and as published, under our HPU emulation with GPU migration.

The emulation backs `hpu` tensors with CPU memory: these tests prove detection,
placement, data movement, sync counts and shape counts, not Gaudi speed. Each tree
runs in its own subprocess (tests/helpers/probe_056.py; both are named `lmcache`),
the two at the same time.
"""

from __future__ import annotations

import pytest

from tests.helpers.probe_runner import run_probes, section

pytestmark = pytest.mark.network

ROUND_TRIPS = [f"round_trip_{d}_{a}" for d in ("bfloat16", "float8_e4m3fn") for a in ("mha", "mla")]


@pytest.fixture
def base_version() -> str:
    return "0.5.6"


@pytest.fixture(scope="module")
def probes(patched_tree_for, unpatched_tree_for, tmp_path_factory) -> dict:
    return run_probes(
        {"patched": (patched_tree_for("0.5.6"), []), "unpatched": (unpatched_tree_for("0.5.6"), ["--unpatched"])},
        script="probe_056.py", cwd=tmp_path_factory.mktemp("probe056"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def patched(probes) -> dict:
    return probes["patched"]


@pytest.fixture(scope="module")
def unpatched(probes) -> dict:
    return probes["unpatched"]


def test_detection_says_hpu_under_gpu_migration_and_cpu_without_the_emulation(patched, patched_tree_for):
    found = section(patched, "detection_migration")
    assert found["lmcache_file"].startswith(str(patched_tree_for("0.5.6")))
    assert (found["device_type"], found["is_hpu_available"], found["is_cuda_available"]) == ("hpu", True, False)
    assert section(patched, "detection_plain_hpu")["device_type"] == "hpu"
    after = section(patched, "detection_after_emulation")
    assert (after["device_type"], after["is_hpu_available"]) == ("cpu", False)


def test_0_5_6_factory_returns_the_patched_hpu_connector_and_still_refuses_layerwise(patched, unpatched):
    factory = section(patched, "factory")
    assert (factory["class"], factory["module"]) == (
        "VLLMPagedMemHPUConnectorV2", "lmcache.v1.gpu_connector.hpu_connector")  # fmt: skip
    assert factory["batched_in_one_pass"] and not section(unpatched, "factory")["batched_in_one_pass"]
    assert factory["torch_device_type"] == "hpu"
    assert factory["layerwise"]["raised"] == "ValueError"
    assert "use_layerwise" in factory["layerwise"]["message"]
    assert factory["cuda_calls"] == []


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_store_and_retrieve_through_the_0_5_6_engine_are_bit_exact(patched, name):
    trip = section(patched, name)
    assert trip["differs_before"], "target cache already equal to the source: the check proves nothing"
    assert trip["sees_corruption"], "a flipped byte in the target went unnoticed: the check proves nothing"
    assert trip["bit_exact"]
    assert trip["counts"]["retrieved_lazy"] == trip["counts"]["retrieved_eager"] == trip["num_tokens"]
    assert trip["cuda_calls"] == []


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_patched_batch_makes_one_graph_break_in_lazy_mode_none_in_eager_and_one_sync(patched, name):
    counts = section(patched, name)["counts"]  # [mark_steps, synchronizes] for one batched call
    assert counts["store_lazy"] == [1, 1] and counts["retrieve_lazy"] == [1, 1]
    assert counts["store_eager"] == [0, 1] and counts["retrieve_eager"] == [0, 1]


@pytest.mark.parametrize("name", ["round_trip_bfloat16_mha", "round_trip_bfloat16_mla"])
def test_unpatched_0_5_6_breaks_and_syncs_per_chunk_and_layer(unpatched, name):
    trip = section(unpatched, name)
    assert trip["bit_exact"]  # the same data moves: only the discipline differs
    chunks, layers, counts = trip["chunks"], trip["layers"], trip["counts"]
    for mode in ("lazy", "eager"):  # its mark_step()s do not ask which mode the bridge is in
        assert counts[f"store_{mode}"] == [2 * chunks, chunks]
        assert counts[f"retrieve_{mode}"] == [chunks * (1 + layers), chunks]


def test_distinct_shapes_over_200_varied_steps_are_bounded_after_the_patch(patched, unpatched):
    after, before = section(patched, "shapes"), section(unpatched, "shapes")
    assert after["steps"] == before["steps"] == 200
    assert after["bit_exact_last"] and before["bit_exact_last"]
    # Patched: row counts are 256, 512 or 1024 (lengths 1 .. 1024), one gather and
    # one scatter signature each, all seen early; unpatched: one per chunk length.
    assert after["distinct"] <= 6
    assert after["after_50"] == after["distinct"]
    assert before["distinct"] > 20 * after["distinct"]
    assert before["after_50"] < before["after_100"] < before["distinct"]


def test_patched_refuses_k_only_single_tensors_and_vllm_gaudis_defragmenter(patched, unpatched):
    refusals = section(patched, "refusals")
    assert refusals["single_tensor"]["raised"] == "ValueError"
    assert "VLLM_DYNAMIC_KV_QUANT" in refusals["single_tensor"]["message"]
    assert refusals["defrag_true"]["raised"] == "ValueError"
    assert "VLLM_DEFRAG=false" in refusals["defrag_true"]["message"]
    assert refusals["defrag_false"]["raised"] is None
    # 0.5.6 as published builds a connector under the defragmenter without a word.
    assert section(unpatched, "refusals")["defrag_true"]["raised"] is None


def test_patched_host_buffers_are_pageable_where_pinning_is_not_proven(patched):
    assert section(patched, "host_memory")["use_pinned"] is False
