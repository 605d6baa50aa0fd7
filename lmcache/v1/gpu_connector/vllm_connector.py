"""The batched paged connector: vLLM's paged KV cache <-> host memory objects.

One implementation for CUDA, Gaudi HPU and CPU; device specifics come only
from the Platform and from each device's own fast paths:

  CPU     cpu/ (CpuTransfers): the memory objects are the destination, no
          staging; whole blocks as memcpys of runs, vLLM's CPU attention tiles
          by compiled loops, native blocks (see cpu/__init__.py).
  HPU     hpu/ (HpuTransfers): as below, but every device op in one shape per
          bucket size (slot lists padded; config hpu_slot_buckets), staging
          made once per bucket.
  device  Store: flush() (HPU lazy mode: run the graph that wrote the KV), then
          per layer and plane ONE index_select over the concatenated slots of
          all objects into a device staging buffer [layers, planes, tokens,
          hidden] (sized by `staging_bytes`, several layers at a time), then
          non_blocking device->host copies of each object's slice into its
          (pinned) host tensor; on CUDA all of it on a side stream that waits
          for the compute stream. One synchronize at the end.
          Load: the mirror image; per layer and plane ONE index_copy_, then
          flush() once (HPU lazy mode) and one synchronize.

Bytes are moved through integer views of the same width (bit-exact, and fp8
works where the index kernels lack fp8), except on HPU, whose bridge kernels
get the native dtype (fp8 there moves as uint8 too).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import torch

from lmcache.platforms import Platform
from lmcache.v1.gpu_connector import GPUConnectorInterface
from lmcache.v1.gpu_connector.hpu import HpuTransfers, slot_buckets as slot_buckets_for
from lmcache.v1.gpu_connector.hpu.static_transfers import as_moved as hpu_as_moved
from lmcache.v1.gpu_connector.layouts import KVLayout
from lmcache.v1.gpu_connector.transfer_plan import BatchPlan, ObjectPart, plan_batch, raw_view
from lmcache.v1.memory import MemoryFormat

logger = logging.getLogger(__name__)

DEFAULT_STAGING_BYTES = 256 << 20

class VLLMPagedMemConnector(GPUConnectorInterface):
    """Batched connector for every supported layout (see layouts.py) and device."""

    def __init__(self, layout: KVLayout, platform: Platform, staging_bytes: int = DEFAULT_STAGING_BYTES,
                 native_blocks: bool = False, slot_buckets: Any = "auto"):
        self.layout = layout
        self.platform = platform
        self.staging_bytes = int(staging_bytes)
        self._on_cpu = layout.device.type == "cpu"
        on_hpu = layout.device.type == "hpu"
        # HPU kernels get native dtypes (fp8: bytes); elsewhere integer views keep every bit and allow fp8.
        self._as_moved = hpu_as_moved if on_hpu else raw_view
        self._tables = [
            [plane.table(self._as_moved(t)) for plane, t in zip(layout.planes, tensors)]
            for tensors in layout.plane_tensors
        ]
        self._stream = None
        # the CPU device's own paths (cpu/); native_blocks only exist there
        self._cpu = None
        if self._on_cpu:
            from lmcache.v1.gpu_connector.cpu import CpuTransfers

            self._cpu = CpuTransfers(layout, native_blocks=native_blocks)
        # the HPU device's own paths (hpu/): every device op in one shape per bucket size
        self._hpu = None
        buckets = slot_buckets_for(slot_buckets)  # checked everywhere, used on HPU
        if on_hpu and buckets is not None:
            self._hpu = HpuTransfers(layout, platform, self.staging_bytes, buckets)

    # -- what the engine asks -------------------------------------------------
    @property
    def memory_format(self) -> MemoryFormat:
        return self.layout.memory_format

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def layout_fingerprint(self) -> str:
        return self.layout.fingerprint

    @property
    def host_format_tag(self) -> str:
        """What the memory objects' bytes depend on beyond model, dtype and shape: "" for the
        portable per-token format, else the native block tiling (it goes into the cache keys)."""
        return self._cpu.host_format_tag if self._cpu is not None else ""

    @property
    def hidden_size(self) -> int:
        return self.layout.hidden

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size((self.layout.num_planes, self.layout.num_layers, int(num_tokens), self.layout.hidden))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layout.describe()})"

    # -- single object ----------------------------------------------------------
    def from_gpu(self, memory_obj: Any, start: int, end: int, *, slot_mapping: torch.Tensor, **kw: Any) -> None:
        self.batched_from_gpu([memory_obj], [start], [end], slot_mapping=slot_mapping, **kw)

    def to_gpu(self, memory_obj: Any, start: int, end: int, *, slot_mapping: torch.Tensor, **kw: Any) -> None:
        self.batched_to_gpu([memory_obj], [start], [end], slot_mapping=slot_mapping, **kw)

    # -- batches ------------------------------------------------------------------
    def batched_from_gpu(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                         slot_mapping: torch.Tensor, **kw: Any) -> None:
        if self._cpu is not None:
            self._cpu.store(memory_objs, starts, ends, slot_mapping)
            self.platform.synchronize()
            return
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        if not plan.parts:
            return
        if self._hpu is not None:
            self._hpu.store(plan)
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

    def batched_to_gpu(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                       slot_mapping: torch.Tensor, **kw: Any) -> None:
        if self._cpu is not None:
            self._cpu.load(memory_objs, starts, ends, slot_mapping)
            self.platform.synchronize()
            return
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        if not plan.parts:
            return
        if self._hpu is not None:
            self._hpu.load(plan)
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

    # -- devices: one gather / scatter per layer and plane through staging ----------
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
        per_layer = self.layout.num_planes * total * self.layout.hidden * self.layout.dtype.itemsize
        group = max(1, min(self.num_layers, self.staging_bytes // max(1, per_layer)))
        return [(first, min(first + group, self.num_layers)) for first in range(0, self.num_layers, group)]

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
