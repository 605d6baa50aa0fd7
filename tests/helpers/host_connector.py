"""A GPU connector for tests: the "paged cache" is a host tensor.

It honours the connector contract (docs/architecture.md) with the simplest
possible layout, [num_slots, planes, num_layers, hidden]: memory object i
receives/provides the tokens whose slots are slot_mapping[starts[i]:ends[i]],
slots < 0 are padding and never touched. Data moves through same-width integer
views, so every bit pattern (NaN payloads, fp8) survives unchanged.
"""

from __future__ import annotations

from collections import Counter

import torch

from lmcache.v1.memory import MemoryFormat

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor reinterpreted as integers of the same width (for exact compares)."""
    return t.view(_INT_VIEW[t.element_size()])


def random_fill(t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = bits(t)
    raw.copy_(torch.randint(-(2**15), 2**15, raw.shape, generator=gen).to(raw.dtype))
    return t


class HostPagedConnector:
    def __init__(self, num_slots: int, num_layers: int, num_heads: int, head_size: int,
                 dtype: torch.dtype = torch.bfloat16, use_mla: bool = False):
        self.memory_format = MemoryFormat.KV_MLA_FMT if use_mla else MemoryFormat.KV_2LTD
        self.kv_dtype = dtype
        self.num_layers = num_layers
        self.layout_fingerprint = "host-test"
        self.planes = 1 if use_mla else 2
        self.hidden = head_size if use_mla else num_heads * head_size
        self.cache = torch.zeros(num_slots, self.planes, num_layers, self.hidden, dtype=dtype)
        self.calls = Counter()

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size((self.planes, self.num_layers, num_tokens, self.hidden))

    @staticmethod
    def _pieces(memory_objs, starts, ends, slot_mapping):
        slot_mapping = torch.as_tensor(slot_mapping).reshape(-1).long()
        for obj, start, end in zip(memory_objs, starts, ends):
            slots = slot_mapping[start:end]
            assert obj.num_tokens >= end - start, "memory object too small for its range"
            valid = slots >= 0
            yield obj, torch.nonzero(valid).reshape(-1), slots[valid]

    def _gather(self, obj, positions, slots, layers=slice(None)):
        # cache[slots] is [n, planes, L, hidden]; the object wants [planes, L, n, hidden]
        bits(obj.tensor)[:, layers, positions, :] = bits(self.cache)[slots][:, :, layers].permute(1, 2, 0, 3)

    def _scatter(self, obj, positions, slots, layers=slice(None)):
        src = bits(obj.tensor)[:, layers][:, :, positions].permute(2, 0, 1, 3).contiguous()
        bits(self.cache)[:, :, layers].index_copy_(0, slots, src)

    def from_gpu(self, memory_obj, start, end, *, slot_mapping, **kw):
        self.batched_from_gpu([memory_obj], [start], [end], slot_mapping=slot_mapping)

    def to_gpu(self, memory_obj, start, end, *, slot_mapping, **kw):
        self.batched_to_gpu([memory_obj], [start], [end], slot_mapping=slot_mapping)

    def batched_from_gpu(self, memory_objs, starts, ends, *, slot_mapping, **kw):
        self.calls["batched_from_gpu"] += 1
        for obj, positions, slots in self._pieces(memory_objs, starts, ends, slot_mapping):
            self._gather(obj, positions, slots)

    def batched_to_gpu(self, memory_objs, starts, ends, *, slot_mapping, **kw):
        self.calls["batched_to_gpu"] += 1
        for obj, positions, slots in self._pieces(memory_objs, starts, ends, slot_mapping):
            self._scatter(obj, positions, slots)

    def batched_from_gpu_layerwise(self, memory_objs, starts, ends, *, slot_mapping, **kw):
        self.calls["from_layerwise"] += 1
        pieces = list(self._pieces(memory_objs, starts, ends, slot_mapping))
        for layer in range(self.num_layers):
            for obj, positions, slots in pieces:
                self._gather(obj, positions, slots, slice(layer, layer + 1))
            self.calls["from_layer"] += 1
            yield
        self.calls["from_layerwise_sync"] += 1

    def batched_to_gpu_layerwise(self, memory_objs, starts, ends, *, slot_mapping, **kw):
        self.calls["to_layerwise"] += 1
        pieces = list(self._pieces(memory_objs, starts, ends, slot_mapping))
        for layer in range(self.num_layers):
            for obj, positions, slots in pieces:
                self._scatter(obj, positions, slots, slice(layer, layer + 1))
            self.calls["to_layer"] += 1
            yield
        self.calls["to_layerwise_sync"] += 1
