"""Layerwise transfers (CUDA and CPU, where vLLM calls wait_for_layer_load / save_kv_layer).

Store generator: the caller calls next() once after each layer has written its KV
(call i saves layer i), then once more: that call synchronizes, after which the
host objects are complete.

Load generator: after next() call i returns, layer i is in the paged cache (on
CUDA: the compute stream waits for it; layer i+1 is already being loaded on the
side stream while layer i computes). One more next() synchronizes.

On CPU there is no stream to overlap with: each next() moves its layer directly.
Gaudi is refused by the factory: vllm-gaudi never calls the per-layer hooks.
"""

from __future__ import annotations

from typing import Any, Generator, Sequence

import torch

from lmcache.v1.gpu_connector import LAYERWISE_ON_HPU
from lmcache.v1.gpu_connector.transfer_plan import BatchPlan, plan_batch
from lmcache.v1.gpu_connector.vllm_connector import VLLMPagedMemConnector, _apply_fixups


class VLLMPagedMemLayerwiseConnector(VLLMPagedMemConnector):
    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        if self.layout.device.type == "hpu":
            raise ValueError(LAYERWISE_ON_HPU)

    def batched_from_gpu_layerwise(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                                   slot_mapping: torch.Tensor, **kw: Any) -> Generator:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        return self._store_layers(plan)

    def batched_to_gpu_layerwise(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                                 slot_mapping: torch.Tensor, **kw: Any) -> Generator:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        return self._load_layers(plan)

    # -- store -------------------------------------------------------------------
    def _store_layers(self, plan: BatchPlan) -> Generator:
        fixups: list = []
        staging = None
        for layer in range(self.num_layers):
            if plan.parts:
                if self._on_cpu:
                    self._cpu.store_layer(plan, layer)
                else:
                    with self._side_stream():  # waits for the compute stream: layer `layer` is written
                        if staging is None:
                            staging = self._staging(1, plan.total)
                        self._gather_layer(plan, layer, staging[0])
                        for part in plan.parts:
                            self._staging_to_host(part, staging, layer, layer + 1, fixups)
            yield
        if plan.parts:
            self.platform.synchronize()
            _apply_fixups(fixups)
        yield

    # -- load --------------------------------------------------------------------
    def _load_layers(self, plan: BatchPlan) -> Generator:
        if not plan.parts:
            for _ in range(self.num_layers + 1):
                yield
            return
        if self._on_cpu:
            for layer in range(self.num_layers):
                self._cpu.load_layer(plan, layer)
                yield
            self.platform.synchronize()
            yield
            return
        ready: list = [None] * self.num_layers
        # the side stream first waits for the compute stream (the blocks to fill are ready);
        # its staging buffers belong to it
        with self._side_stream():
            buffers = [self._staging(1, plan.total), self._staging(1, plan.total)]

        def issue(layer: int) -> None:
            with self.platform.use_stream(self._stream):
                staging = buffers[layer % 2]
                for part in plan.parts:
                    self._host_to_staging(part, staging, layer, layer + 1)
                self._scatter_layer(plan, layer, staging[0])
                done = self.platform.event()
                done.record(self._stream)
                ready[layer] = done

        issue(0)
        compute = self.platform.current_stream()
        for layer in range(self.num_layers):
            if layer + 1 < self.num_layers:
                issue(layer + 1)
            ready[layer].wait(compute)
            yield
        self.platform.synchronize()
        yield
