"""The batched paged connector: vLLM's paged KV cache <-> host memory objects.

One implementation for CUDA, Gaudi HPU and CPU. It picks the device's `Transfers`
(transfers.py) once, from where vLLM's KV cache lives, and hands it every batch:

  CPU     cpu/ (CpuTransfers): the memory objects are the destination, no staging;
          whole blocks as memcpys of runs, vLLM's CPU attention tiles by compiled
          loops, native blocks (see cpu/__init__.py).
  HPU     hpu/ (HpuTransfers): every device op in one shape per bucket size (slot
          lists padded; config hpu_slot_buckets), staging made once per bucket.
  device  staged.py (StagedTransfers): CUDA, and HPU with buckets off; one gather or
          scatter per layer and plane through a device staging buffer, one synchronize.

Bytes are moved through integer views of the same width (bit-exact, and fp8
works where the index kernels lack fp8), except on HPU, whose bridge kernels
get the native dtype (fp8 there moves as uint8 too).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lmcache.platforms import Platform
from lmcache.v1.gpu_connector import GPUConnectorInterface
from lmcache.v1.gpu_connector.hpu import HpuTransfers, slot_buckets as slot_buckets_for
from lmcache.v1.gpu_connector.hpu.static_transfers import as_moved as hpu_as_moved
from lmcache.v1.gpu_connector.layouts import KVLayout
from lmcache.v1.gpu_connector.staged import StagedTransfers
from lmcache.v1.gpu_connector.transfers import Transfers
from lmcache.v1.memory import MemoryFormat

DEFAULT_STAGING_BYTES = 256 << 20


class VLLMPagedMemConnector(GPUConnectorInterface):
    """Batched connector for every supported layout (see layouts.py) and device."""

    def __init__(self, layout: KVLayout, platform: Platform, staging_bytes: int = DEFAULT_STAGING_BYTES,
                 native_blocks: bool = False, slot_buckets: Any = "auto"):
        self.layout = layout
        self.platform = platform
        self.staging_bytes = int(staging_bytes)
        buckets = slot_buckets_for(slot_buckets)  # checked everywhere, used on HPU
        self.transfers: Transfers = _transfers_for(layout, platform, self.staging_bytes, native_blocks, buckets)

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
        return self.transfers.host_format_tag

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
        self.transfers.store(memory_objs, starts, ends, slot_mapping)

    def batched_to_gpu(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                       slot_mapping: torch.Tensor, **kw: Any) -> None:
        self.transfers.load(memory_objs, starts, ends, slot_mapping)


def _transfers_for(layout: KVLayout, platform: Platform, staging_bytes: int, native_blocks: bool,
                   buckets) -> Transfers:
    """The device's own path: where vLLM's KV cache lives decides (native blocks exist only on
    the CPU; HPU buckets only on Gaudi; everything else goes through device staging)."""
    device = layout.device.type
    if device == "cpu":
        from lmcache.v1.gpu_connector.cpu import CpuTransfers

        return CpuTransfers(layout, platform, native_blocks=native_blocks)
    if device == "hpu" and buckets is not None:
        return HpuTransfers(layout, platform, staging_bytes, buckets)
    # HPU kernels get native dtypes (fp8: bytes); elsewhere integer views keep every bit and allow fp8.
    return StagedTransfers(layout, platform, staging_bytes, hpu_as_moved if device == "hpu" else None)
