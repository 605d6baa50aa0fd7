"""`python -m lmcache doctor` on the distributed tiers: every cluster node checked
on its own, the sentinels asked for their master, the S3 bucket probed; each
against real servers (the module-scoped groups of tests/helpers/redis_fixtures.py)."""

from __future__ import annotations

import pytest

from lmcache.doctor import tiers
from lmcache.doctor.report import FAIL, OK, WARN
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.testing.processes import free_port
from tests.helpers.s3_server import BUCKET, s3_env, s3_server  # noqa: F401 - fixtures


def _config(**values) -> LMCacheEngineConfig:
    config = LMCacheEngineConfig()
    for k, v in values.items():
        setattr(config, k, v)
    return config


@pytest.mark.redis
def test_doctor_checks_every_cluster_node(redis_cluster):
    found = tiers.checks(_config(remote_url=redis_cluster.url), timeout=2.0)
    per_node = [f for f in found if f.check.startswith("tiers.remote.")]
    assert {f.check.rsplit(".", 1)[0] for f in per_node} and len({f.check for f in per_node}) == 6
    assert all(f.status == OK and "cluster_state ok" in f.fact for f in per_node), per_node
    assert any(f.check == "tiers.remote" and f.status == OK and "probe" in f.fact for f in found)

    master = redis_cluster.running_masters()[0]
    master.client().config_set("maxmemory", "1gb")
    try:
        found = tiers.checks(_config(remote_url=redis_cluster.url), timeout=2.0)
    finally:
        master.client().config_set("maxmemory", "0")
    warned = [f for f in found if f.status == WARN]
    assert len(warned) == 1 and f"127.0.0.1:{master.port}" in warned[0].check and "noeviction" in warned[0].fact


def test_doctor_cluster_with_no_seed_answering_fails():
    found = tiers.checks(_config(remote_url=f"redis-cluster://127.0.0.1:{free_port()}"), timeout=0.5)
    assert [f.status for f in found if f.check.startswith("tiers.remote")] == [FAIL, FAIL]


@pytest.mark.redis
def test_doctor_asks_every_sentinel_then_probes_the_master(redis_sentinels):
    found = [f for f in tiers.checks(_config(remote_url=redis_sentinels.url), timeout=2.0)
             if f.check.startswith("tiers.remote")]
    assert len(found) == 4 and all(f.status == OK for f in found), found
    assert "probe set+get+delete" in found[-1].fact


def test_doctor_probes_the_s3_bucket(s3_env):
    ok = tiers.checks(_config(remote_url=f"s3://{BUCKET}/p", s3_endpoint_url=s3_env.endpoint), timeout=2.0)
    assert [f.status for f in ok if f.check == "tiers.remote"] == [OK]
    missing = tiers.checks(_config(remote_url="s3://no-such-bucket/p", s3_endpoint_url=s3_env.endpoint), timeout=2.0)
    assert [f.status for f in missing if f.check == "tiers.remote"] == [FAIL]
