"""The distributed remote_url schemes (lmcache/v1/remote_urls.py) as config accepts
and rejects them; nothing here touches the network."""

from __future__ import annotations

import pytest

from lmcache.v1.config import ConfigError, load_config
from lmcache.v1.remote_urls import parse_redis_seeds, parse_s3, redact_url


@pytest.mark.parametrize("url", [
    "redis-cluster://127.0.0.1:7000,127.0.0.1:7001",
    "rediss-cluster://user:p%40ss@a.example:7000,b.example:7000?read_from_replicas=true",
    "valkey-cluster://h:1",
    "redis-sentinel://s1:26379,s2:26379,s3:26379/mymaster",
    "redis-sentinel://:pw@[::1]:26379",
    "s3://my-bucket", "s3://my-bucket/kv/prod",
])
def test_distributed_urls_accepted(url):
    assert load_config({"lmcache.remote_url": url}, environ={}).remote_url == url


@pytest.mark.parametrize("url", [
    "redis-cluster://", "redis-cluster://h", "redis-cluster://h:0", "redis-cluster://h:1,h:x",
    "redis-cluster://h:1/2", "redis-cluster://h:1?bogus=1", "redis-sentinel://h:1?read_from_replicas=maybe",
    "redis-cluster://h:1?ssl_ca_certs=/ca.pem", "rediss-cluster://h:1?ssl_ca_certs=",  # a CA file needs TLS
    "s3://", "s3://B", "s3://key:secret@bucket/p",
])
def test_bad_distributed_urls_are_config_errors_naming_what_is_accepted(url):
    with pytest.raises(ConfigError) as info:
        load_config({"lmcache.remote_url": url}, environ={})
    assert "remote_url=" in str(info.value)
    assert "redis-cluster://" in str(info.value) and "s3://bucket" in str(info.value)


@pytest.mark.parametrize("url", ["redis://h:6379?ssl_ca_certs=/ca.pem", "valkey://h:6379/0?ssl_cert_reqs=none"])
def test_a_tls_option_on_a_plain_text_scheme_is_a_config_error(url):
    with pytest.raises(ConfigError) as info:
        load_config({"lmcache.remote_url": url}, environ={})
    message = str(info.value)
    assert "remote_url=" in message and "only with a TLS scheme: rediss, valkeys" in message


@pytest.mark.parametrize("url", ["rediss://h:6379?ssl_ca_certs=/ca.pem", "valkeys://h:6379/0?ssl_cert_reqs=none",
                                 "redis://h:6379/0?socket_keepalive=true"])
def test_tls_options_with_a_tls_scheme_and_other_options_are_accepted(url):
    assert load_config({"lmcache.remote_url": url}, environ={}).remote_url == url


def test_cluster_seeds_credentials_and_tls():
    seeds = parse_redis_seeds("rediss-cluster://me:p%40ss@a:1,[::1]:2,b:3?read_from_replicas=1")
    assert seeds.kind == "cluster" and seeds.tls and seeds.read_from_replicas
    assert seeds.seeds == (("a", 1), ("::1", 2), ("b", 3))
    assert (seeds.username, seeds.password) == ("me", "p@ss")
    assert "p%40ss" not in repr(seeds) and "p@ss" not in repr(seeds)
    assert redact_url("redis-cluster://me:p%40ss@a:1,b:2/x") == "redis-cluster://me:***@a:1,b:2/x"


def test_a_ca_file_for_tls_cluster_and_sentinel_urls():
    assert parse_redis_seeds("rediss-cluster://a:1?ssl_ca_certs=%2Fetc%2Fca.pem").ssl_ca_certs == "/etc/ca.pem"
    seeds = parse_redis_seeds("rediss-sentinel://a:1/svc?ssl_ca_certs=/ca.pem&read_from_replicas=true")
    assert (seeds.ssl_ca_certs, seeds.read_from_replicas, seeds.service) == ("/ca.pem", True, "svc")
    assert parse_redis_seeds("rediss-cluster://a:1").ssl_ca_certs is None  # the system's CAs


def test_s3_location():
    assert parse_s3("s3://bkt/a/b/").prefix == "a/b/" and parse_s3("s3://bkt").prefix == ""


def test_s3_endpoint_key():
    config = load_config({"lmcache.remote_url": "s3://bkt/p", "lmcache.s3_endpoint_url": "http://127.0.0.1:8333"},
                         environ={})
    assert config.s3_endpoint_url == "http://127.0.0.1:8333"
    with pytest.raises(ConfigError):
        load_config({"lmcache.s3_endpoint_url": "ftp://x"}, environ={})
