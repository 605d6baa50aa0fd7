"""The real engine against a real `lmcache server` process: what one process stores
another loads bit-exact; nothing leaks when a client dies; a dead server is misses
and a restarted one is found again; the disk L2 survives a restart, host memory not."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

from lmcache.testing.processes import wait_until
from lmcache.v1.config import LMCacheEngineConfig
from tests.helpers.cache_server import REPO
from tests.helpers.children import child_result, spawn_child
from tests.helpers.workload import check_prompt, make_engine, prompt_tokens, store_prompt

N = 64  # tokens: 4 chunks of 16


def test_one_process_stores_another_loads_bit_exact(cache_server):
    config = cache_server.config()
    stored = child_result(spawn_child({"config": config, "mode": "store", "prompts": [1, 2, 3], "tokens": N}))
    assert stored["stored"] == 3 * N
    checked = child_result(spawn_child({"config": config, "mode": "check", "prompts": [1, 2, 3, 9], "tokens": N}))
    assert checked["wrong"] == 0
    assert checked["loaded"] == 3 * N  # prompt 9 was never stored
    assert checked["stats"]["tier_server.hit_tokens"] == 3 * N
    status = cache_server.status()
    assert status["l1_chunks"] == 12
    assert status["pins"] == 0 and status["slots_being_written"] == 0  # both children gave everything back


def test_a_lookup_lease_pins_on_the_server_and_the_load_unpins(cache_server):
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**cache_server.config()), N)
    try:
        store_prompt(engine, conn, 1, N)
        assert engine.lookup(prompt_tokens(1, N), lease_id="1:req") == N
        assert cache_server.status()["pins"] == 4  # one per chunk, held for the load
        assert check_prompt(engine, conn, 1, N) == (N, True)
        engine.release_lease("1:req")
        assert wait_until(lambda: cache_server.status()["pins"] == 0, 5)
    finally:
        engine.close()


HOLDER = """
import sys, time, torch
from lmcache.v1.config import LMCacheEngineConfig
from tests.helpers.workload import make_engine, prompt_tokens
config = LMCacheEngineConfig.from_defaults(chunk_size=16, mp_host="127.0.0.1", mp_port=int(sys.argv[1]))
engine, conn = make_engine(config, 64)
held = [engine.storage.allocate(conn.get_shape(16), conn.kv_dtype, conn.memory_format) for _ in range(3)]
assert all(h is not None for h in held)
assert engine.lookup(prompt_tokens(1, 64), lease_id="held") == 64
print("ready", flush=True)
time.sleep(600)
"""


def test_a_client_killed_mid_store_and_mid_load_leaks_nothing(cache_server):
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**cache_server.config()), N)
    store_prompt(engine, conn, 1, N)
    engine.close()
    before = cache_server.status()["l1_used_bytes"]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache_server.port)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        status = cache_server.status()
        assert status["slots_being_written"] == 3 and status["pins"] == 4
        assert status["l1_used_bytes"] > before
        holder.kill()  # SIGKILL: no goodbye
        holder.wait()
        assert wait_until(lambda: cache_server.status()["slots_being_written"] == 0, 10)
        status = cache_server.status()
        assert status["pins"] == 0 and status["l1_used_bytes"] == before
        assert "reclaimed 3 unwritten slot(s) and 4 pin(s)" in cache_server.log()
    finally:
        if holder.poll() is None:
            holder.kill()


def test_server_killed_is_misses_and_a_restarted_one_is_found_again(cache_server, caplog):
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**cache_server.config()), N)
    try:
        store_prompt(engine, conn, 1, N)
        assert engine.lookup(prompt_tokens(1, N)) == N
        cache_server.kill()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="lmcache"):
            for p in (2, 3, 4):
                store_prompt(engine, conn, p, N)  # dropped, never an error
                assert engine.lookup(prompt_tokens(p, N)) == 0
                assert engine.lookup(prompt_tokens(1, N), lease_id=f"{p}:r") == 0
                assert check_prompt(engine, conn, 1, N)[0] == 0
        assert time.monotonic() - started < 10
        assert caplog.text.count("unreachable") == 1, caplog.text
        cache_server.start()  # same port; its host memory starts empty
        assert wait_until(lambda: engine.lookup(prompt_tokens(1, N)) == 0 and store_prompt(engine, conn, 5, N) == N
                          and engine.lookup(prompt_tokens(5, N)) == N, 10)
        assert check_prompt(engine, conn, 5, N) == (N, True)
    finally:
        engine.close()


def test_disk_l2_is_found_again_after_a_restart_host_memory_is_not(cache_server_factory, tmp_path):
    adapter = '{"type": "fs", "base_path": "%s", "max_capacity_gb": 0.05}' % tmp_path
    server = cache_server_factory(extra_args=("--l2-adapter", adapter)).start()
    config = server.config()
    assert child_result(spawn_child({"config": config, "mode": "store", "prompts": [1], "tokens": N}))["stored"] == N
    server.stop()  # SIGTERM: queued disk writes are finished
    assert "the disk tier keeps its files" in server.log()
    server.start()
    checked = child_result(spawn_child({"config": config, "mode": "check", "prompts": [1], "tokens": N}))
    assert checked["loaded"] == N and checked["wrong"] == 0
    assert server.status()["stats"]["tier_disk.hit_tokens"] == N


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_request_timing_out_keeps_the_pins_of_chunks_still_held(cache_server):
    """A server too slow to answer in time is a miss, but the connection that holds pins
    stays open (no slot is reused under a reader) until the last of them is given back."""
    import os
    import signal

    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**cache_server.config(remote_timeout=0.5)), N)
    try:
        store_prompt(engine, conn, 1, N)
        assert engine.lookup(prompt_tokens(1, N), lease_id="held") == N
        os.kill(cache_server.proc.pid, signal.SIGSTOP)
        try:
            assert wait_until(lambda: _state(cache_server.proc.pid) == "T", 5)  # every thread stopped
            started = time.monotonic()
            assert engine.lookup(prompt_tokens(1, N)) == 0  # no answer in time: a miss
            assert time.monotonic() - started < 3
        finally:
            os.kill(cache_server.proc.pid, signal.SIGCONT)
        assert cache_server.status()["pins"] == 4  # the lease's pins outlived the timeout
        assert wait_until(lambda: engine.lookup(prompt_tokens(1, N)) == N, 10)  # a new connection
        engine.release_lease("held")  # the last object of the old connection: it closes
        assert wait_until(lambda: cache_server.status()["pins"] == 0, 10)
        assert check_prompt(engine, conn, 1, N) == (N, True)
    finally:
        engine.close()


def _leased_load(engine, conn, p: int, lease_id: str) -> tuple[int, bool]:
    import torch

    from lmcache.v1.cache_engine import TransferSpec
    from tests.helpers.host_connector import bits
    from tests.helpers.workload import prompt_kv

    conn.cache.zero_()
    got = engine.batched_retrieve([TransferSpec(prompt_tokens(p, N), torch.arange(N), lease_id=lease_id)])[0]
    return got, torch.equal(bits(conn.cache[:got]), bits(prompt_kv(p, N, conn.kv_dtype)[:got]))


def test_concurrent_writers_and_readers_under_eviction_never_see_wrong_bytes(cache_server_factory):
    """Two processes store overlapping prompts into a server whose host tier holds about
    a third of them (LRU evicts all the time) while this process keeps loading them: a
    pinned slot is never reused under a reader, so every hit is exact."""
    server = cache_server_factory(l1_gb=24 * 16 * 1024 / 1024**3).start()  # 24 chunks of 16 KiB
    config = server.config()
    writers = [spawn_child({"config": config, "mode": "store", "prompts": list(range(0, 10)), "tokens": N,
                            "rounds": 3}),
               spawn_child({"config": config, "mode": "check", "prompts": list(range(5, 15)), "tokens": N,
                            "rounds": 3})]
    reader, conn = make_engine(LMCacheEngineConfig.from_defaults(**config), N)
    loaded = wrong = 0
    deadline = time.monotonic() + 180  # bounded: once the writers are done, one more pass
    try:
        while (any(w.poll() is None for w in writers) or loaded == 0) and time.monotonic() < deadline:
            for p in range(15):
                # the reader stores p too (so a hit does not depend on the writers' timing); a
                # lease pins what the lookup found; stores of 3 other prompts (12 chunks) push
                # the LRU meanwhile; then the load must get the pinned bytes
                store_prompt(reader, conn, p, N)
                hit = reader.lookup(prompt_tokens(p, N), lease_id="r")
                for q in (100 + p, 200 + p, 300 + p):
                    store_prompt(reader, conn, q, N)
                got, exact = _leased_load(reader, conn, p, "r")
                assert got >= hit  # a lease's promise holds (others may have stored more meanwhile)
                loaded += got
                wrong += not exact
        results = [child_result(w) for w in writers]
    finally:
        reader.close()
        for w in writers:
            if w.poll() is None:
                w.kill()
    assert loaded > 0 and wrong == 0
    assert results[1]["wrong"] == 0
    status = server.status()
    assert status["stats"]["misses_evicted"] > 0  # the pressure was real
    assert status["pins"] == 0 and status["slots_being_written"] == 0
