"""The connector on the emulated Gaudi (real `hpu` tensors backed by CPU memory).

EMULATION: these tests prove data movement, device placement and sync
discipline (graph breaks and synchronizes per batch); they say nothing about
Gaudi speed.
"""

import pytest
import torch

from lmcache.v1.gpu_connector import create_gpu_connector
from lmcache.v1.memory import MemoryObj
from tests.helpers import kv_layouts as kl
from tests.helpers.roundtrip import Mismatch, roundtrip
from tests.helpers.hpu import emulated_hpu

L, H, D = 2, 2, 16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
SIZES = {16: (6, 64, 24), 128: (2, 160, 100)}
LAYOUTS = {
    "hpu_kv": lambda B, N, dt, g: kl.hpu_kv(L, B, N, H, D, dt, g, device="hpu"),
    "hpu_kv/strided": lambda B, N, dt, g: kl.hpu_kv(L, B, N, H, D, dt, g, device="hpu", padded=True),
    "hpu_mla/4d": lambda B, N, dt, g: kl.mla("hpu4d", L, B, N, 48, dt, g, device="hpu"),
    "hpu_mla/3d": lambda B, N, dt, g: kl.mla("hpu3d", L, B, N, 48, dt, g, device="hpu"),
}


def _maker(layout, dtype, block):
    num_blocks = SIZES[block][0]

    def make(seed):
        return LAYOUTS[layout](num_blocks, block, DTYPES[dtype], torch.Generator().manual_seed(seed))

    return make


def _cases():
    # every slot pattern for bf16; the padded pattern (the hardest) for the other dtypes;
    # lazy and eager mode alternate over the cases, so each layout sees both
    index = 0
    for layout in LAYOUTS:
        for dtype in DTYPES:
            for block in SIZES:
                patterns = kl.SLOT_PATTERNS if dtype == "bf16" else ("padded",)
                for pattern in patterns:
                    mode = "lazy" if index % 2 == 0 else "eager"
                    index += 1
                    yield pytest.param(layout, dtype, block, pattern, mode,
                                       id=f"{layout}-{dtype}-b{block}-{pattern}-{mode}")


@pytest.mark.parametrize("layout,dtype,block,pattern,mode", list(_cases()))
def test_roundtrip_on_emulated_hpu(layout, dtype, block, pattern, mode):
    _, tokens, chunk = SIZES[block]
    with emulated_hpu(lazy=mode == "lazy"):
        roundtrip(_maker(layout, dtype, block), pattern, tokens, chunk, torch.device("hpu", 0), seed=block)


def test_emulated_roundtrip_check_catches_corruption(hpu_emu):
    with pytest.raises(Mismatch):
        roundtrip(_maker("hpu_kv", "bf16", 16), "padded", 64, 24, torch.device("hpu", 0), corrupt="cache")


def _batch(num_layers, num_chunks, chunk=32, block=16):
    num_tokens = num_chunks * chunk
    gen = torch.Generator().manual_seed(3)
    cache = kl.hpu_kv(num_layers, num_tokens // block + 2, block, H, D, torch.bfloat16, gen, device="hpu")
    conn = create_gpu_connector(cache.kv_caches)
    slots = kl.slot_mapping("shuffled_blocks", cache.num_blocks, block, num_tokens, gen)
    starts, ends = kl.chunk_bounds(num_tokens, chunk)
    objs = [MemoryObj(torch.zeros(tuple(conn.get_shape(e - s)), dtype=torch.bfloat16), conn.memory_format)
            for s, e in zip(starts, ends)]
    return conn, objs, starts, ends, slots


@pytest.mark.parametrize("num_layers,num_chunks", [(1, 1), (2, 8), (6, 3)])
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_sync_discipline_per_batch(hpu_emu, lazy, num_layers, num_chunks):
    """One graph break before the gathers (store) and one after the scatters (load) in lazy mode,
    none in eager mode; one synchronize per batch; whatever the number of chunks and layers."""
    hpu_emu.set_lazy(lazy)
    conn, objs, starts, ends, slots = _batch(num_layers, num_chunks)
    hpu_emu.reset_counters()
    conn.batched_from_gpu(objs, starts, ends, slot_mapping=slots)
    assert (hpu_emu.counters.mark_steps, hpu_emu.counters.synchronizes) == (1 if lazy else 0, 1)
    hpu_emu.reset_counters()
    conn.batched_to_gpu(objs, starts, ends, slot_mapping=slots)
    assert (hpu_emu.counters.mark_steps, hpu_emu.counters.synchronizes) == (1 if lazy else 0, 1)
    if lazy:
        assert hpu_emu.counters.ops_since_mark_step == 0, "work left in the lazy graph after the load"


def test_store_reads_after_a_graph_break(hpu_emu):
    """KV written into the cache in lazy mode is only real after mark_step: the store breaks the graph first."""
    conn, objs, starts, ends, slots = _batch(2, 2)
    cache_k = conn.layout.plane_tensors[0][0]
    cache_k.view(-1, H * D)[slots[0]] = 7.0
    assert hpu_emu.counters.ops_since_mark_step > 0
    conn.batched_from_gpu(objs, starts, ends, slot_mapping=slots)
    assert torch.all(objs[0].tensor[0, 0, 0] == 7.0)


def test_cpu_tensors_are_refused_on_hpu(hpu_emu):
    gen = torch.Generator().manual_seed(0)
    cache = kl.hpu_kv(1, 2, 16, H, D, torch.bfloat16, gen)  # host tensors
    with pytest.raises(ValueError, match="on cpu but the lmcache platform is hpu"):
        create_gpu_connector(cache.kv_caches)


def test_layerwise_refused_on_hpu(hpu_emu):
    conn, *_ = _batch(1, 1)
    k, v = conn.layout.plane_tensors[0]
    with pytest.raises(ValueError, match="vllm-gaudi calls attention directly and never calls"):
        create_gpu_connector({"l": kl.TensorTuple((k, v))}, use_layerwise=True)
