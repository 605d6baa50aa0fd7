"""Shared pytest set-up. Fixtures and helpers live in tests/helpers/, one file per concept."""

import os

import pytest

from tests.helpers import isa

# Before anything imports torch: a simulated ISA (LMCACHE_TEST_CPU_ISA) sets torch's dispatch too.
isa.set_torch_dispatch_early()

pytest_plugins = [
    "tests.helpers.devices",
    "tests.helpers.hpu",
    "tests.helpers.redis_fixtures",
    "tests.helpers.model",
    "tests.helpers.upstream_lmcache",
]


def pytest_configure(config):
    isa.apply()


def pytest_report_header(config):
    return isa.describe()


def pytest_collection_modifyitems(config, items):
    from tests.helpers.devices import cuda_present

    simulated = isa.requested()
    if simulated:
        other_process = pytest.mark.skip(
            reason=f"{isa.ENV}={simulated} simulates the ISA in the test process only; the vLLM engine this "
                   "test starts in other processes would see the real CPU")
        for item in items:
            if "e2e" in item.keywords:
                item.add_marker(other_process)
    if cuda_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA/AMD GPU; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def in_ci() -> bool:
    return os.environ.get("LMCACHE_CI") == "1"
