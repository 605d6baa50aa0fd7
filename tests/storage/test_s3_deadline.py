"""remote_timeout bounds a whole S3 operation, not each read: a real SeaweedFS is
stopped (SIGSTOP) in the middle of a lookup's HEAD waves, of a multipart put and of a
ranged read, and each returns a miss within the deadline plus a generous slack (a
correctness bound: a request must not hang on a frozen store for one read timeout per
request it still has to send). With one worker the parts go one after another, so a
per-read bound would take one read timeout per remaining part (over 9 s here); and a
server that answers each request just before its read timeout (stopped and let run in
turns) would keep a per-read bound waiting for every wave or part in turn."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

import torch

from lmcache.v1.memory import HostMemoryPool, MemoryFormat, MemoryObj
from lmcache.v1.storage_backend.s3 import S3Backend
from lmcache.v1.token_database import CacheEngineKey
from tests.helpers.s3_server import BUCKET, s3_env, s3_server  # noqa: F401 - fixtures

URL = f"s3://{BUCKET}/deadline/"
TIMEOUT = 3.0
SLACK = 2.0  # thread hand-offs on a busy machine; a per-read bound took 7 to 9 s here
BIG = 48 * 2**20  # six parts of PART_BYTES


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("m", 1, 0, f"{i:032x}", "bfloat16", "kv")


def chunk(nbytes: int) -> MemoryObj:
    tensor = torch.empty(2, 1, nbytes // (2 * 1024 * 2), 1024, dtype=torch.bfloat16)
    tensor.view(torch.int16).random_()
    return MemoryObj(tensor, MemoryFormat.KV_2LTD)


def tier(server, concurrency: int = 1) -> S3Backend:
    return S3Backend(URL, endpoint_url=server.endpoint, timeout=TIMEOUT, connect_timeout=0.5, concurrency=concurrency)


@contextmanager
def frozen_at(server, backend: S3Backend, operation: str, nth: int, stutter: bool = False):
    """SIGSTOP the server as `backend` sends its nth `operation` request (the earlier
    ones answered in full); SIGCONT on leaving. With `stutter`, from then on it is let
    run 0.01 s in every 0.51 s: each request is answered before its read timeout (3 s),
    only the whole operation is late."""
    seen, done = [0], threading.Event()

    def stutter_loop():
        while not done.wait(0.5):
            os.kill(server.proc.pid, signal.SIGCONT)
            if done.wait(0.01):
                return
            os.kill(server.proc.pid, signal.SIGSTOP)

    def before(model, **_):
        if model.name == operation:
            seen[0] += 1
            if seen[0] == nth:
                os.kill(server.proc.pid, signal.SIGSTOP)
                if stutter:
                    threading.Thread(target=stutter_loop, daemon=True).start()

    backend._client.meta.events.register("before-call.s3", before)
    try:
        yield seen
    finally:
        done.set()
        os.kill(server.proc.pid, signal.SIGCONT)
        time.sleep(0.2)  # the stutter thread's last signal is behind us
        os.kill(server.proc.pid, signal.SIGCONT)


def timed(fn):
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def test_a_lookup_wave_returns_within_the_deadline(s3_env):
    writer = tier(s3_env, concurrency=4)
    small = chunk(64 * 1024)
    keys = [key(i) for i in range(80)]
    assert all(writer.put(k, small) for k in keys)
    writer.close()
    backend = tier(s3_env, concurrency=4)
    assert backend.prefix_count(keys[:4]) == 4  # connections made (slow on a busy machine)
    with frozen_at(s3_env, backend, "HeadObject", 5, stutter=True) as seen:  # from the second wave on
        found, took = timed(lambda: backend.prefix_count(keys))
    assert seen[0] >= 5
    assert found % 4 == 0  # the whole waves answered by the deadline (all of them if the server was quick)
    assert took < TIMEOUT + SLACK, f"the lookup took {took:.1f}s"
    assert found == 80 or backend.is_down
    backend.close()


def test_a_multipart_put_returns_within_the_deadline_and_is_never_completed(s3_env):
    backend = tier(s3_env)
    with frozen_at(s3_env, backend, "UploadPart", 2) as seen:
        stored, took = timed(lambda: backend.put(key(100), chunk(BIG)))
    assert seen[0] >= 2
    assert stored is False
    assert took < TIMEOUT + SLACK, f"the put took {took:.1f}s"
    backend.close()
    time.sleep(TIMEOUT + 0.5)  # the abandoned upload's requests run out
    assert tier(s3_env).prefix_count([key(100)]) == 0


def test_a_ranged_read_returns_within_the_deadline(s3_env):
    writer = S3Backend(URL, endpoint_url=s3_env.endpoint, timeout=30.0)
    assert writer.put(key(200), chunk(BIG))
    writer.close()
    backend = tier(s3_env)
    pool = HostMemoryPool(2 * BIG)
    with frozen_at(s3_env, backend, "GetObject", 2, stutter=True) as seen:  # the first range read in full
        got, took = timed(lambda: backend.get(key(200), pool.allocate))
    assert seen[0] >= 2
    assert got is None
    assert took < TIMEOUT + SLACK, f"the read took {took:.1f}s"
    backend.close()
