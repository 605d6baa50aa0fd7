"""Batched HPU transfers in a bounded set of shapes (see buckets.py for why).

Every device op of a batch has a shape fixed by its bucket, never by the batch:

  store  flush(); per layer group: per layer and plane ONE index_select of
         `bucket` tokens' rows into the bucket's device staging [G, P, bucket,
         hidden], then ONE device->host copy of the whole staging into the
         bucket's host staging [L, P, bucket, hidden]; one synchronize; then,
         on the host, each object's tokens out of the host staging. The slot
         list is padded with the last real slot: its extra rows are gathered
         and dropped on the host.
  load   on the host, each object's tokens into the host staging and the pad
         tokens as copies of the last real token; per layer group ONE
         host->device copy into the device staging, then per layer and plane ONE
         index_copy_ of `bucket` tokens' rows; flush(); one synchronize. The pad
         entries repeat the last real (row, value) pair, so whichever write of
         that row lands last, the row gets its real value: padding never writes
         a wrong byte, nor any row a real token does not write anyway.

The layer group G is the largest divisor of the layer count whose staging fits
`staging_bytes` (so every group has the same shape). Row numbers are computed on
the host and copied into a per-bucket device index (same shape every step).
Device staging and index buffers are made once per bucket and reused: the
staging of all buckets are views of one `staging_bytes` device allocation (a
bucket one layer of which is larger gets its own). The host staging [L, P,
bucket, hidden] is a view of one host buffer, grown to the largest bucket used.

fp8 caches (e4m3 / e5m2) move as uint8 views end to end (bit-exact; the bridge's
index kernels need not know fp8); other dtypes in their own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

import torch

from lmcache.v1.gpu_connector import LAYERWISE_ON_HPU
from lmcache.v1.gpu_connector.hpu.buckets import SlotBuckets
from lmcache.v1.gpu_connector.layouts import KVLayout
from lmcache.v1.gpu_connector.transfer_plan import BatchPlan, plan_batch, raw_view


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def as_moved(t: torch.Tensor) -> torch.Tensor:
    """How HPU moves a tensor: fp8 as uint8 bytes, every other dtype as itself."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def pad_rows(rows: torch.Tensor, total: int) -> None:
    """Token rows [bucket, rows_per_token] past `total`: the last real token's rows."""
    if total < rows.shape[0]:
        rows[total:] = rows[total - 1]


def pad_tokens(staged: torch.Tensor, total: int) -> None:
    """Host staging [L, P, bucket, hidden] past `total` tokens: the last real token's values (so a
    padded scatter writes that token's row with that token's value again)."""
    if total < staged.shape[2]:
        staged[:, :, total:].copy_(staged[:, :, total - 1: total].expand_as(staged[:, :, total:]))


@dataclass
class _Bucket:
    """Everything of one bucket size, made once."""

    size: int
    group: int                                  # layers per device staging
    device: torch.Tensor                        # [G, P, size, hidden]
    out_views: list                             # [G][P] -> [size * rows_per_token, width] views of `device`
    indices: dict = field(default_factory=dict)  # id(plane) -> (host, device) rows [size * rows_per_token]


class HpuTransfers:
    """Static-shape batched store / load for one registered HPU layout (Gaudi's `Transfers`,
    see transfers.py; no layer generators: vllm-gaudi never calls the per-layer hooks)."""

    host_format_tag = ""

    def __init__(self, layout: KVLayout, platform, staging_bytes: int, buckets: SlotBuckets):
        self.layout = layout
        self.platform = platform
        self.staging_bytes = int(staging_bytes)
        self.buckets = buckets
        self.tables = [[plane.table(as_moved(t)) for plane, t in zip(layout.planes, tensors)]
                       for tensors in layout.plane_tensors]
        self.moved_dtype = self.tables[0][0].dtype
        self._by_size: dict[int, _Bucket] = {}
        self._device_flat: torch.Tensor | None = None   # shared by every bucket's device staging
        self._host_flat: torch.Tensor | None = None     # and host staging

    @property
    def sizes_made(self) -> list[int]:
        """The bucket sizes that have buffers (one compile per op and size on a Gaudi)."""
        return sorted(self._by_size)

    # -- batches ------------------------------------------------------------------
    def store(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
              slot_mapping: torch.Tensor) -> None:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        if plan.parts:
            self._store(plan)

    def load(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
             slot_mapping: torch.Tensor) -> None:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        if plan.parts:
            self._load(plan)

    def store_layers(self, *args: Any) -> Generator:
        raise ValueError(LAYERWISE_ON_HPU)

    def load_layers(self, *args: Any) -> Generator:
        raise ValueError(LAYERWISE_ON_HPU)

    def _store(self, plan: BatchPlan) -> None:
        bucket = self._bucket(plan.total)
        staging, host_groups = self._host_staging(bucket)
        rows = self._rows(plan, bucket)
        self.platform.flush()
        layout = self.layout
        for index, host in enumerate(host_groups):
            first = index * bucket.group
            for g in range(bucket.group):
                for p in range(layout.num_planes):
                    torch.index_select(self.tables[first + g][p], 0, rows[p], out=bucket.out_views[g][p])
            host.copy_(bucket.device, non_blocking=True)
        self.platform.synchronize()
        staged = raw_view(staging)
        for part in plan.parts:
            src = staged[:, :, part.first: part.first + part.count].transpose(0, 1)
            dst = raw_view(part.tensor)
            if part.positions is None:
                dst[:, :, : part.count].copy_(src)
            else:
                dst.index_copy_(2, part.positions, src)

    def _load(self, plan: BatchPlan) -> None:
        bucket = self._bucket(plan.total)
        staging, host_groups = self._host_staging(bucket)
        staged = raw_view(staging)
        for part in plan.parts:
            src = raw_view(part.tensor)
            src = src[:, :, : part.count] if part.positions is None else src.index_select(2, part.positions)
            staged[:, :, part.first: part.first + part.count].copy_(src.transpose(0, 1))
        pad_tokens(staged, plan.total)
        rows = self._rows(plan, bucket)
        layout = self.layout
        for index, host in enumerate(host_groups):
            first = index * bucket.group
            bucket.device.copy_(host, non_blocking=True)
            for g in range(bucket.group):
                for p in range(layout.num_planes):
                    self.tables[first + g][p].index_copy_(0, rows[p], bucket.out_views[g][p])
        self.platform.flush()
        self.platform.synchronize()

    # -- buffers --------------------------------------------------------------------
    def _rows(self, plan: BatchPlan, bucket: _Bucket) -> list[torch.Tensor]:
        """Per plane, the device row numbers of the batch padded to the bucket with the last real
        token's rows (computed on the host; planes that share addressing share them)."""
        total = plan.total
        done: dict[int, torch.Tensor] = {}
        out = []
        for plane in self.layout.planes:
            key = id(plane)
            if key not in done:
                pair = bucket.indices.get(key)
                if pair is None:
                    count = bucket.size * plane.rows_per_token
                    pair = bucket.indices[key] = (
                        torch.empty(count, dtype=torch.int64),
                        torch.empty(count, dtype=torch.int64, device=self.layout.device),
                    )
                host, device = pair
                rows = host.view(bucket.size, plane.rows_per_token)
                rows[:total] = plane.rows_for(plan.slots)
                pad_rows(rows, total)
                device.copy_(host)
                done[key] = device
            out.append(done[key])
        return out

    def _bucket(self, total: int) -> _Bucket:
        size = self.buckets.size_for(total)
        found = self._by_size.get(size)
        if found is None:
            found = self._make_bucket(size)
            self._by_size[size] = found
        return found

    def _make_bucket(self, size: int) -> _Bucket:
        layout = self.layout
        planes, hidden, dtype = layout.num_planes, layout.hidden, self.moved_dtype
        per_layer = planes * size * hidden * dtype.itemsize
        group = max(g for g in range(1, layout.num_layers + 1)
                    if layout.num_layers % g == 0 and (g == 1 or g * per_layer <= self.staging_bytes))
        need = group * per_layer
        if need <= self.staging_bytes:
            if self._device_flat is None:
                self._device_flat = torch.empty(self.staging_bytes, dtype=torch.uint8, device=layout.device)
            flat = self._device_flat[:need]
        else:  # one layer of this bucket is more than staging_bytes: a staging of its own
            flat = torch.empty(need, dtype=torch.uint8, device=layout.device)
        device = flat.view(dtype).view(group, planes, size, hidden)
        out_views = [[device[g, p].view(-1, plane.width) for p, plane in enumerate(layout.planes)]
                     for g in range(group)]
        return _Bucket(size, group, device, out_views)

    def _host_staging(self, bucket: _Bucket) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[L, P, bucket, hidden] host staging and its layer groups: views of one host buffer that
        grows to the largest bucket used (host views are not device work)."""
        layout = self.layout
        shape = (layout.num_layers, layout.num_planes, bucket.size, layout.hidden)
        need = layout.num_layers * bucket.device[0].numel() * self.moved_dtype.itemsize
        if self._host_flat is None or self._host_flat.numel() < need:
            self._host_flat = None
            self._host_flat = self.platform.empty_host((need,), torch.uint8)
        host = self._host_flat[:need].view(self.moved_dtype).view(shape)
        return host, [host[first: first + bucket.group] for first in range(0, layout.num_layers, bucket.group)]
