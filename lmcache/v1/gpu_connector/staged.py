"""The staged device path: CUDA, and Gaudi with slot buckets turned off.

  store  flush() (HPU lazy mode: run the graph that wrote the KV), then per layer and
         plane ONE index_select over the concatenated slots of all objects into a
         device staging buffer [layers, planes, tokens, hidden] (sized by
         `staging_bytes`, several layers at a time), then non_blocking device->host
         copies of each object's slice into its (pinned) host tensor; on CUDA all of it
         on a side stream that waits for the compute stream. One synchronize at the end.
  load   the mirror image; per layer and plane ONE index_copy_, then flush() once (HPU
         lazy mode) and one synchronize.

Per layer (the layerwise connector, CUDA only): a store moves each layer through a
one-layer staging on the side stream as soon as it is computed; a load issues layer
i+1 on the side stream while layer i computes, two staging buffers in turn.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Generator, Sequence

import torch

from lmcache.platforms import Platform
from lmcache.v1.gpu_connector.layouts import KVLayout
from lmcache.v1.gpu_connector.transfer_plan import BatchPlan, ObjectPart, plan_batch, raw_view


class StagedTransfers:
    host_format_tag = ""

    def __init__(self, layout: KVLayout, platform: Platform, staging_bytes: int,
                 as_moved: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.layout = layout
        self.platform = platform
        self.staging_bytes = int(staging_bytes)
        self._as_moved = as_moved = as_moved or raw_view
        self._tables = [[plane.table(as_moved(t)) for plane, t in zip(layout.planes, tensors)]
                        for tensors in layout.plane_tensors]
        self._stream = None

    # -- batches ------------------------------------------------------------------
    def store(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
              slot_mapping: torch.Tensor) -> None:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        if not plan.parts:
            return
        self.platform.flush()
        fixups: list = []
        with self._side_stream():
            for first, last in self._layer_groups(plan.total):
                staging = self._staging(last - first, plan.total)
                for layer in range(first, last):
                    self._gather_layer(plan, layer, staging[layer - first])
                for part in plan.parts:
                    self._staging_to_host(part, staging, first, last, fixups)
        self.platform.synchronize()
        _apply_fixups(fixups)

    def load(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
             slot_mapping: torch.Tensor) -> None:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        if not plan.parts:
            return
        with self._side_stream():
            for first, last in self._layer_groups(plan.total):
                staging = self._staging(last - first, plan.total)
                for part in plan.parts:
                    self._host_to_staging(part, staging, first, last)
                for layer in range(first, last):
                    self._scatter_layer(plan, layer, staging[layer - first])
        self.platform.flush()
        self.platform.synchronize()

    # -- per layer ------------------------------------------------------------------
    def store_layers(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
                     slot_mapping: torch.Tensor) -> Generator:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        fixups: list = []
        staging = None
        for layer in range(self.layout.num_layers):
            if plan.parts:
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

    def load_layers(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
                    slot_mapping: torch.Tensor) -> Generator:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        num_layers = self.layout.num_layers
        if not plan.parts:
            for _ in range(num_layers + 1):
                yield
            return
        ready: list = [None] * num_layers
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
        for layer in range(num_layers):
            if layer + 1 < num_layers:
                issue(layer + 1)
            ready[layer].wait(compute)
            yield
        self.platform.synchronize()
        yield

    # -- one gather / scatter per layer and plane through staging ----------------------
    def _gather_layer(self, plan: BatchPlan, layer: int, out: torch.Tensor) -> None:
        for plane_index, (plane, table) in enumerate(zip(self.layout.planes, self._tables[layer])):
            rows = plan.rows(plane_index, self.layout.device).reshape(-1)
            torch.index_select(table, 0, rows, out=out[plane_index].view(-1, plane.width))

    def _scatter_layer(self, plan: BatchPlan, layer: int, src: torch.Tensor) -> None:
        for plane_index, (plane, table) in enumerate(zip(self.layout.planes, self._tables[layer])):
            rows = plan.rows(plane_index, self.layout.device).reshape(-1)
            table.index_copy_(0, rows, src[plane_index].view(-1, plane.width))

    def _staging_to_host(self, part: ObjectPart, staging: torch.Tensor, first: int, last: int, fixups: list) -> None:
        host = self._as_moved(part.tensor)
        for plane_index in range(self.layout.num_planes):
            src = staging[:, plane_index, part.first: part.first + part.count]
            if part.positions is None:
                host[plane_index, first:last, : part.count].copy_(src, non_blocking=True)
            else:
                temp = self.platform.empty_host(tuple(src.shape), src.dtype)
                temp.copy_(src, non_blocking=True)
                fixups.append((host[plane_index, first:last], part.positions, temp))

    def _host_to_staging(self, part: ObjectPart, staging: torch.Tensor, first: int, last: int) -> None:
        host = self._as_moved(part.tensor)
        for plane_index in range(self.layout.num_planes):
            src = host[plane_index, first:last]
            src = src[:, : part.count] if part.positions is None else src.index_select(1, part.positions)
            staging[:, plane_index, part.first: part.first + part.count].copy_(src, non_blocking=True)

    def _layer_groups(self, total: int) -> list[tuple[int, int]]:
        layout = self.layout
        per_layer = layout.num_planes * total * layout.hidden * layout.dtype.itemsize
        group = max(1, min(layout.num_layers, self.staging_bytes // max(1, per_layer)))
        return [(first, min(first + group, layout.num_layers)) for first in range(0, layout.num_layers, group)]

    def _staging(self, layers: int, total: int) -> torch.Tensor:
        dtype = self._tables[0][0].dtype
        return torch.empty((layers, self.layout.num_planes, total, self.layout.hidden), dtype=dtype,
                           device=self.layout.device)

    def _side_stream(self):
        """Run on a side stream that first waits for the compute stream (CUDA); plain elsewhere.

        HPU stays on its default stream: in lazy mode the copies belong to the graph
        that flush() ends, which is how vllm-gaudi orders its own work."""
        if self.layout.device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = self.platform.stream()
        ready = self.platform.event()
        ready.record(self.platform.current_stream())
        self._stream.wait_event(ready)
        return self.platform.use_stream(self._stream)


def _apply_fixups(fixups: list) -> None:
    """Objects with padding: scatter their valid tokens into place once the copies are done."""
    for host_layers, positions, temp in fixups:
        raw_view(host_layers).index_copy_(1, positions, raw_view(temp))
