"""rediss://, rediss-cluster:// and rediss-sentinel:// against real redis-servers speaking TLS (Debian's
redis-server 7, `--tls-port`), with a throwaway CA made by the test (tls_certs.py):
chunks are stored and hit through TLS with the CA named by `ssl_ca_certs`, and a server
whose certificate another CA signed is refused: one clear log line, misses, no crash."""

from __future__ import annotations

import logging
import urllib.parse

import pytest

from lmcache.testing.redis_servers import RedisClusterGroup, RedisServer, SentinelGroup, TLSFiles, free_port
from lmcache.v1.config import LMCacheEngineConfig
from tests.helpers.tls_certs import make_authority, make_server_cert
from tests.helpers.workload import check_prompt, make_engine, prompt_tokens, store_prompt

pytestmark = pytest.mark.redis
CS, N = 16, 64


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """(the files of a server signed by `ca`, `ca`'s file, another CA's file)"""
    directory = tmp_path_factory.mktemp("tls")
    ca, other = make_authority(directory, "ca"), make_authority(directory, "other-ca")
    cert, key = make_server_cert(directory, ca)
    return TLSFiles(str(cert), str(key), str(ca.cert_path)), str(ca.cert_path), str(other.cert_path)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, certs):
    tls_port = free_port()
    server = RedisServer(str(tmp_path_factory.mktemp("redis-tls")), extra_args=certs[0].server_args(tls_port),
                         tls_port=tls_port).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, certs):
    group = RedisClusterGroup(str(tmp_path_factory.mktemp("redis-tls-cluster")), tls=certs[0]).start()
    yield group
    group.stop()


@pytest.fixture(scope="module")
def tls_sentinels(tmp_path_factory, certs):
    group = SentinelGroup(str(tmp_path_factory.mktemp("redis-tls-sentinel")), tls=certs[0]).start()
    yield group
    group.stop()


def sentinel_url(group) -> str:
    return "rediss-sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in group.sentinels) + f"/{group.service}"


def config(url: str) -> LMCacheEngineConfig:
    return LMCacheEngineConfig.from_defaults(chunk_size=CS, max_local_cpu_size=0.05, local_cpu=False, remote_url=url,
                                             remote_timeout=3.0, remote_connect_timeout=1.0, remote_retry_interval=1.0)


def with_ca(url: str, ca_file: str) -> str:
    return f"{url}?ssl_ca_certs={urllib.parse.quote(ca_file)}"


def store_then_hit_from_a_fresh_engine(url: str) -> None:
    writer, wconn = make_engine(config(url), N)
    assert store_prompt(writer, wconn, 1, N) == N
    assert writer.flush(10)
    writer.close()
    reader, conn = make_engine(config(url), N)
    assert reader.lookup(prompt_tokens(1, N)) == N
    assert check_prompt(reader, conn, 1, N) == (N, True)
    assert reader.stats.misses["tier_down"] == 0
    reader.close()


def refused_with_one_line(url: str, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="lmcache")
    engine, conn = make_engine(config(url), N)
    store_prompt(engine, conn, 2, N)  # dropped, not raised
    assert engine.flush(10)
    for _ in range(3):
        assert engine.lookup(prompt_tokens(1, N)) == 0
        assert check_prompt(engine, conn, 1, N)[0] == 0
    engine.close()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert "certificate verify failed" in lines[0], lines[0]


def test_rediss_stores_and_hits_with_the_configured_ca(tls_server, certs):
    tls_server.client().flushall()
    store_then_hit_from_a_fresh_engine(with_ca(f"rediss://127.0.0.1:{tls_server.tls_port}", certs[1]))
    assert tls_server.client().dbsize() == N // CS  # on the server, through its TLS port


def test_rediss_refuses_a_server_certificate_of_another_ca(tls_server, certs, caplog):
    refused_with_one_line(with_ca(f"rediss://127.0.0.1:{tls_server.tls_port}", certs[2]), caplog)


def test_rediss_cluster_stores_and_hits_with_the_configured_ca(tls_cluster, certs):
    tls_cluster.flushall()
    store_then_hit_from_a_fresh_engine(with_ca(f"rediss-cluster://{tls_cluster.tls_seeds}", certs[1]))
    assert sum(m.client().dbsize() for m in tls_cluster.running_masters()) == N // CS


def test_rediss_cluster_refuses_a_server_certificate_of_another_ca(tls_cluster, certs, caplog):
    refused_with_one_line(with_ca(f"rediss-cluster://{tls_cluster.tls_seeds}", certs[2]), caplog)


def test_rediss_sentinel_stores_and_hits_with_the_configured_ca(tls_sentinels, certs):
    tls_sentinels.master.client().flushall()
    store_then_hit_from_a_fresh_engine(with_ca(sentinel_url(tls_sentinels), certs[1]))
    assert tls_sentinels.master.client().dbsize() == N // CS


def test_rediss_sentinel_refuses_a_data_node_certificate_of_another_ca(tls_sentinels, certs, caplog):
    refused_with_one_line(with_ca(sentinel_url(tls_sentinels), certs[2]), caplog)
