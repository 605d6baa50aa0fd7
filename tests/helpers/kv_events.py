"""A subscriber to vLLM's own KV event publisher (kv_events_config, ZMQ) and readers of
what it heard, for the e2e tests of LMCache's KV events (in process and through a server)."""

from __future__ import annotations

import threading
import time

import msgspec
import zmq
from vllm.distributed.kv_events import BlockStored, KVEventBatch


class Subscriber:
    def __init__(self, port: int):
        self.port = port
        self.batches: list[KVEventBatch] = []
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        # vLLM's publisher connects to an endpoint with a host (it binds only "tcp://*:...")
        self._sock.bind(f"tcp://127.0.0.1:{port}")
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def config(self) -> dict:
        """vLLM's --kv-events-config publishing to this subscriber."""
        return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{self.port}",
                "topic": "kv-events"}

    def _run(self):
        while not self._stop.is_set():
            if self._sock.poll(100):
                _topic, _seq, payload = self._sock.recv_multipart()
                self.batches.append(self._decoder.decode(payload))

    def events(self) -> list:
        return [e for b in list(self.batches) for e in b.events]

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._ctx.term()


def wait_events(subscriber: Subscriber, predicate, timeout: float = 30, between=None) -> list:
    """The events heard once `predicate(events)` holds (or the timeout passed); `between()`
    runs before each look (e.g. a request, so that vLLM runs steps and publishes)."""
    deadline = time.monotonic() + timeout
    while True:
        if between is not None:
            between()
        events = subscriber.events()
        if predicate(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.3)


def chain(events, medium: str, prompt: list[int]) -> list:
    """The BlockStored events of `medium` that cover `prompt` from its first token, in order."""
    stored = [e for e in events if isinstance(e, BlockStored) and e.medium == medium]
    out, parent, pos = [], None, 0
    while True:
        nxt = [e for e in stored if e.parent_block_hash == parent and e.token_ids == prompt[pos:pos + len(e.token_ids)]]
        if not nxt:
            return out
        out.append(nxt[0])
        parent, pos = nxt[0].block_hashes[-1], pos + len(nxt[0].token_ids)


def of_kind(events, kind, medium: str | None = None) -> list:
    return [e for e in events if isinstance(e, kind) and (medium is None or e.medium == medium)]
