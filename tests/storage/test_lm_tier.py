"""The lm:// tier against our server: bit-exact round trips, the engine through
it, a server killed mid-run and restarted, a dead server at start, replies that
do not describe a chunk, keys that do not fit upstream's shape, and config."""

import logging
import os
import signal
import socket
import threading

import pytest
import torch

from lmcache.v1.config import ConfigError, LMCacheEngineConfig, load_config
from lmcache.v1.memory import HostMemoryPool
from lmcache.v1.server import protocol as P
from lmcache.v1.storage_backend import lm_keys
from lmcache.v1.storage_backend.lm import LMServerBackend
from lmcache.v1.storage_backend.storage_manager import StorageManager
from lmcache.v1.token_database import CacheEngineKey
from lmcache.testing.processes import free_port, wait_until
from tests.helpers.lm_peers import RawClient, lm_factory, lm_server  # noqa: F401 (fixtures)
from tests.helpers.tier_objects import CASES, IDS, MB, key, make_obj, same
from tests.helpers.workload import check_prompt, make_engine, outage_then_recovery, prompt_tokens, store_prompt

CS, N = 16, 64


@pytest.mark.parametrize("dtype,mla", CASES, ids=IDS)
def test_tier_round_trip_bit_exact(lm_server, dtype, mla):
    pool = HostMemoryPool(8 * MB)
    obj = make_obj(pool, dtype, mla)
    k = key(1)._replace(dtype=str(dtype).removeprefix("torch."))
    tier = LMServerBackend(lm_server.url)
    assert tier.prefix_count([k]) == 0 and tier.get(k, pool.allocate) is None
    assert tier.put(k, obj)
    assert tier.contains(k)
    back = tier.get(k, pool.allocate)
    assert same(back, obj)
    # what is on the server is upstream's naive form: raw bytes, fmt/dtype/shape in the header
    with RawClient(lm_server.port) as c:
        reply, data = c.get(lm_keys.wire_key(k))
    assert data == obj.tensor.view(torch.uint8).numpy().tobytes()
    assert reply.fmt == (P.FMT_KV_MLA if mla else P.FMT_KV_2LTD) and P.strip_shape(reply.shape, reply.fmt) == tuple(obj.metadata.shape)
    tier.close()


def test_corrupted_payload_is_caught_by_the_comparison(lm_server):
    """The round-trip check above can fail: a flipped byte on the server is seen."""
    pool = HostMemoryPool(8 * MB)
    obj = make_obj(pool, torch.bfloat16, False)
    tier = LMServerBackend(lm_server.url)
    tier.put(key(1), obj)
    wire = lm_keys.wire_key(key(1))
    with RawClient(lm_server.port) as c:
        # a PUT has no reply: the server may not have it yet when another connection asks
        assert wait_until(lambda: c.get(wire)[1] is not None, 10)
        reply, data = c.get(wire)
        data = bytearray(data)
        data[100] ^= 1
        c.put(wire, bytes(data), fmt=reply.fmt, dtype=reply.dtype, shape=reply.shape)
        c.request(P.HEALTH, b"")
    assert not same(tier.get(key(1), pool.allocate), obj)


def test_prefix_count_spans_batches_and_stops_at_the_first_gap(lm_server):
    pool = HostMemoryPool(8 * MB)
    tier = LMServerBackend(lm_server.url)
    obj = make_obj(pool, torch.float16, False, tokens=1)
    for i in range(75):
        if i != 70:
            assert tier.put(key(i), obj)
    assert tier.prefix_count([key(i) for i in range(75)]) == 70
    assert tier.prefix_count([key(i) for i in range(40)]) == 40
    tier.close()


def test_engine_through_lm_tier_and_a_second_engine_finds_it(lm_server):
    config = LMCacheEngineConfig.from_defaults(chunk_size=CS, max_local_cpu_size=0.02, local_cpu=False,
                                               remote_url=lm_server.url)
    engine, conn = make_engine(config, N)
    assert store_prompt(engine, conn, 1, N) == N and engine.flush(10)
    other, conn2 = make_engine(config, N)
    assert other.lookup(prompt_tokens(1, N)) == N
    assert check_prompt(other, conn2, 1, N) == (N, True)
    assert other.lookup(prompt_tokens(2, N)) == 0
    engine.close()
    other.close()


def test_a_stored_chunk_is_on_the_server_when_put_returns(lm_server):
    """The protocol's PUT has no reply; a stored chunk must still be there for every other
    client (another vLLM's lookup) by the time put() says True: while the server is
    stopped, put() waits for it, and once it runs again another connection finds the chunk."""
    pool = HostMemoryPool(8 * MB)
    obj = make_obj(pool, torch.float16, False)
    writer = LMServerBackend(lm_server.url, timeout=60.0)
    reader = LMServerBackend(lm_server.url)
    assert writer.health()  # connected before the server stops
    result = {}
    os.kill(lm_server.proc.pid, signal.SIGSTOP)
    try:
        thread = threading.Thread(target=lambda: result.update(stored=writer.put(key(1), obj)))
        thread.start()
        thread.join(2.0)
        assert thread.is_alive(), "put() returned while the server could not have stored anything"
    finally:
        os.kill(lm_server.proc.pid, signal.SIGCONT)
    thread.join(60)
    assert result["stored"] is True and reader.contains(key(1))
    writer.close()
    reader.close()


def test_server_killed_mid_run_then_restarted(lm_factory, caplog):
    server = lm_factory("--max-size-gb", "0.1")
    outage_then_recovery(server.url, server.kill, server.start, caplog, CS, N)


def test_restart_between_requests_is_not_even_a_miss(lm_factory):
    """Pooled connections that died with the old server are replaced, not reported."""
    server = lm_factory()
    pool = HostMemoryPool(8 * MB)
    obj = make_obj(pool, torch.float16, False)
    tier = LMServerBackend(server.url, retry_interval=5.0)
    assert tier.put(key(1), obj) and tier.contains(key(1)) and tier.health()
    server.kill()
    assert not tier.health()
    server.start()
    assert tier.put(key(2), obj)
    assert same(tier.get(key(2), pool.allocate), obj) and not tier.is_down
    tier.close()


def test_no_server_at_start_is_a_miss_and_one_log_line(caplog):
    url = f"lm://127.0.0.1:{free_port()}"
    manager = StorageManager(LMCacheEngineConfig.from_defaults(remote_url=url, max_local_cpu_size=0.01,
                                                               remote_retry_interval=0.0))
    obj = make_obj(manager.pool, torch.float16, False)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert manager.remote.put(key(1), obj) is False
        for _ in range(3):
            assert manager.lookup_prefix([key(1)]) == 0 and manager.remote.get(key(1), manager.allocate) is None
    assert caplog.text.count("unreachable") == 1
    assert manager.stats.misses["tier_down"] >= 4
    assert not manager.remote.health()
    obj.free()
    manager.close()


def fake_server(reply: bytes, payload: bytes = b""):
    """A server that answers every request with `reply` + `payload` (then closes)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(P.REQUEST.size)
                conn.sendall(reply + payload)

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.parametrize("reply,payload,what", [
    (P.Reply(P.SUCCESS, 999, P.FMT_KV_2LTD, 2, (2, 3, 16, 64), 0).pack(), b"", "does not match"),
    (P.Reply(P.SUCCESS, 6144, 4, 2, (6144, 0, 0, 0), 0).pack(), b"", "not a KV chunk"),
    (P.Reply(P.SUCCESS, 12288, P.FMT_KV_2LTD, 9, (2, 3, 16, 64), 0).pack(), b"", "not a KV chunk"),
    (P.Reply(P.SUCCESS, 2 * 3 * 16 * 64 * 2, P.FMT_KV_2LTD, 2, (2, 3, 16, 64), 0).pack(), b"\0" * 10, "closed"),
    (P.Reply(123, 0, 1, 2, (0, 0, 0, 0), 0).pack(), b"", "reply code 123"),
    (b"\x01\x02", b"", "closed"),
])
def test_reply_that_is_not_a_chunk_is_a_miss(reply, payload, what, caplog):
    listener = fake_server(reply, payload)
    pool = HostMemoryPool(8 * MB)
    tier = LMServerBackend(f"lm://127.0.0.1:{listener.getsockname()[1]}", retry_interval=0.0)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert tier.get(key(1), pool.allocate) is None
    assert what in caplog.text
    assert pool.used_bytes == 0  # nothing leaked
    listener.close()
    tier.close()


def test_keys_fit_and_parse_in_upstreams_shape():
    k = CacheEngineKey("meta-llama/Llama-3.1-8B", 2, 1, "00" + "ab" * 15, "bfloat16", "kv.L32.H8.D128")
    assert lm_keys.wire_key(k) == b"meta-llama/Llama-3.1-8B@2@1@" + b"ab" * 15 + b"@bfloat16@lm%kv.L32.H8.D128"
    at = k._replace(model_name="team@corp/model 7b%")
    wire = lm_keys.wire_key(at).decode()
    parts = wire.split("@")
    assert parts[0] == "team%40corp/model%207b%25" and len(parts) == 6  # '@' escaped, shape kept
    long_a = k._replace(model_name="x" * 200 + "a")
    long_b = k._replace(model_name="x" * 200 + "b")
    wa, wb = lm_keys.wire_key(long_a), lm_keys.wire_key(long_b)
    assert len(wa) <= P.KEY_FIELD and wa != wb and lm_keys.is_digested(wa)
    assert not lm_keys.is_digested(lm_keys.wire_key(at))
    assert lm_keys.wire_key(long_a._replace(fingerprint="other")) != wa  # the layout is in the digest
    assert wa.split(b"@")[1:] == [b"2", b"1", b"ab" * 15, b"bfloat16"]
    assert lm_keys.wire_key(k._replace(dtype="float16")).split(b"@")[4] == b"half"
    odd = lm_keys.wire_key(k._replace(dtype="complex64")).split(b"@")
    assert odd[4:] == [b"uint8", b"lm%kv.L32.H8.D128", b"dt%complex64"]  # a dtype upstream cannot name


def test_long_and_at_sign_model_names_round_trip(lm_server):
    pool = HostMemoryPool(8 * MB)
    obj_a, obj_b = make_obj(pool, torch.float16, False, seed=1), make_obj(pool, torch.float16, False, seed=2)
    tier = LMServerBackend(lm_server.url)
    ka, kb = key(1, model="org@x/" + "m" * 300), key(1, model="org@x/" + "m" * 299 + "n")
    assert tier.put(ka, obj_a) and tier.put(kb, obj_b)
    assert same(tier.get(ka, pool.allocate), obj_a) and same(tier.get(kb, pool.allocate), obj_b)


@pytest.mark.parametrize("value,expected", [("naive", "naive"), ("NULL", None), ("null", None), (None, None)])
def test_remote_serde_accepts_naive_and_null(tmp_path, value, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"remote_serde: {'null' if value is None else value}\nremote_url: lm://localhost:8100\n")
    config = load_config(environ={"LMCACHE_CONFIG_FILE": str(path)})
    assert config.remote_serde == expected and config.remote_url == "lm://localhost:8100"
    assert load_config(environ={"LMCACHE_REMOTE_SERDE": "NULL"}).remote_serde is None


def test_remote_serde_cachegen_is_a_clear_error():
    with pytest.raises(ConfigError) as err:
        load_config(environ={"LMCACHE_REMOTE_SERDE": "cachegen"})
    assert "remote_serde='cachegen'" in str(err.value) and "not supported" in str(err.value)


@pytest.mark.parametrize("url", ["lm://localhost", "lm://:8100", "lm://h:8100/x", "lm://u:p@h:1"])
def test_lm_url_needs_host_and_port(url):
    with pytest.raises(ConfigError, match="lm://host:port"):
        load_config(environ={"LMCACHE_REMOTE_URL": url})


def test_env_remote_url_picks_the_lm_tier():
    config = load_config(environ={"LMCACHE_REMOTE_URL": "lm://localhost:8100", "LMCACHE_REMOTE_SERDE": "naive"})
    manager = StorageManager(config)
    assert isinstance(manager.remote, LMServerBackend)
    manager.close()
