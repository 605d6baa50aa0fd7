"""The connector on a real NVIDIA/AMD GPU (skipped without one)."""

import pytest
import torch

from lmcache.v1.gpu_connector import create_gpu_connector
from lmcache.v1.memory import MemoryObj
from tests.helpers import kv_layouts as kl
from tests.helpers.roundtrip import roundtrip

pytestmark = pytest.mark.cuda


def cuda_platform_stream():
    from lmcache.platforms import current_platform

    return current_platform().current_stream()

L, H, D = 2, 2, 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
SIZES = {16: (10, 96, 24), 128: (3, 200, 160)}
LAYOUTS = {
    "flash_attn/LBNHC": lambda B, N, dt, g: kl.flash_attn("LBNHC", L, B, N, H, D, dt, g, device="cuda"),
    "flash_attn/LBHNC": lambda B, N, dt, g: kl.flash_attn("LBHNC", L, B, N, H, D, dt, g, device="cuda"),
    "flash_attn/BLNHC": lambda B, N, dt, g: kl.flash_attn("BLNHC", L, B, N, H, D, dt, g, device="cuda"),
    "mla/4d": lambda B, N, dt, g: kl.mla("4d", L, B, N, 72, dt, g, device="cuda"),
    "mla/3d": lambda B, N, dt, g: kl.mla("3d", L, B, N, 72, dt, g, device="cuda"),
    "mla/4d_strided": lambda B, N, dt, g: kl.mla("4d_strided", L, B, N, 72, dt, g, device="cuda"),
}


def _maker(layout, dtype, block):
    def make(seed):
        return LAYOUTS[layout](SIZES[block][0], block, DTYPES[dtype], torch.Generator().manual_seed(seed))

    return make


@pytest.mark.parametrize("pattern", kl.SLOT_PATTERNS)
@pytest.mark.parametrize("block", list(SIZES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_roundtrip_on_cuda(cuda_platform, layout, dtype, block, pattern):
    _, tokens, chunk = SIZES[block]
    roundtrip(_maker(layout, dtype, block), pattern, tokens, chunk, torch.device("cuda", 0), seed=block)


def test_store_waits_for_pending_compute_stream_work(cuda_platform):
    """The copies run on a side stream; they must still see KV the compute stream is writing."""
    gen = torch.Generator().manual_seed(0)
    cache = kl.flash_attn("LBNHC", 2, 64, 16, 8, 128, torch.bfloat16, gen, device="cuda")
    conn = create_gpu_connector(cache.kv_caches, attn_backend="FLASH_ATTN")
    slots = torch.arange(512)
    obj = MemoryObj(torch.zeros(tuple(conn.get_shape(512)), dtype=torch.bfloat16).pin_memory(), conn.memory_format)
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):                       # keep the compute stream busy ...
        big = big @ big / 4096
    for buffer in cache.buffers:             # ... then write the KV on it
        buffer.fill_(5.0)
    conn.from_gpu(obj, 0, 512, slot_mapping=slots)
    assert torch.all(obj.tensor == 5.0)
    assert conn.transfers._stream is not None and conn.transfers._stream != cuda_platform_stream()


@pytest.mark.parametrize("layout", ["flash_attn/LBNHC", "mla/4d"])
def test_layerwise_on_cuda(cuda_platform, layout):
    gen = torch.Generator().manual_seed(1)
    cache = LAYOUTS[layout](10, 16, torch.bfloat16, gen)
    slots = kl.slot_mapping("padded", 10, 16, 96, gen)
    starts, ends = kl.chunk_bounds(96, 24)
    conn = create_gpu_connector(cache.kv_caches, attn_backend=cache.backend, use_layerwise=True)
    objs = [MemoryObj(torch.zeros(tuple(conn.get_shape(e - s)), dtype=torch.bfloat16).pin_memory(), conn.memory_format)
            for s, e in zip(starts, ends)]
    reference = [MemoryObj(torch.zeros_like(o.tensor), o.fmt) for o in objs]
    conn.batched_from_gpu(reference, starts, ends, slot_mapping=slots)
    steps = conn.batched_from_gpu_layerwise(objs, starts, ends, slot_mapping=slots)
    for _ in range(L + 1):
        next(steps)
    for got, want in zip(objs, reference):
        assert torch.equal(got.tensor.view(torch.int16), want.tensor.view(torch.int16))
    before = [kl.raw(b).clone() for b in cache.buffers]
    for b in cache.buffers:
        b.zero_()
    steps = conn.batched_to_gpu_layerwise(objs, starts, ends, slot_mapping=slots)
    for _ in range(L + 1):
        next(steps)
    valid_rows = create_gpu_connector(cache.kv_caches, attn_backend=cache.backend)  # re-read the loaded slots
    again = [MemoryObj(torch.zeros_like(o.tensor), o.fmt) for o in objs]
    valid_rows.batched_from_gpu(again, starts, ends, slot_mapping=slots)
    for got, want in zip(again, reference):
        assert torch.equal(got.tensor.view(torch.int16), want.tensor.view(torch.int16))
    assert any(not torch.equal(kl.raw(b), a) for b, a in zip(cache.buffers, before))
