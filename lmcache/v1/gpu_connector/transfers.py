"""The device contract: one verb set, one implementation per device path.

The generic connector (vllm_connector.py) picks one `Transfers` when it is built and
hands it every batch; it carries no device branches of its own:

  cpu/     CpuTransfers      vLLM's CPU backend (and any KV on the host): no staging
  hpu/     HpuTransfers      Gaudi: every device op in one shape per bucket size
  staged.py StagedTransfers  CUDA (and Gaudi with buckets off): device staging, side stream

A batch is the connector contract's (memory objects, starts, ends, one slot list; see
GPUConnectorInterface). `store` and `load` return with the host objects complete and
the paged cache written. The layer generators serve the layerwise connector: next()
number i moves layer i, one more next() finishes (see layerwise.py).
"""

from __future__ import annotations

from typing import Any, Generator, Protocol, Sequence

import torch


class Transfers(Protocol):
    host_format_tag: str  # non-empty when the objects' bytes depend on the device tiling

    def store(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
              slot_mapping: torch.Tensor) -> None:
        """Paged cache -> memory objects, a whole batch."""

    def load(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
             slot_mapping: torch.Tensor) -> None:
        """Memory objects -> paged cache, a whole batch."""

    def store_layers(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
                     slot_mapping: torch.Tensor) -> Generator:
        """Per layer: next() number i saves layer i (once it is computed); one more next() finishes."""

    def load_layers(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
                    slot_mapping: torch.Tensor) -> Generator:
        """Per layer: after next() number i, layer i is in the paged cache; one more next() finishes."""
