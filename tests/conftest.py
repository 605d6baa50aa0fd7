"""Shared pytest set-up. Fixtures live in tests/fixtures/, one file per concept."""

import os

import pytest

pytest_plugins = [
    "tests.fixtures.devices",
    "tests.fixtures.hpu",
    "tests.fixtures.redis",
    "tests.fixtures.model",
    "tests.fixtures.upstream_lmcache",
]


def pytest_collection_modifyitems(config, items):
    from tests.fixtures.devices import cuda_present

    if cuda_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA/AMD GPU; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def in_ci() -> bool:
    return os.environ.get("LMCACHE_CI") == "1"
