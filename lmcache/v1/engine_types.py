"""The values the engine is described and driven with: `LMCacheEngineMetadata` (what
the model's KV looks like) and `TransferSpec` (one request's store or load).
Re-exported by lmcache.v1.cache_engine, where upstream users import them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lmcache.v1.memory import MemoryFormat


@dataclass
class LMCacheEngineMetadata:
    model_name: str
    world_size: int
    worker_id: int
    kv_dtype: torch.dtype
    kv_shape: tuple  # (num_layers, 2 or 1, chunk_size, num_kv_heads, head_size)
    use_mla: bool = False
    layout_fingerprint: str = ""
    # what changes KV besides the model name (revision, weights, quantization, ...): a
    # digest from the integration (integration/vllm/model_identity.py); part of every key
    model_identity: str = ""

    @property
    def memory_format(self) -> MemoryFormat:
        return MemoryFormat.KV_MLA_FMT if self.use_mla else MemoryFormat.KV_2LTD

    def memory_shape(self, num_tokens: int) -> torch.Size:
        """Shape of a memory object for `num_tokens` tokens, as a connector must give it."""
        num_layers, _, _, num_heads, head_size = self.kv_shape
        if self.use_mla:
            return torch.Size((1, num_layers, num_tokens, head_size))
        return torch.Size((2, num_layers, num_tokens, num_heads * head_size))


@dataclass
class TransferSpec:
    tokens: torch.Tensor | list[int]  # token ids from position 0
    slot_mapping: torch.Tensor  # one slot per token of `tokens` (position 0 on)
    skip_tokens: int = 0  # chunk-aligned prefix vLLM already holds: not moved
    num_tokens: int | None = None  # how many of `tokens` to move (default all)
    lease_id: str | None = None  # the lookup lease this load uses (ended once the load is planned)
    key_material: Sequence[bytes | None] | None = None  # per chunk, besides the tokens (token_database)
