"""Layerwise generators on CPU: each next() moves exactly one layer, one more syncs."""

import pytest
import torch

from lmcache.v1.gpu_connector import create_gpu_connector
from lmcache.v1.memory import MemoryObj
from tests.helpers import kv_layouts as kl

L, B, N, H, D = 4, 8, 16, 2, 16


def _setup(make):
    gen = torch.Generator().manual_seed(5)
    cache = make(gen)
    slots = kl.slot_mapping("padded", B, N, 80, gen)
    starts, ends = kl.chunk_bounds(80, 32)
    conn = create_gpu_connector(cache.kv_caches, use_layerwise=True, attn_backend=cache.backend)
    objs = [MemoryObj(torch.zeros(tuple(conn.get_shape(e - s)), dtype=conn.kv_dtype), conn.memory_format)
            for s, e in zip(starts, ends)]
    return cache, conn, objs, starts, ends, slots


def _whole(entry):
    return torch.stack(tuple(entry)) if isinstance(entry, tuple) else entry


LAYOUTS = {
    "flash_attn": lambda g: kl.flash_attn("LBNHC", L, B, N, H, D, torch.bfloat16, g),
    "hpu_kv": lambda g: kl.hpu_kv(L, B, N, H, D, torch.float16, g),
    "mla": lambda g: kl.mla("4d", L, B, N, 40, torch.float32, g),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_store_generator_moves_one_layer_per_step(cpu_platform, layout):
    cache, conn, objs, starts, ends, slots = _setup(LAYOUTS[layout])
    reference = [MemoryObj(torch.zeros_like(o.tensor), o.fmt) for o in objs]
    batched = create_gpu_connector(cache.kv_caches, attn_backend=cache.backend)
    batched.batched_from_gpu(reference, starts, ends, slot_mapping=slots)

    steps = conn.batched_from_gpu_layerwise(objs, starts, ends, slot_mapping=slots)
    for layer in range(L):
        next(steps)
        for obj, ref in zip(objs, reference):
            assert torch.equal(obj.tensor[:, : layer + 1], ref.tensor[:, : layer + 1])
            assert not obj.tensor[:, layer + 1:].any(), f"a layer after {layer} moved early"
    next(steps)  # the final step: synchronize
    with pytest.raises(StopIteration):
        next(steps)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_load_generator_makes_one_layer_ready_per_step(cpu_platform, layout):
    cache, conn, objs, starts, ends, slots = _setup(LAYOUTS[layout])
    batched = create_gpu_connector(cache.kv_caches, attn_backend=cache.backend)
    batched.batched_from_gpu(objs, starts, ends, slot_mapping=slots)

    target = LAYOUTS[layout](torch.Generator().manual_seed(9))
    expected = LAYOUTS[layout](torch.Generator().manual_seed(9))
    create_gpu_connector(expected.kv_caches, attn_backend=expected.backend).batched_to_gpu(
        objs, starts, ends, slot_mapping=slots)
    untouched = target.snapshot()
    loader = create_gpu_connector(target.kv_caches, use_layerwise=True, attn_backend=target.backend)
    steps = loader.batched_to_gpu_layerwise(objs, starts, ends, slot_mapping=slots)
    got = [_whole(t) for t in target.kv_caches.values()]
    initial = [g.clone() for g in got]
    want = [_whole(t) for t in expected.kv_caches.values()]
    for step in range(L):
        next(steps)
        for i in range(L):
            now = _whole(list(target.kv_caches.values())[i])
            if i <= step:
                assert torch.equal(now, want[i]), f"layer {i} not ready after step {step}"
            else:
                assert torch.equal(now, initial[i]), f"layer {i} moved before its step"
    next(steps)
    with pytest.raises(StopIteration):
        next(steps)
    assert any(not torch.equal(a, b) for a, b in zip(target.snapshot(), untouched)), "nothing was loaded"


def test_layerwise_on_cpu_is_generator_protocol_even_without_tokens(cpu_platform):
    cache, conn, objs, starts, ends, slots = _setup(LAYOUTS["hpu_kv"])
    nothing = torch.full_like(slots, -1)
    for make in (conn.batched_from_gpu_layerwise, conn.batched_to_gpu_layerwise):
        steps = make(objs, starts, ends, slot_mapping=nothing)
        for _ in range(L + 1):
            next(steps)
        with pytest.raises(StopIteration):
            next(steps)
