"""Chunk keys: stable across processes, distinct where the data differs, prefix-chained."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmcache.v1.cache_engine import LMCacheEngineMetadata
from lmcache.v1.token_database import CacheEngineKey, ChunkedTokenDatabase, chunk_hashes, mask_skip, token_bytes
from tests.helpers.children import REPO

META = LMCacheEngineMetadata("meta-llama/Llama-3.1-8B", 2, 1, torch.bfloat16, (32, 2, 256, 8, 128))
TOKENS = [(i * 7919) % 128_000 for i in range(1000)]

_PRINT_KEYS = """
import json, torch
from lmcache.v1.cache_engine import LMCacheEngineMetadata
from lmcache.v1.token_database import ChunkedTokenDatabase
meta = LMCacheEngineMetadata("meta-llama/Llama-3.1-8B", 2, 1, torch.bfloat16, (32, 2, 256, 8, 128))
tokens = [(i * 7919) % 128_000 for i in range(1000)]
db = ChunkedTokenDatabase(256, meta, save_unfull_chunk=True)
print(json.dumps([k.to_string() for _, _, k in db.process_tokens(tokens)]))
"""


def keys(tokens, meta=META, chunk_size=256, unfull=True):
    return [k for _, _, k in ChunkedTokenDatabase(chunk_size, meta, unfull).process_tokens(tokens)]


def test_same_keys_in_processes_with_different_hash_seeds():
    procs = [
        subprocess.Popen([sys.executable, "-c", _PRINT_KEYS], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONHASHSEED=seed))
        for seed in ("1", "2")
    ]
    outputs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    here = [k.to_string() for k in keys(TOKENS)]
    assert outputs[0] == outputs[1] == here
    assert len(here) == 4 and len(set(here)) == 4


def test_input_types_give_the_same_keys():
    expected = keys(TOKENS)
    assert keys(torch.tensor(TOKENS)) == expected
    assert keys(torch.tensor(TOKENS, dtype=torch.int32)) == expected
    assert keys(np.array(TOKENS, dtype=np.int64)) == expected
    assert keys(tuple(TOKENS)) == expected


@pytest.mark.parametrize("change", [
    dict(model_name="meta-llama/Llama-3.1-70B"),
    dict(world_size=4),
    dict(worker_id=0),
    dict(kv_dtype=torch.float16),
    dict(kv_shape=(16, 2, 256, 8, 128)),
    dict(kv_shape=(32, 2, 256, 4, 128)),
    dict(kv_shape=(32, 2, 256, 8, 64)),
    dict(use_mla=True),
    dict(layout_fingerprint="other-layout"),
])
def test_what_differs_in_the_data_differs_in_the_key(change):
    base = keys(TOKENS)
    other = keys(TOKENS, dataclasses.replace(META, **change))
    assert not set(k.to_string() for k in base) & set(k.to_string() for k in other)
    # ... while the chunk hashes themselves (the token part) stay equal
    assert [k.chunk_hash for k in base] == [k.chunk_hash for k in other]


def test_prefix_property():
    short, long = keys(TOKENS[:512]), keys(TOKENS)
    assert long[:2] == short
    changed = list(TOKENS)
    changed[300] += 1  # inside chunk 1
    after = keys(changed)
    assert after[0] == long[0]
    assert all(a != b for a, b in zip(after[1:], long[1:]))
    # the same chunk content after a different prefix is a different key
    assert keys(TOKENS[256:512])[0] != long[1]


def test_partial_chunk_follows_save_unfull_chunk():
    db_no = ChunkedTokenDatabase(256, META, save_unfull_chunk=False)
    db_yes = ChunkedTokenDatabase(256, META, save_unfull_chunk=True)
    assert [(s, e) for s, e, _ in db_no.process_tokens(TOKENS)] == [(0, 256), (256, 512), (512, 768)]
    assert [(s, e) for s, e, _ in db_yes.process_tokens(TOKENS)][-1] == (768, 1000)


def test_mask_skips_a_chunk_aligned_prefix():
    db = ChunkedTokenDatabase(256, META)
    mask = torch.ones(1000, dtype=torch.bool)
    mask[:512] = False
    assert [s for s, _, _ in db.process_tokens(TOKENS, mask)] == [512]
    mask[:300] = False
    mask[300:] = True
    with pytest.raises(ValueError, match="not a multiple of chunk_size=256"):
        list(db.process_tokens(TOKENS, mask))
    gap = torch.ones(1000, dtype=torch.bool)
    gap[:256] = False
    gap[600] = False
    with pytest.raises(ValueError, match="no gaps"):
        mask_skip(gap, 1000, 256)
    with pytest.raises(ValueError, match="one per token"):
        mask_skip(torch.ones(5, dtype=torch.bool), 1000, 256)


def test_key_string_is_file_and_redis_safe_and_parses_back():
    odd = CacheEngineKey("org/model@v1 100%", 8, 3, "ab" * 16, "bfloat16", "kv.L2/x")
    text = odd.to_string()
    assert "/" not in text and " " not in text and text.count("@") == 5
    assert CacheEngineKey.from_string(text) == odd
    for k in keys(TOKENS):
        assert CacheEngineKey.from_string(k.to_string()) == k
        assert "/" not in k.to_string()
    for bad in ("a@b", "m@x@0@ab@bf16@fp", "m@1@0@zz@bf16@fp"):
        with pytest.raises(ValueError, match="not a cache key"):
            CacheEngineKey.from_string(bad)


def test_bad_token_ids_are_refused():
    db = ChunkedTokenDatabase(4, META)
    with pytest.raises(ValueError, match="int32"):
        db.chunks([1, 2, 3, 2**40])
    with pytest.raises(ValueError, match="integers"):
        db.chunks(torch.ones(8))


# Recorded with the first release of the key scheme: chunk hashes must never change
# silently (disk and Redis caches written by an older build would all turn into misses).
GOLDEN_CHUNK_HASHES = [
    "fd4393609e8d3a0bf0cfc814d3995409",
    "3e11c7c4ddbbe76dfef0e61a068aa565",
    "9cb6742e9f64ecfa68711331cc89054f",
    "89485ffcae3bf0caa5fe06fd1a114e5b",
]


def test_chunk_hashes_are_those_of_the_published_scheme():
    assert [k.chunk_hash for k in keys(TOKENS)] == GOLDEN_CHUNK_HASHES
    # negative ids (the exact, slower list path) are hashed as int32 too
    assert chunk_hashes([0, 1, 2**31 - 1, -(2**31), -1, 5], 4) == [
        "d2788fd8c9d4dfe97c943dc4c4201d13", "2bfefdd59d6792a7798ce58167a50887",
    ]


@pytest.mark.parametrize("ids", [
    [0, 1, 2, 3],
    [2**31 - 1, 0, 7, 2**31 - 1],
    [-1, 5, -(2**31), 9],  # negative: not unsigned, the list takes the struct path
    [True, False, np.int64(3), np.int32(-4)],  # ints in disguise are ints
])
def test_every_list_path_hashes_like_the_array_path(ids):
    as_array = np.array([int(i) for i in ids], dtype=np.int64)
    assert chunk_hashes(ids, 2) == chunk_hashes(as_array, 2) == chunk_hashes(tuple(ids), 2)
    assert bytes(token_bytes(ids)) == as_array.astype("<i4").tobytes()


@pytest.mark.parametrize("bad", [[1, 2**31], [1, 2**32], [1, -(2**31) - 1], [1, 2**40]])
def test_ids_outside_int32_are_refused_on_every_path(bad):
    with pytest.raises(ValueError, match="int32"):
        token_bytes(bad)
    with pytest.raises(ValueError, match="int32"):
        token_bytes(np.array(bad, dtype=np.int64))


def test_hashing_a_prefix_of_a_list_equals_hashing_the_sliced_list():
    long = TOKENS + [3] * 100  # a prompt that is not a whole number of chunks
    assert chunk_hashes(long, 256, 768) == chunk_hashes(long[:768], 256) == GOLDEN_CHUNK_HASHES[:3]
    db = ChunkedTokenDatabase(256, META)
    chunks = db.chunks(long)  # 1100 tokens: 4 whole chunks, the last one new
    assert [c.key.chunk_hash for c in chunks[:3]] == GOLDEN_CHUNK_HASHES[:3]
    assert chunks[3].end == 1024 and chunks[3].key.chunk_hash not in GOLDEN_CHUNK_HASHES
    assert [(c.start, c.end) for c in db.chunks(long, 600)] == [(0, 256), (256, 512)]
