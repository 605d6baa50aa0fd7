"""The `lm` tier of `bench storage`: the lm:// tier's put/get against our server,
next to a raw TCP socket moving the same bytes on loopback in the same run.

Both peers are separate processes (our server, and a raw peer that receives into
one preallocated buffer and sends from it), so client and peer never share a GIL.
  lm put  = tier.put of each chunk (header + payload), then one EXIST round trip
            (the server reads requests in order: all PUTs are in)
  raw put = per chunk a 9-byte header + the payload, then a 1-byte ack round trip
  lm get  = tier.get of each chunk (GET, reply header, payload straight into a
            memory object from the pool; checked against the header)
  raw get = per chunk a 9-byte request, the payload into a preallocated buffer
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

from lmcache.testing.processes import free_port
from lmcache.v1.memory import HostMemoryPool
from lmcache.v1.server import protocol as P
from lmcache.v1.storage_backend.serde import payload_view

_RAW_HEADER = struct.Struct("<cQ")


def serve_raw(port: int, nbytes: int) -> None:
    """The raw peer: S n -> receive n bytes; R n -> send n bytes; A -> one byte back."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    listener = socket.create_server(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = bytearray(_RAW_HEADER.size)
    while P.recv_exact(conn, memoryview(head)) == len(head):
        cmd, n = _RAW_HEADER.unpack(head)
        if cmd == b"S":
            P.recv_exact(conn, view[:n])
        elif cmd == b"R":
            conn.sendall(view[:n])
        else:
            conn.sendall(b"k")




def _connect(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench peer on port {port} did not start")
            time.sleep(0.05)


def bench_lm(objs, keys, repeat, interleaved_best_with_setup) -> dict[str, float]:
    from lmcache.v1.storage_backend.lm import LMServerBackend

    nbytes = objs[0].nbytes
    budget_gb = (len(objs) + 2) * nbytes / 1024**3
    server_port, raw_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lmcache.v1.server", "127.0.0.1", str(server_port), "--max-size-gb",
         f"{budget_gb:.6f}", "--log-level", "WARNING"],
    )
    peer = subprocess.Popen(
        [sys.executable, "-c", f"from lmcache.bench.lm_tier import serve_raw; serve_raw({raw_port}, {nbytes})"]
    )
    try:
        _connect(server_port, server).close()
        raw = _connect(raw_port, peer)
        tier = LMServerBackend(f"lm://127.0.0.1:{server_port}", timeout=30.0, connect_timeout=5.0)
        pool = HostMemoryPool(2 * nbytes)
        payloads = [memoryview(payload_view(o.tensor)) for o in objs]
        dst = memoryview(bytearray(nbytes))

        def put():  # as the background writer stores a step's chunks: one batch, confirmed by one round trip
            assert all(tier.put_many(keys, objs)), "the lm server did not take a chunk"

        def get():
            for key in keys:
                obj = tier.get(key, pool.allocate)
                assert obj is not None, "the lm server lost a chunk during the benchmark"
                obj.free()

        def raw_send():
            for payload in payloads:
                raw.sendall(_RAW_HEADER.pack(b"S", nbytes))
                raw.sendall(payload)
            raw.sendall(_RAW_HEADER.pack(b"A", 0))
            assert raw.recv(1) == b"k"

        def raw_recv():
            for _ in payloads:
                raw.sendall(_RAW_HEADER.pack(b"R", nbytes))
                assert P.recv_exact(raw, dst) == nbytes

        def nothing():
            pass

        put()
        best = interleaved_best_with_setup(
            {"raw_send": (nothing, raw_send), "put": (nothing, put), "raw_recv": (nothing, raw_recv),
             "get": (nothing, get)},
            repeat,
        )
        tier.close()
        raw.close()
        return best
    finally:
        for proc in (server, peer):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
