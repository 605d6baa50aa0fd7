"""Slot -1 (padding) and a skipped prefix (tokens vLLM already holds) are never touched."""

import contextlib

import pytest
import torch

from lmcache.v1.gpu_connector import create_gpu_connector
from lmcache.v1.memory import MemoryObj
from tests.helpers import kv_layouts as kl
from tests.helpers.hpu import emulated_hpu

L, B, N, H, D = 2, 6, 16, 2, 16
PREFIX, TOTAL, CHUNK = 32, 80, 16


def _case(device):
    gen = torch.Generator().manual_seed(11)
    cache = kl.hpu_kv(L, B, N, H, D, torch.bfloat16, gen, device=device)
    slots = torch.randperm(B * N, generator=gen)[:TOTAL]
    pad_at = [PREFIX, PREFIX + 5, TOTAL - 1]  # first moved token, one inside, the last
    slots[pad_at] = -1
    return cache, slots, pad_at


def _rows(cache):
    """Per layer and plane, the cache as [slots, H*D] host rows (independent of the connector)."""
    return [[p.to("cpu").reshape(B * N, H * D).clone() for p in entry] for entry in cache.kv_caches.values()]


@pytest.mark.parametrize("device", ["cpu", "hpu"])
def test_padding_and_skipped_prefix_are_left_alone(cpu_platform, device):
    context = emulated_hpu(lazy=True) if device == "hpu" else contextlib.nullcontext()
    with context:
        cache, slots, pad_at = _case(device)
        conn = create_gpu_connector(cache.kv_caches)
        starts, ends = kl.chunk_bounds(TOTAL - PREFIX, CHUNK)
        starts = [s + PREFIX for s in starts]      # the prefix is skipped: no object covers it
        ends = [e + PREFIX for e in ends]
        sentinel = 3.0
        objs = [MemoryObj(torch.full(tuple(conn.get_shape(e - s)), sentinel, dtype=torch.bfloat16), conn.memory_format)
                for s, e in zip(starts, ends)]
        conn.batched_from_gpu(objs, starts, ends, slot_mapping=slots)
        for p in pad_at:   # object positions of padding are not written
            i = next(k for k, (s, e) in enumerate(zip(starts, ends)) if s <= p < e)
            assert torch.all(objs[i].tensor[:, :, p - starts[i]] == sentinel)

        before = _rows(cache)
        for obj in objs:   # load something recognisably different
            obj.tensor.neg_()
        conn.batched_to_gpu(objs, starts, ends, slot_mapping=slots)
        after = _rows(cache)

        moved = slots[PREFIX:]
        moved = moved[moved >= 0]
        untouched = torch.ones(B * N, dtype=torch.bool)
        untouched[moved] = False
        prefix_slots = slots[:PREFIX]
        assert bool(untouched[prefix_slots].all())
        for layer in range(L):
            for plane in range(2):
                assert torch.equal(after[layer][plane][untouched], before[layer][plane][untouched]), \
                    "a slot outside the moved tokens (prefix, padding or unused) changed"
                assert torch.equal(after[layer][plane][moved], -before[layer][plane][moved])

