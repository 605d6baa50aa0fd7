"""Paged KV caches in each supported layout, and a reference writer per layout.

The reference writers put known K/V for given slots into a cache the way vLLM's
own kernels do (for cpu_attn: by calling vLLM's CPU kernel itself), without any
of the connector's addressing code, so tests compare the connector against an
independent account of each layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmcache.testing.vllm_gaudi import TensorTuple  # noqa: F401  (vllm-gaudi's, .shape = (2, ...))

RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(RAW[t.element_size()])


@dataclass
class PagedCache:
    """One layout instance: what vLLM would register, plus the memory behind it."""

    name: str
    backend: str | None            # attention backend name passed to the factory
    kv_caches: dict                # layer name -> tensor or (K, V) tuple
    buffers: list[torch.Tensor]    # the memory behind it (compare these: every byte)
    num_blocks: int
    block_size: int
    heads: int                     # 1 for MLA
    head_size: int                 # C for MLA
    dtype: torch.dtype             # what the object holds (the cache dtype)
    planes: int
    write: Callable                # write(layer, slots, values[planes, T, heads, head_size])
    input_dtype: torch.dtype       # dtype of the values handed to write()
    use_mla: bool | None = None    # vLLM's model_config.use_mla, as the adapter passes it

    @property
    def hidden(self) -> int:
        return self.heads * self.head_size

    def snapshot(self) -> list[torch.Tensor]:
        """Every byte behind the cache, as host integer tensors."""
        return [raw(b).to("cpu").clone() for b in self.buffers]


def _fill(shape, dtype, gen, device):
    base = torch.randn(*shape, generator=gen, dtype=torch.float32)
    return base.to(dtype).to(device)


def flash_attn(physical: str, L, B, N, H, D, dtype, gen, device="cpu") -> PagedCache:
    """CUDA FlashAttention views [B, H, N, 2D] in a given physical order."""
    if physical == "LBNHC":      # vLLM's default: physical [B, N, H, 2D] per layer
        buffers = [_fill((B, N, H, 2 * D), dtype, gen, device) for _ in range(L)]
        views = [b.permute(0, 2, 1, 3) for b in buffers]
    elif physical == "LBHNC":    # contiguous [B, H, N, 2D]
        buffers = [_fill((B, H, N, 2 * D), dtype, gen, device) for _ in range(L)]
        views = list(buffers)
    elif physical == "BLNHC":    # block-outermost: one buffer [B, L, N, H, 2D]
        whole = _fill((B, L, N, H, 2 * D), dtype, gen, device)
        buffers = [whole]
        views = [whole[:, layer].permute(0, 2, 1, 3) for layer in range(L)]
    else:
        raise ValueError(physical)

    def write(layer, slots, values):
        tokens_first = views[layer].transpose(1, 2)         # [B, N, H, 2D], as vLLM's FA splits it
        key_cache, value_cache = tokens_first.split(D, dim=-1)
        b, o = _block_offset(slots, N)
        key_cache[b, o] = values[0]
        value_cache[b, o] = values[1]

    return PagedCache(f"flash_attn/{physical}", "FLASH_ATTN", {f"model.layers.{i}.attn": v for i, v in enumerate(views)},
                      buffers, B, N, H, D, dtype, 2, write, dtype)


def cpu_attn(L, B, N, H, D, dtype, gen) -> PagedCache:
    """vLLM's CPU backend: contiguous [B, H, N, 2D], written by vLLM's own CPU kernel.

    dtype torch.uint8 stands for vLLM's fp8 (e4m3) CPU cache; its values are bf16.
    """
    import vllm._custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    fp8 = dtype == torch.uint8
    input_dtype = torch.bfloat16 if fp8 else dtype
    isa = _get_attn_isa(input_dtype, N, D, "fp8_e4m3" if fp8 else "auto")
    if fp8:
        buffers = [torch.randint(0, 0x7E, (B, H, N, 2 * D), generator=gen, dtype=torch.uint8) for _ in range(L)]
    else:
        buffers = [_fill((B, H, N, 2 * D), dtype, gen, "cpu") for _ in range(L)]

    def write(layer, slots, values):
        halves = buffers[layer].view(B, H, 2 * N, D)
        key_cache, value_cache = halves.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(values[0].contiguous(), values[1].contiguous(), key_cache, value_cache,
                                       slots.to(torch.int64), isa, 1.0, 1.0, "fp8_e4m3" if fp8 else "auto")

    return PagedCache(f"cpu_attn/{isa}", "CPU_ATTN", {f"model.layers.{i}.attn": b for i, b in enumerate(buffers)},
                      buffers, B, N, H, D, dtype, 2, write, input_dtype)


def hpu_kv(L, B, N, H, D, dtype, gen, device="cpu", padded: bool = False) -> PagedCache:
    """vllm-gaudi: per layer a TensorTuple-like (K, V), each [B, N, H, D]."""
    width = D + 8 if padded else D
    buffers = [_fill((B, N, H, width), dtype, gen, device) for _ in range(2 * L)]
    planes = [b[..., :D] for b in buffers]
    layers = {f"model.layers.{i}.self_attn": TensorTuple((planes[2 * i], planes[2 * i + 1])) for i in range(L)}

    def write(layer, slots, values):
        for plane in range(2):
            b, o = _block_offset(slots, N)
            planes[2 * layer + plane][b, o] = values[plane]

    return PagedCache("hpu_kv" + ("/strided" if padded else ""), None, layers, buffers, B, N, H, D, dtype, 2, write, dtype)


def mla(form: str, L, B, N, C, dtype, gen, device="cpu") -> PagedCache:
    """MLA: [B, 1, N, C] ("4d"), [B, N, C] ("3d"), a padded non-contiguous [B, 1, N, C]
    ("4d_strided"), or Gaudi's [B, N, 1, C] ("hpu4d") / [B, N, C] ("hpu3d")."""
    if form == "4d_strided":
        buffers = [_fill((B, 1, N, C + 16), dtype, gen, device) for _ in range(L)]
        views = [b[..., :C] for b in buffers]
    else:
        shape = {"4d": (B, 1, N, C), "3d": (B, N, C), "hpu4d": (B, N, 1, C), "hpu3d": (B, N, C)}[form]
        buffers = [_fill(shape, dtype, gen, device) for _ in range(L)]
        views = list(buffers)

    def write(layer, slots, values):
        view = views[layer]
        b, o = _block_offset(slots, N)
        if form in ("4d", "4d_strided"):
            view[b, 0, o] = values[0, :, 0]
        elif form == "hpu4d":
            view[b, o, 0] = values[0, :, 0]
        else:
            view[b, o] = values[0, :, 0]

    backend = "FLASH_ATTN_MLA" if form in ("4d", "4d_strided", "3d") else "CUSTOM"  # vllm-gaudi's name
    return PagedCache(f"mla/{form}", backend, {f"model.layers.{i}.attn": v for i, v in enumerate(views)},
                      buffers, B, N, 1, C, dtype, 1, write, dtype, use_mla=True)


def _block_offset(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) index tensors of each slot, for advanced indexing (host tensors)."""
    slots = slots.to("cpu", torch.int64)
    return slots // block_size, slots % block_size


# -- slot mappings ------------------------------------------------------------------
SLOT_PATTERNS = ("in_order", "shuffled_blocks", "random", "padded")


def slot_mapping(pattern: str, num_blocks: int, block_size: int, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """num_tokens slots (int64); "padded" has -1 entries mixed in (also at the start and end)."""
    total = num_blocks * block_size
    assert num_tokens <= total
    if pattern == "in_order":
        return torch.arange(num_tokens, dtype=torch.int64)
    if pattern == "shuffled_blocks":
        order = torch.randperm(num_blocks, generator=gen)
        return (order.view(-1, 1) * block_size + torch.arange(block_size)).reshape(-1)[:num_tokens].clone()
    slots = torch.randperm(total, generator=gen)[:num_tokens].to(torch.int64)
    if pattern == "padded":
        pad = torch.rand(num_tokens, generator=gen) < 0.25
        pad[0] = True
        pad[-1] = True
        slots[pad] = -1
    return slots


def chunk_bounds(num_tokens: int, chunk: int) -> tuple[list[int], list[int]]:
    starts = list(range(0, num_tokens, chunk))
    return starts, [min(s + chunk, num_tokens) for s in starts]
