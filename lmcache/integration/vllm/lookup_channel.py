"""How the scheduler asks the workers what LMCache holds.

vLLM runs its scheduler and its workers in different processes (EngineCore and one
Worker process per rank), and the host-memory tier lives inside each worker. So every
worker answers lookups on a local ZMQ socket (`LookupServer`), and the scheduler asks
all ranks (`LookupClient`): with tensor parallelism every rank holds its own shard,
and a prefix is a hit only as far as every rank holds it.

Wire format (no pickle anywhere): a request is a multipart message whose first frame
names the operation.
  [b"lookup", int64 little-endian token ids] -> [int64 hit tokens]
  [b"lookup", int64 LE token ids, utf-8 lease id(, int64 hold_from)] -> [int64 hit
      tokens], and the worker holds what it counted for that lease (lmcache.v1.leases)
      until the load that names it, a release in a later step's metadata, or the lease's
      ttl; chunks that end at or before hold_from (vLLM holds them) are only checked
  [b"lookup", token ids, lease id, int64 hold_from, b"prefetch"] -> the same, but chunks
      not in host memory are read in the background (lmcache.v1.leases: the load waits)
  [b"lookup_keyed", token ids, key material, ...the frames of b"lookup" after its token
      ids] -> as b"lookup", for a request whose KV depends on more than its tokens
      (media, LoRA, salt: request_keys.py): 16 bytes per chunk, zeros for none
  [b"lookup", ...] replies may carry a second frame, JSON [[tier, tokens], ...]: which
      tier holds the hit, in order; only where the worker has more than one tier
  [b"stats"]                                 -> [JSON object]
  [b"metrics"]                               -> [JSON object]  (metrics/worker.py)
  [b"control", JSON object]                  -> [JSON object]  (flush; test hooks: worker/test_hooks.py)
Any fault on the scheduler side (no server yet, timeout, bad reply) reads as a miss.
"""

from __future__ import annotations

import array
import json
import logging
import os
import sys
import tempfile
import threading
from typing import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_TOKEN_DTYPE = np.dtype("<i8")
_POLL_MS = 100


def socket_address(engine_id: str, rank: int) -> str:
    """The ZMQ address of rank `rank`'s lookup server for one vLLM engine."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in engine_id)[:64]
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'lmcache-{safe}-{rank}.sock')}"


def encode_tokens(tokens: Sequence[int]) -> bytes:
    # array.array packs a list several times faster than numpy (long prompts: 100k+ ids).
    packed = array.array("q", tokens)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def decode_tokens(payload: bytes) -> np.ndarray:
    """The token ids as an int64 array (no per-token Python objects: the engine hashes it as is)."""
    if len(payload) % _TOKEN_DTYPE.itemsize:
        raise ValueError(f"token payload of {len(payload)} bytes is not a whole number of int64")
    return np.frombuffer(payload, dtype=_TOKEN_DTYPE)


_MATERIAL_SIZE = 16
_NO_MATERIAL = bytes(_MATERIAL_SIZE)


def encode_key_material(material) -> bytes:
    """Per-chunk key material (16-byte digests, None for none) as one frame."""
    parts = []
    for digest in material:
        if digest is not None and len(digest) != _MATERIAL_SIZE:
            raise ValueError(f"key material must be {_MATERIAL_SIZE}-byte digests, got {len(digest)} bytes")
        parts.append(digest or _NO_MATERIAL)
    return b"".join(parts)


def decode_key_material(payload: bytes) -> list[bytes | None]:
    if len(payload) % _MATERIAL_SIZE:
        raise ValueError(f"key material of {len(payload)} bytes is not a whole number of {_MATERIAL_SIZE}-byte digests")
    return [None if chunk == _NO_MATERIAL else chunk
            for chunk in (payload[i : i + _MATERIAL_SIZE] for i in range(0, len(payload), _MATERIAL_SIZE))]


def lease_id_of(req_id: str, generation: int) -> str:
    """The id of one lookup's lease: a request looked up again gets a new one."""
    return f"{int(generation)}:{req_id}"


def decode_lease_id(payload: bytes) -> str:
    if not payload or len(payload) > 4096:
        raise ValueError(f"lease id of {len(payload)} bytes: expected 1 to 4096 bytes of utf-8")
    return payload.decode("utf-8")


class LookupServer:
    """Answers lookups for one worker on a background thread."""

    def __init__(
        self,
        address: str,
        lookup: Callable[..., int | tuple[int, list]],  # lookup(tokens[, lease_id[, hold_from]])
        stats: Callable[[], dict],
        control: Callable[[dict], dict] | None = None,
        metrics: Callable[[], dict] | None = None,
    ):
        self.address = address
        self._lookup = lookup
        self._stats = stats
        self._control = control
        self._metrics = metrics
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="lmcache-lookup-server", daemon=True)

    def start(self) -> "LookupServer":
        self._thread.start()
        self._ready.wait(timeout=10)
        if self._error is not None:
            raise RuntimeError(f"LMCache lookup server could not bind {self.address}: {self._error}")
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _serve(self) -> None:
        import zmq

        context = zmq.Context.instance()
        sock = context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            path = self.address[len("ipc://"):] if self.address.startswith("ipc://") else None
            if path and os.path.exists(path):
                os.unlink(path)  # left over by a process that died
            sock.bind(self.address)
        except Exception as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            sock.close()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS):
                    continue
                frames = sock.recv_multipart()
                sock.send_multipart(self._answer(frames))
        finally:
            sock.close()

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        op = frames[0] if frames else b""
        keyed = {}
        if op == b"lookup_keyed" and len(frames) >= 3:
            try:
                keyed = {"key_material": decode_key_material(frames[2])}
            except ValueError as exc:
                logger.warning("LMCache lookup server: bad key material: %s", exc)
                return [np.asarray([0], dtype=_TOKEN_DTYPE).tobytes()]
            op, frames = b"lookup", [b"lookup", frames[1], *frames[3:]]
        try:
            if op == b"lookup" and len(frames) in (2, 3, 4, 5):
                tokens = decode_tokens(frames[1])
                if len(frames) == 2:
                    answer = self._lookup(tokens, **keyed)
                elif len(frames) == 3:
                    answer = self._lookup(tokens, decode_lease_id(frames[2]), **keyed)
                else:
                    hold_from = decode_tokens(frames[3])
                    if hold_from.shape != (1,):
                        raise ValueError("hold_from must be one int64")
                    if len(frames) == 5 and frames[4] != b"prefetch":
                        raise ValueError(f"the fifth lookup frame must be b'prefetch', got {frames[4][:32]!r}")
                    args = (tokens, decode_lease_id(frames[2]), int(hold_from[0]))
                    answer = self._lookup(*args, True, **keyed) if len(frames) == 5 else self._lookup(*args, **keyed)
                runs = None
                if isinstance(answer, tuple):
                    answer, runs = answer
                reply = [np.asarray([int(answer)], dtype=_TOKEN_DTYPE).tobytes()]
                if runs:
                    reply.append(json.dumps(runs).encode())
                return reply
            if op == b"stats":
                return [json.dumps(self._stats()).encode()]
            if op == b"metrics" and self._metrics is not None:
                return [json.dumps(self._metrics()).encode()]
            if op == b"control" and len(frames) == 2 and self._control is not None:
                return [json.dumps(self._control(json.loads(frames[1]))).encode()]
            raise ValueError(f"unknown request {op!r} with {len(frames)} frames")
        except Exception as exc:  # noqa: BLE001 - a lookup fault is a miss, never a crash
            logger.warning("LMCache lookup server: %s failed: %s", op.decode(errors="replace"), exc)
            if op == b"lookup":
                return [np.asarray([0], dtype=_TOKEN_DTYPE).tobytes()]
            return [json.dumps({"error": str(exc)}).encode()]


class LookupClient:
    """Asks every rank's lookup server; a hit is the shortest of their answers."""

    def __init__(self, addresses: Sequence[str], timeout_ms: int):
        import zmq

        self._zmq = zmq
        self._context = zmq.Context.instance()
        self.addresses = list(addresses)
        self.timeout_ms = int(timeout_ms)
        self._sockets: dict[str, object] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def _socket(self, address: str):
        sock = self._sockets.get(address)
        if sock is None:
            sock = self._context.socket(self._zmq.REQ)
            sock.setsockopt(self._zmq.LINGER, 0)
            sock.setsockopt(self._zmq.RCVTIMEO, self.timeout_ms)
            sock.setsockopt(self._zmq.SNDTIMEO, self.timeout_ms)
            sock.connect(address)
            self._sockets[address] = sock
        return sock

    def _ask(self, address: str, frames: list[bytes]) -> bytes | None:
        reply = self._ask_all([address], frames)[0]
        return reply[0] if reply else None

    def _ask_all(self, addresses: Sequence[str], frames: list[bytes]) -> list[list[bytes] | None]:
        """Send to every address, then collect the replies: the ranks work in parallel."""
        sent: list = []
        for address in addresses:
            sock = self._socket(address)
            try:
                sock.send_multipart(frames)
                sent.append(sock)
            except self._zmq.ZMQError as exc:
                self._lost(address, sock, exc)
                sent.append(None)
        replies: list[list[bytes] | None] = []
        for address, sock in zip(addresses, sent):
            if sock is None:
                replies.append(None)
                continue
            try:
                reply = sock.recv_multipart()
            except self._zmq.ZMQError as exc:
                self._lost(address, sock, exc)
                replies.append(None)
                continue
            self._warned.discard(address)
            replies.append(reply or None)
        return replies

    def _lost(self, address: str, sock, exc: Exception) -> None:
        # A REQ socket that missed its reply cannot send again: start afresh.
        sock.close()
        self._sockets.pop(address, None)
        if address not in self._warned:
            self._warned.add(address)
            logger.warning("LMCache lookup at %s got no answer (%s): counted as a miss", address, exc)

    def lookup(self, tokens: Sequence[int], lease_id: str | None = None, hold_from: int = 0,
               prefetch: bool = False, key_material=None) -> int:
        return self.lookup_with_sources(tokens, lease_id, hold_from, prefetch, key_material)[0]

    def lookup_with_sources(
        self, tokens: Sequence[int], lease_id: str | None = None, hold_from: int = 0, prefetch: bool = False,
        key_material=None,
    ) -> tuple[int, list | None]:
        """The prefix every rank holds, and [[tier, tokens], ...] in prefix order as the
        rank with the shortest hit reported it (None: that rank has a single tier, the
        CPU tier). With `lease_id`, each rank holds what it counted until the load naming
        that lease (or its release): send the release even when the hit is 0, since some
        ranks may hold a lease. Chunks ending at or before `hold_from` (vLLM's own prefix
        hit) are checked but not held. `prefetch` (with a lease): chunks outside host
        memory are read in the background rather than before the answer. `key_material`:
        per chunk, what besides the tokens names its KV (request_keys.py)."""
        if not tokens:
            return 0, None
        frames = [b"lookup", encode_tokens(tokens)]
        if key_material is not None:
            frames = [b"lookup_keyed", frames[1], encode_key_material(key_material)]
        if lease_id is not None:
            frames.append(lease_id.encode("utf-8"))
            if hold_from > 0 or prefetch:
                frames.append(encode_tokens([int(hold_from)]))
            if prefetch:
                frames.append(b"prefetch")
        hit, runs = len(tokens), None
        with self._lock:
            replies = self._ask_all(self.addresses, frames)
        for address, reply in zip(self.addresses, replies):
            if not reply or len(reply[0]) != _TOKEN_DTYPE.itemsize:
                return 0, None
            rank_hit = int(np.frombuffer(reply[0], dtype=_TOKEN_DTYPE)[0])
            if rank_hit <= 0:
                return 0, None
            if rank_hit < hit or address == self.addresses[0]:
                runs = _runs(reply)
            hit = min(hit, rank_hit)
        return hit, runs

    def metrics(self) -> list[dict | None]:
        """Each rank's figures for vLLM's metrics (None where a rank did not answer)."""
        return [self._json(address, [b"metrics"]) for address in self.addresses]

    def stats(self) -> list[dict | None]:
        """Each rank's counters (None where a rank did not answer)."""
        return [self._json(address, [b"stats"]) for address in self.addresses]

    def control(self, command: dict) -> list[dict | None]:
        return [self._json(address, [b"control", json.dumps(command).encode()]) for address in self.addresses]

    def _json(self, address: str, frames: list[bytes]) -> dict | None:
        with self._lock:
            reply = self._ask(address, frames)
        return None if reply is None else json.loads(reply)

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets.values():
                sock.close()
            self._sockets.clear()


def _runs(reply: list[bytes]) -> list | None:
    if len(reply) < 2:
        return None
    try:
        runs = json.loads(reply[1])
    except ValueError:
        return None
    return runs if isinstance(runs, list) else None
