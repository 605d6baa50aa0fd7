"""The patched upstream 0.4.2 under our HPU emulation (lmcache.testing); 0.5.6: test_patched_056_on_emulated_hpu.py.

The emulation backs `hpu` tensors with CPU memory: these tests prove detection,
device placement, data movement and sync counts, not Gaudi speed. The patched tree
runs in a subprocess (tests/helpers/patched_probe.py): it is also named `lmcache`.
"""

from __future__ import annotations

import pytest

from tests.helpers.probe_runner import run_probe, section

pytestmark = pytest.mark.network


@pytest.fixture
def base_version() -> str:
    return "0.4.2"


@pytest.fixture(scope="module")
def probe(patched_tree_for, tmp_path_factory) -> dict:
    return run_probe(patched_tree_for("0.4.2"), emulate=True, cwd=tmp_path_factory.mktemp("probe"))


def test_probe_imported_the_patched_tree(probe, patched_tree):
    where = section(probe, "detection_migration")["lmcache_file"]
    assert where.startswith(str(patched_tree)), where


def test_detection_says_hpu_even_under_gpu_migration(probe):
    assert section(probe, "detection_migration") | {"lmcache_file": None} == {
        "lmcache_file": None,
        "device_type": "hpu",
        "is_hpu_available": True,
        "is_cuda_available": False,
    }


def test_detection_says_hpu_without_gpu_migration_and_cpu_once_it_is_gone(probe):
    assert section(probe, "detection_plain_hpu")["device_type"] == "hpu"
    after = section(probe, "detection_after_emulation")
    assert (after["device_type"], after["is_hpu_available"]) == ("cpu", False)


def test_worker_path_imports_without_touching_c_ops_under_gpu_migration(probe):
    imports = section(probe, "imports_migration")
    assert imports["failed"] == {}
    assert imports["c_ops_attempts"] == []


def test_factory_returns_the_hpu_connector_and_refuses_layerwise(probe):
    factory = section(probe, "factory")
    assert factory["class"] == "VLLMPagedMemHPUConnector"
    assert factory["module"] == "lmcache.v1.gpu_connector.hpu_connector"
    assert factory["device"] == "hpu:0"
    assert factory["layerwise"]["raised"] == "ValueError"
    assert "use_layerwise" in factory["layerwise"]["message"]
    assert "vllm-gaudi" in factory["layerwise"]["message"]
    assert factory["cuda_calls"] == []


def test_store_and_retrieve_through_the_0_4_2_engine_are_bit_exact(probe):
    trip = section(probe, "engine_round_trip")
    assert trip["differs_before"], "target cache already equal to the source: the check proves nothing"
    assert trip["retrieved_tokens"] == trip["num_tokens"]
    assert trip["bit_exact"]
    # 0.4.2's engine makes one batched call per request: one graph break, one sync.
    assert trip["store_counts"] == {"mark_steps": 1, "synchronizes": 1}
    assert trip["retrieve_counts"] == {"mark_steps": 1, "synchronizes": 1}
    assert trip["cuda_calls"] == []


@pytest.mark.parametrize("name, lazy", [("batch_lazy", True), ("batch_eager", False), ("batch_mla", True)])
def test_one_gather_or_scatter_per_layer_and_one_sync_per_batch(probe, name, lazy):
    batch = section(probe, name)
    planes = 1 if name == "batch_mla" else 2
    per_batch = batch["layers"] * planes  # for all `chunks` chunks together
    assert batch["chunks"] > 1
    assert batch["store"] == {"mark_steps": int(lazy), "synchronizes": 1, "gathers": per_batch, "scatters": 0}
    assert batch["load"] == {"mark_steps": int(lazy), "synchronizes": 1, "gathers": 0, "scatters": per_batch}
    assert batch["objects_hold_source"]
    assert batch["bit_exact"]
    assert batch["cuda_calls"] == []


def test_load_leaves_the_tokens_vllm_already_holds(probe):
    cached = section(probe, "vllm_cached")
    assert cached["cached_prefix_untouched"]
    assert cached["rest_loaded"]
