"""Layerwise loads and saves (vLLM's GPU/CPU runners only: vllm-gaudi never calls the
per-layer hooks, runner.py).

Per step, `start_loads` opens one retrieve generator per request and every
`wait_for_layer_load` advances them all by one layer; the first `save_layer` opens one
store generator per saved request and every call advances them; `finish_saves` runs
their final steps.
"""

from __future__ import annotations

import torch

from lmcache.integration.vllm.metadata import ReqMeta


class Layerwise:
    def __init__(self, handle, counters, accounting):
        self._handle = handle
        self._counters = counters
        self._accounting = accounting
        self._retrievers: list = []
        self._storers: list = []

    def new_step(self) -> None:
        self._retrievers = []
        self._storers = []

    def start_loads(self, loads: list[ReqMeta]) -> None:
        handle = self._handle
        with handle.lock:
            for r in loads:
                plan = r.load
                gen = handle.engine.retrieve_layer(plan.tokens, _moved(plan), slot_mapping=plan.slot_mapping,
                                                   lease_id=plan.lease_id, key_material=plan.key_material)
                self._retrievers.append((r, gen))

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._retrievers:
            return
        layers = self._handle.layer_index
        last = layers.get(layer_name, 0) == len(layers) - 1
        with self._handle.lock:
            for _, gen in self._retrievers:
                next(gen)
        if last:
            self._finish_loads()

    def _finish_loads(self) -> None:
        loads, loaded = [], []
        with self._handle.lock:
            for r, gen in self._retrievers:
                result = next(gen, None)  # the final step synchronises and reports
                loads.append(r)
                loaded.append(_loaded_end(result))
        self._retrievers = []
        self._accounting.account(loads, loaded)

    def save_layer(self, layer_name: str, saves: list[ReqMeta]) -> None:
        handle = self._handle
        if not self._storers and handle.layer_index.get(layer_name, 0) == 0:
            with handle.lock:
                for r in saves:
                    plan = r.save
                    self._storers.append(
                        (r, handle.engine.store_layer(plan.tokens, _moved(plan), slot_mapping=plan.slot_mapping,
                                                      key_material=plan.key_material))
                    )
        with handle.lock:
            for _, gen in self._storers:
                next(gen)

    def finish_saves(self) -> None:
        with self._handle.lock:
            for _, gen in self._storers:
                stored = next(gen, 0)  # the final step: wait for the copies, hand chunks to the tiers
                self._counters.save_requests += 1
                self._counters.saved_tokens += int(stored or 0)
        self._storers = []


def _moved(plan) -> torch.Tensor:
    """The engine's layerwise mask: True for the tokens the plan moves (after skip_tokens)."""
    mask = torch.ones(plan.num_tokens, dtype=torch.bool)
    mask[: plan.skip_tokens] = False
    return mask


def _loaded_end(mask) -> int:
    """End of the loaded prefix from a layerwise retrieve's bool mask of loaded tokens."""
    if not isinstance(mask, torch.Tensor) or mask.numel() == 0:
        return 0
    where = mask.nonzero()
    return int(where.max()) + 1 if where.numel() else 0
