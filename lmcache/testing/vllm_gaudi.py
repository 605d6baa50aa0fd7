"""What vllm-gaudi hands a KV connector, rebuilt from the facts in its source (test support).

vllm-gaudi cannot run without Intel's bridge, so tests and `bench connector` build its
caches here the way it allocates them (docs/gaudi.md, "Verified against vllm-gaudi"):

- per layer K and V separate, each a flat slot axis [(num_blocks + 1) * block_size, H, D]
  whose last block is a pad block; `register_kv_caches` gets views [num_blocks, block_size,
  H, D] with the pad block dropped (v0.19+) or kept (v0.17.1);
- wrapped in a `TensorTuple((K, V))` when exactly two tensors survive, else the first alone:
  MLA (one 3-D tensor [num_blocks, block_size, C]) and fp8 with dynamic scales, where the
  scale tensors make three and only K arrives;
- `TensorTuple.shape` is (2, num_blocks, block_size, H, D).

Also `random_steps`: slot mappings of varied request mixes, as vLLM's steps come.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class TensorTuple(tuple):
    """Test double of vllm-gaudi's TensorTuple: a tuple of tensors answering .shape (with the
    tuple's length first, as the real one), .device and .dtype."""

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self[0].shape))

    @property
    def device(self) -> torch.device:
        return self[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self[0].dtype


@dataclass
class GaudiCaches:
    kv_caches: dict               # layer name -> TensorTuple((K, V)) or one tensor, as registered
    buffers: list                 # the flat allocations behind them, pad block included
    num_blocks: int               # blocks the registered views expose
    block_size: int


def gaudi_kv_caches(num_layers: int, num_blocks: int, block_size: int, heads: int, head_size: int,
                    dtype: torch.dtype, device="hpu", *, kind: str = "kv", pad_block_dropped: bool = True,
                    gen: torch.Generator | None = None) -> GaudiCaches:
    """kind "kv" (K, V), "mla" (one 3-D tensor, head_size = C), or "fp8_dynamic" (only K survives:
    what vllm-gaudi registers with VLLM_DYNAMIC_KV_QUANT / QUANT_CONFIG dynamic scales)."""
    if kind not in ("kv", "mla", "fp8_dynamic"):
        raise ValueError(f"kind must be kv, mla or fp8_dynamic, got {kind!r}")
    gen = gen or torch.Generator().manual_seed(0)
    slots = (num_blocks + 1) * block_size
    visible = num_blocks if pad_block_dropped else num_blocks + 1
    shape = (slots, head_size) if kind == "mla" else (slots, heads, head_size)

    def alloc() -> torch.Tensor:
        if dtype.itemsize == 1 and dtype.is_floating_point:
            raw = torch.randint(0, 0x7E, shape, generator=gen, dtype=torch.uint8)
            return raw.view(dtype).to(device)
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(device)

    def registered(flat: torch.Tensor) -> torch.Tensor:
        return flat.view(num_blocks + 1, block_size, *flat.shape[1:])[:visible]

    buffers, layers = [], {}
    for i in range(num_layers):
        name = f"model.layers.{i}.self_attn.attn"
        if kind == "kv":
            k, v = alloc(), alloc()
            buffers += [k, v]
            layers[name] = TensorTuple((registered(k), registered(v)))
        else:  # mla: the latent cache; fp8_dynamic: K (V and the scales do not arrive)
            k = alloc()
            buffers.append(k)
            layers[name] = registered(k)
    return GaudiCaches(layers, buffers, visible, block_size)


def random_steps(num_steps: int, num_blocks: int, block_size: int, gen: torch.Generator, *,
                 chunk: int = 256, max_requests: int = 6, max_tokens: int = 1000):
    """Per step (slot_mapping, starts, ends): 1..max_requests requests of 1..max_tokens tokens
    each on blocks of their own, cut into `chunk`-token objects; some requests start with a
    prefix vLLM already holds (slots -1), as the adapter passes them."""
    for _ in range(num_steps):
        count = int(torch.randint(1, max_requests + 1, (1,), generator=gen))
        lengths = torch.randint(1, max_tokens + 1, (count,), generator=gen).tolist()
        needed = sum(-(-n // block_size) for n in lengths)
        if needed > num_blocks:
            raise ValueError(f"{needed} blocks needed, the cache has {num_blocks}")
        order = torch.randperm(num_blocks, generator=gen)[:needed]
        pieces, starts, ends, offset, used = [], [], [], 0, 0
        for n in lengths:
            blocks = order[used: used + -(-n // block_size)]
            used += blocks.numel()
            slots = (blocks.view(-1, 1) * block_size + torch.arange(block_size)).reshape(-1)[:n].clone()
            if torch.rand(1, generator=gen) < 0.3:
                slots[: int(torch.randint(0, n, (1,), generator=gen))] = -1
            pieces.append(slots)
            for first in range(0, n, chunk):
                starts.append(offset + first)
                ends.append(offset + min(first + chunk, n))
            offset += n
        yield torch.cat(pieces), starts, ends
