"""Paged KV connectors: move KV between vLLM's paged caches and host memory objects.

`create_gpu_connector(kv_caches, ...)` decides the layout once (layouts.py) and
returns the connector for it: `VLLMPagedMemConnector` (batched; CUDA, HPU, CPU)
or, with use_layerwise=True, `VLLMPagedMemLayerwiseConnector` (CUDA, CPU).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generator, Sequence

import torch

from lmcache.v1.memory import MemoryFormat

__all__ = [
    "GPUConnectorInterface",
    "LayoutError",
    "VLLMPagedMemConnector",
    "VLLMPagedMemLayerwiseConnector",
    "create_gpu_connector",
]


class GPUConnectorInterface(ABC):
    """Paged KV <-> host memory objects. See docs/architecture.md for the contract.

    slot_mapping is ONE 1-D integer tensor; memory object i receives/provides the
    tokens whose slots are slot_mapping[starts[i]:ends[i]], at token positions
    0 .. ends[i]-starts[i]-1. A slot < 0 is padding: never read or written. A
    batched call synchronizes once; after it host objects are complete and the
    paged cache is written.
    """

    memory_format: MemoryFormat
    kv_dtype: torch.dtype
    num_layers: int
    layout_fingerprint: str
    host_format_tag: str = ""  # non-empty when object bytes depend on the device layout

    @abstractmethod
    def get_shape(self, num_tokens: int) -> torch.Size:
        """Shape of a memory object holding `num_tokens` tokens."""

    @abstractmethod
    def from_gpu(self, memory_obj: Any, start: int, end: int, *, slot_mapping: torch.Tensor, **kw: Any) -> None:
        """Paged cache -> one memory object."""

    @abstractmethod
    def to_gpu(self, memory_obj: Any, start: int, end: int, *, slot_mapping: torch.Tensor, **kw: Any) -> None:
        """One memory object -> paged cache."""

    @abstractmethod
    def batched_from_gpu(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                         slot_mapping: torch.Tensor, **kw: Any) -> None:
        """Paged cache -> several memory objects, one gather per layer (and plane)."""

    @abstractmethod
    def batched_to_gpu(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                       slot_mapping: torch.Tensor, **kw: Any) -> None:
        """Several memory objects -> paged cache, one scatter per layer (and plane)."""

    def batched_from_gpu_layerwise(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                                   slot_mapping: torch.Tensor, **kw: Any) -> Generator:
        """Store generator: next() number i (i < num_layers) saves layer i; one more next() syncs."""
        raise NotImplementedError(_NO_LAYERWISE.format(type(self).__name__))

    def batched_to_gpu_layerwise(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                                 slot_mapping: torch.Tensor, **kw: Any) -> Generator:
        """Load generator: after next() number i (i < num_layers) layer i is ready; one more next() syncs."""
        raise NotImplementedError(_NO_LAYERWISE.format(type(self).__name__))


_NO_LAYERWISE = (
    "{} moves whole batches; create it with create_gpu_connector(..., use_layerwise=True) for per-layer "
    "generators (CUDA and CPU only)"
)

LAYERWISE_ON_HPU = (
    "use_layerwise is not available on Gaudi (HPU): vllm-gaudi calls attention directly and never calls "
    "the per-layer hooks wait_for_layer_load / save_kv_layer, so a layerwise connector would never move "
    "a layer. Use the batched connector (use_layerwise=False; LMCache config use_layerwise: false)."
)


def create_gpu_connector(
    kv_caches: Any,
    *,
    use_layerwise: bool = False,
    attn_backend: Any = None,
    platform: Any = None,
    use_mla: bool | None = None,
    cpu_attn_isa: str | None = None,
    model_dtype: torch.dtype | None = None,
    staging_bytes: int | None = None,
    native_blocks: bool = False,
    slot_buckets: Any = "auto",
) -> GPUConnectorInterface:
    """The connector for the caches vLLM registered.

    kv_caches: dict layer name -> tensor or (K, V) tuple (insertion order = layer
    order), or a list in layer order. attn_backend: vLLM's attention backend name
    (or class); it tells the CUDA and CPU layouts apart where shapes coincide.
    use_mla: from vLLM's model config, where the backend name is not at hand.
    cpu_attn_isa / model_dtype: what vLLM's CPU backend decided (default: vLLM's
    own rule for these caches). staging_bytes: device staging buffer budget.
    native_blocks: on vLLM's CPU backend, keep whole blocks in vLLM's own tiled byte
    order (cpu/native_blocks.py; block copies instead of transposes); the objects then
    carry `host_format_tag` and only suit the same tiling. Batched connectors only:
    the layerwise one always uses the portable per-token format.
    slot_buckets: on HPU, the sizes slot lists are padded to (config hpu_slot_buckets:
    "auto", "off" or ascending token counts; see hpu/buckets.py).
    """
    from lmcache.platforms import current_platform
    from lmcache.v1.gpu_connector.layouts import resolve_layout
    from lmcache.v1.gpu_connector.vllm_connector import DEFAULT_STAGING_BYTES, VLLMPagedMemConnector

    platform = platform or current_platform()
    if use_layerwise and platform.device_type == "hpu":
        raise ValueError(LAYERWISE_ON_HPU)
    layout = resolve_layout(
        kv_caches,
        device_type=platform.device_type,
        attn_backend=attn_backend,
        use_mla=use_mla,
        cpu_attn_isa=cpu_attn_isa,
        model_dtype=model_dtype,
    )
    budget = DEFAULT_STAGING_BYTES if staging_bytes is None else staging_bytes
    if use_layerwise:
        from lmcache.v1.gpu_connector.layerwise import VLLMPagedMemLayerwiseConnector

        return VLLMPagedMemLayerwiseConnector(layout, platform, budget)
    return VLLMPagedMemConnector(layout, platform, budget, native_blocks=native_blocks, slot_buckets=slot_buckets)


def __getattr__(name: str) -> Any:
    if name in ("VLLMPagedMemConnector", "VLLMPagedMemGPUConnectorV2"):
        from lmcache.v1.gpu_connector.vllm_connector import VLLMPagedMemConnector

        return VLLMPagedMemConnector
    if name in ("VLLMPagedMemLayerwiseConnector", "VLLMPagedMemLayerwiseGPUConnector"):
        from lmcache.v1.gpu_connector.layerwise import VLLMPagedMemLayerwiseConnector

        return VLLMPagedMemLayerwiseConnector
    if name == "LayoutError":
        from lmcache.v1.gpu_connector.layouts import LayoutError

        return LayoutError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
