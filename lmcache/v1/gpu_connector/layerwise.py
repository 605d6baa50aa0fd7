"""The layerwise connector (CUDA and CPU, where vLLM calls wait_for_layer_load / save_kv_layer).

Store generator: the caller calls next() once after each layer has written its KV
(call i saves layer i), then once more: that call synchronizes, after which the
host objects are complete.

Load generator: after next() call i returns, layer i is in the paged cache (on
CUDA: the compute stream waits for it; layer i+1 is already being loaded on the
side stream while layer i computes). One more next() synchronizes.

The device's `Transfers` (transfers.py) does the moving. Gaudi is refused: vllm-gaudi
never calls the per-layer hooks.
"""

from __future__ import annotations

from typing import Any, Generator, Sequence

import torch

from lmcache.v1.gpu_connector import LAYERWISE_ON_HPU
from lmcache.v1.gpu_connector.vllm_connector import VLLMPagedMemConnector


class VLLMPagedMemLayerwiseConnector(VLLMPagedMemConnector):
    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        if self.layout.device.type == "hpu":
            raise ValueError(LAYERWISE_ON_HPU)

    def batched_from_gpu_layerwise(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                                   slot_mapping: torch.Tensor, **kw: Any) -> Generator:
        return self.transfers.store_layers(memory_objs, starts, ends, slot_mapping)

    def batched_to_gpu_layerwise(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                                 slot_mapping: torch.Tensor, **kw: Any) -> Generator:
        return self.transfers.load_layers(memory_objs, starts, ends, slot_mapping)
