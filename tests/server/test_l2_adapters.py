"""`lmcache server --l2-adapter`: upstream's adapter types and field names mapped onto our
tiers, bad ones refused by name; and, with real stores (SeaweedFS for S3, a Redis cluster
for valkey cluster_mode), a server restarted with empty host memory serves, bit-exact, what
it stored before from that L2."""

from __future__ import annotations

import json

import pytest

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.mp.l2_adapters import AdapterError, parse_adapters
from tests.helpers.redis_fixtures import redis_cluster  # noqa: F401 - fixture
from tests.helpers.s3_server import BUCKET, CREDENTIALS, s3_server  # noqa: F401 - fixture
from tests.helpers.workload import check_prompt, make_engine, store_prompt

N = 64  # tokens: 4 chunks of 16


def test_adapters_map_to_the_tiers_and_bad_ones_are_refused_by_name():
    got = parse_adapters(['{"type": "fs", "base_path": "/var/cache/x", "max_capacity_gb": 10}',
                          '{"type": "resp", "host": "10.0.0.1", "port": 6379, "password": "p@ss"}'])
    assert got.overrides == {"local_disk": "/var/cache/x", "max_local_disk_size": 10,
                             "remote_url": "redis://:p%40ss@10.0.0.1:6379"} and got.environment == {}
    assert parse_adapters(['{"type": "valkey", "startup_nodes": ["h:7000"], "database_id": 2}']).overrides == {
        "remote_url": "valkey://h:7000/2"}
    assert parse_adapters(['{"type": "valkey", "startup_nodes": ["a:7000", "b:7001"], "cluster_mode": true, '
                           '"tls_enable": true, "password": "pw"}']).overrides == {
        "remote_url": "valkeys-cluster://:pw@a:7000,b:7001"}
    aws = parse_adapters(['{"type": "s3", "s3_endpoint": "s3://my-bucket", "s3_region": "us-west-2"}'])
    assert aws.overrides == {"remote_url": "s3://my-bucket/"} and aws.environment == {"AWS_DEFAULT_REGION": "us-west-2"}
    private = parse_adapters([json.dumps({
        "type": "s3", "s3_endpoint": "s3.internal:8111", "s3_region": "us-east-1", "s3_addressing_style": "path",
        "s3_bucket": "lmcache", "s3_ca_bundle": "/etc/ssl/ca.pem", "aws_access_key_id": "AK",
        "aws_secret_access_key": "SK"})])
    assert private.overrides == {"remote_url": "s3://lmcache/", "s3_endpoint_url": "https://s3.internal:8111"}
    assert private.environment == {"AWS_DEFAULT_REGION": "us-east-1", "AWS_CA_BUNDLE": "/etc/ssl/ca.pem",
                                   "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"}
    for bad, why in (('{"type": "s3", "s3_region": "r"}', "field 's3_endpoint' is required"),
                     ('{"type": "s3", "s3_endpoint": "minio:9000", "s3_region": "r"}', "s3_bucket is required"),
                     ('{"type": "s3", "s3_endpoint": "s3://b", "s3_region": "r", "aws_access_key_id": "AK"}',
                      "both aws_access_key_id and aws_secret_access_key"),
                     ('{"type": "valkey", "startup_nodes": ["a:1", "b:2"]}', "cluster_mode true for several"),
                     ('{"type": "valkey", "startup_nodes": ["a:1"], "cluster_mode": true, "database_id": 3}',
                      "database_id must be 0"),
                     ('{"type": "mooncake_store"}', "not provided here; accepted: fs, resp, valkey, s3, lm"),
                     ('{"type": "nope"}', "unknown"), ("not json", "is not JSON"),
                     ('{"type": "fs"}', "field 'base_path' is required")):
        with pytest.raises(AdapterError, match=why):
            parse_adapters([bad])
    with pytest.raises(AdapterError) as refused:  # a secret never appears in an error
        parse_adapters(['{"type": "s3", "s3_endpoint": "h:1", "s3_region": "r", "aws_secret_access_key": "SK9"}'])
    assert "SK9" not in str(refused.value)


def _stored_then_served_after_restart(server) -> None:
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**server.config()), N)
    try:
        assert store_prompt(engine, conn, 1, N) == N
        engine.storage.flush()
    finally:
        engine.close()
    server.stop()  # SIGTERM: the L2 writes are finished
    server.start()
    assert server.status()["l1_chunks"] == 0  # host memory is gone; the L2 is not
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**server.config()), N)
    try:
        assert check_prompt(engine, conn, 1, N) == (N, True)
        assert server.status()["stats"]["tier_remote.hit_tokens"] == N
    finally:
        engine.close()


def test_an_s3_adapter_with_upstreams_fields_serves_after_a_restart(cache_server_factory, s3_server, monkeypatch):
    s3_server.empty_bucket()
    for name in CREDENTIALS:  # the credentials come from the adapter's fields, not the environment
        monkeypatch.delenv(name, raising=False)
    host = s3_server.endpoint.split("://", 1)[1]
    adapter = json.dumps({"type": "s3", "s3_endpoint": host, "disable_tls": True, "s3_addressing_style": "path",
                          "s3_bucket": BUCKET, "s3_region": CREDENTIALS["AWS_DEFAULT_REGION"],
                          "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]})
    server = cache_server_factory(extra_args=("--l2-adapter", adapter)).start()
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in server.log()
    _stored_then_served_after_restart(server)
    assert len(s3_server.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])) == 4


def test_a_valkey_cluster_adapter_serves_after_a_restart(cache_server_factory, redis_cluster):  # noqa: F811
    redis_cluster.flushall()
    nodes = [f"127.0.0.1:{n.port}" for n in redis_cluster.nodes[:2]]
    adapter = json.dumps({"type": "valkey", "startup_nodes": nodes, "cluster_mode": True})
    server = cache_server_factory(extra_args=("--l2-adapter", adapter)).start()
    _stored_then_served_after_restart(server)


def test_a_resp_adapters_password_works_and_never_reaches_the_log(cache_server_factory, redis_factory):
    redis = redis_factory("--requirepass", "pw-9f3a")
    adapter = json.dumps({"type": "resp", "host": "127.0.0.1", "port": redis.port, "password": "pw-9f3a"})
    server = cache_server_factory(extra_args=("--l2-adapter", adapter)).start()
    _stored_then_served_after_restart(server)
    assert "127.0.0.1:%d" % redis.port in server.log() and "pw-9f3a" not in server.log()
