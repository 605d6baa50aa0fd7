"""The scheduler -> worker lookup socket: real ZMQ over ipc, real threads."""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip("zmq", reason="pyzmq comes with vLLM")

from lmcache.integration.vllm.lookup_channel import (  # noqa: E402
    LookupClient,
    LookupServer,
    decode_tokens,
    encode_tokens,
    socket_address,
)


def server(address, hit_of, stats=None):
    return LookupServer(address, hit_of, stats or (lambda: {"ok": 1})).start()


@pytest.fixture
def engine_id():
    return f"test-{uuid.uuid4()}"


def test_tokens_round_trip_without_pickle():
    tokens = [0, 1, 2**40, 7]
    assert decode_tokens(encode_tokens(tokens)).tolist() == tokens
    with pytest.raises(ValueError, match="int64"):
        decode_tokens(b"123")


def test_hit_is_the_shortest_answer_over_ranks(engine_id):
    seen = []
    s0 = server(socket_address(engine_id, 0), lambda t: (seen.append(list(t)), 512)[1])
    s1 = server(socket_address(engine_id, 1), lambda t: 256)
    client = LookupClient([socket_address(engine_id, r) for r in range(2)], timeout_ms=2000)
    try:
        assert client.lookup(list(range(600))) == 256
        assert seen == [list(range(600))]
        assert client.stats() == [{"ok": 1}, {"ok": 1}]
    finally:
        client.close()
        s0.close()
        s1.close()


def test_hit_never_exceeds_the_tokens_asked(engine_id):
    s0 = server(socket_address(engine_id, 0), lambda t: 10_000)
    client = LookupClient([socket_address(engine_id, 0)], timeout_ms=2000)
    try:
        assert client.lookup([1, 2, 3]) == 3
        assert client.lookup([]) == 0
    finally:
        client.close()
        s0.close()


def test_missing_worker_is_a_miss_and_recovers(engine_id):
    address = socket_address(engine_id, 0)
    client = LookupClient([address], timeout_ms=200)
    try:
        assert client.lookup([1, 2, 3]) == 0  # nobody listening yet: a miss, not an error
        s0 = server(address, lambda t: 2)
        try:
            assert client.lookup([1, 2, 3]) == 2  # the socket was renewed after the timeout
        finally:
            s0.close()
    finally:
        client.close()


def test_failing_lookup_is_a_miss(engine_id):
    def broken(tokens):
        raise RuntimeError("tier exploded")

    s0 = server(socket_address(engine_id, 0), broken)
    client = LookupClient([socket_address(engine_id, 0)], timeout_ms=2000)
    try:
        assert client.lookup([1, 2, 3]) == 0
        assert "error" in client.control({"x": 1})[0]  # no control handler here
    finally:
        client.close()
        s0.close()


def test_address_is_a_safe_short_ipc_path():
    address = socket_address("../../etc/passwd with spaces", 3)
    assert address.startswith("ipc://")
    assert "/../" not in address and " " not in address
    assert address.endswith("-3.sock")
