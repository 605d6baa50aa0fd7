"""Layerwise loads and saves (CUDA/CPU only: vllm-gaudi never calls the per-layer hooks).

A mixin of the worker half of `LMCacheConnectorV1Impl`. Per step, `start_load_kv`
opens one retrieve generator per request and every `wait_for_layer_load` advances them
all by one layer; the first `save_kv_layer` opens one store generator per saved request
and every call advances them; `wait_for_save` runs their final steps.
"""

from __future__ import annotations

import torch

from lmcache.integration.vllm.request_tracker import ReqMeta


class WorkerLayerwise:
    def _init_layerwise(self) -> None:
        self._layer_index: dict[str, int] = {}
        self._layer_retrievers: list = []
        self._layer_storers: list = []

    def _reset_layerwise_step(self) -> None:
        self._layer_retrievers = []
        self._layer_storers = []

    def _start_layerwise_loads(self, loads: list[ReqMeta]) -> None:
        with self._engine_lock:
            for r in loads:
                plan = r.load
                mask = torch.ones(plan.num_tokens, dtype=torch.bool)
                mask[: plan.skip_tokens] = False
                gen = self.engine.retrieve_layer(plan.token_ids, mask, slot_mapping=plan.slot_mapping,
                                                 lease_id=r.lease_id, key_material=plan.key_material)
                self._layer_retrievers.append((r, gen))

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._layer_retrievers:
            return
        index = self._layer_index.get(layer_name, 0)
        last = index == len(self._layer_index) - 1
        with self._engine_lock:
            for _, gen in self._layer_retrievers:
                next(gen)
        if last:
            self._finish_layerwise_loads()

    def _finish_layerwise_loads(self) -> None:
        loads, loaded = [], []
        with self._engine_lock:
            for r, gen in self._layer_retrievers:
                result = next(gen, None)  # the final step synchronises and reports
                loads.append(r)
                loaded.append(_loaded_end(result))
        self._layer_retrievers = []
        self._account_loads(loads, loaded)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        if not self.use_layerwise or self.engine is None:
            return
        md = self._bound()
        if md is None:
            return
        if not self._layer_storers and self._layer_index.get(layer_name, 0) == 0:
            with self._engine_lock:
                for r in md.saves:
                    plan = r.save
                    mask = torch.ones(plan.num_tokens, dtype=torch.bool)
                    mask[: plan.skip_tokens] = False
                    self._layer_storers.append(
                        (r, self.engine.store_layer(plan.token_ids, mask, slot_mapping=plan.slot_mapping,
                                                    key_material=plan.key_material))
                    )
        with self._engine_lock:
            for _, gen in self._layer_storers:
                next(gen)

    def _finish_layerwise_saves(self) -> None:
        with self._engine_lock:
            for _, gen in self._layer_storers:
                stored = next(gen, 0)  # the final step: wait for the copies, hand chunks to the tiers
                self.counters.save_requests += 1
                self.counters.saved_tokens += int(stored or 0)
        self._layer_storers = []


def _loaded_end(mask) -> int:
    """End of the loaded prefix from a layerwise retrieve's bool mask of loaded tokens."""
    if not isinstance(mask, torch.Tensor) or mask.numel() == 0:
        return 0
    where = mask.nonzero()
    return int(where.max()) + 1 if where.numel() else 0
