"""Recognise the paged KV layout vLLM hands to register_kv_caches, once.

Supported (vLLM 0.32, vllm-gaudi):

  flash_attn  CUDA FlashAttention / FlashInfer: per layer a view with logical shape
              [num_blocks, H, block_size, 2*D] (often non-contiguous: LBNHC keeps it
              physically [B, N, H, 2D]); per token K = C[:D], V = C[D:].
  cpu_attn    vLLM's CPU backend: the same logical shape, contiguous, but each
              (block, head) is a region whose first half is K and second half V,
              laid out by vLLM's CPU kernel per ISA (see cpu/attn_packing.py).
  hpu_kv      vllm-gaudi: per layer a tuple-like (K, V), each [num_blocks, block_size, H, D].
  mla         MLA on CUDA/CPU: [num_blocks, 1, block_size, C] or [num_blocks, block_size, C].
  hpu_mla     MLA on Gaudi: one tensor [num_blocks, block_size, C] or [num_blocks, block_size, 1, C].

flash_attn and cpu_attn have the same shape; the tensors' device (ground truth)
and the attention backend name tell them apart, never the shape.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from lmcache.v1.gpu_connector.addressing import PlaneAddressing, plane_addressing
from lmcache.v1.memory import MemoryFormat

logger = logging.getLogger(__name__)


class LayoutKind(enum.Enum):
    FLASH_ATTN = "flash_attn"
    CPU_ATTN = "cpu_attn"
    HPU_KV = "hpu_kv"
    MLA = "mla"
    HPU_MLA = "hpu_mla"

    @property
    def is_mla(self) -> bool:
        return self in (LayoutKind.MLA, LayoutKind.HPU_MLA)


SUPPORTED_LAYOUTS = (
    "flash_attn (CUDA FlashAttention/FlashInfer: per layer [num_blocks, H, block_size, 2*D], K=C[:D], V=C[D:])",
    "cpu_attn (vLLM CPU backend: per layer contiguous [num_blocks, H, block_size, 2*D], packed by vLLM's CPU kernel)",
    "hpu_kv (vllm-gaudi: per layer a (K, V) tuple, each [num_blocks, block_size, H, D])",
    "mla (MLA on CUDA/CPU: per layer [num_blocks, 1, block_size, C] or [num_blocks, block_size, C])",
    "hpu_mla (MLA on Gaudi: per layer [num_blocks, block_size, C] or [num_blocks, block_size, 1, C])",
)

# Attention backend names (as vLLM's AttentionBackend.get_name() reports them) per layout.
_FLASH_BACKENDS = ("FLASH_ATTN", "FLASHINFER")
_CPU_BACKENDS = ("CPU_ATTN", "TORCH_SDPA")


class LayoutError(ValueError):
    """The registered KV caches are not a layout we can address."""


def _fail(seen: str, why: str) -> LayoutError:
    return LayoutError(
        f"unsupported KV cache layout: {why}. Seen: {seen}. Supported layouts: " + "; ".join(SUPPORTED_LAYOUTS)
    )


def _is_pair(entry: Any) -> bool:
    return isinstance(entry, tuple) and not isinstance(entry, torch.Tensor)


def _describe_entry(entry: Any) -> str:
    if isinstance(entry, torch.Tensor):
        return f"tensor{list(entry.shape)} {entry.dtype} on {entry.device} strides {list(entry.stride())}"
    if _is_pair(entry):
        inner = ", ".join(_describe_entry(e) for e in entry)
        return f"{type(entry).__name__}({inner})"
    return f"{type(entry).__name__}"


def normalize_kv_caches(kv_caches: Any) -> tuple[list[str], list[Any]]:
    """(layer names, per-layer entries) from a dict (insertion order) or a list."""
    if isinstance(kv_caches, Mapping):
        names = [str(k) for k in kv_caches.keys()]
        entries = list(kv_caches.values())
    elif isinstance(kv_caches, (list, tuple)) and not isinstance(kv_caches, torch.Tensor) and not _looks_like_one_pair(kv_caches):
        entries = list(kv_caches)
        names = [f"layer.{i}" for i in range(len(entries))]
    else:
        raise LayoutError(
            "kv_caches must be a dict (layer name -> tensor or (K, V) tuple, in layer order) or a list "
            f"of those; got {type(kv_caches).__name__}"
        )
    if not entries:
        raise LayoutError("kv_caches is empty: no layers to connect")
    return names, entries


def _looks_like_one_pair(obj: Any) -> bool:
    # A bare vllm-gaudi TensorTuple (one layer's (K, V)) passed instead of a list of layers.
    return type(obj) is not tuple and type(obj) is not list and isinstance(obj, tuple)


def backend_name(attn_backend: Any) -> str | None:
    """vLLM's backend name from a string, a backend class or an instance (None if none given)."""
    if attn_backend is None:
        return None
    if isinstance(attn_backend, str):
        name = attn_backend
    else:
        get_name = getattr(attn_backend, "get_name", None)
        if get_name is None:
            raise LayoutError(
                f"attn_backend must be a backend name (e.g. 'FLASH_ATTN', 'CPU_ATTN') or a vLLM "
                f"AttentionBackend; got {attn_backend!r}"
            )
        name = get_name()
    return name.strip().upper()


@dataclass
class KVLayout:
    """What the connector needs to know about the registered caches, decided once."""

    kind: LayoutKind
    layer_names: list[str]
    # per layer, per plane: the tensor the plane lives in (native dtype)
    plane_tensors: list[tuple[torch.Tensor, ...]]
    planes: tuple[PlaneAddressing, ...]
    num_blocks: int
    block_size: int
    hidden: int                    # elements per token per plane (H*D, or C for MLA)
    dtype: torch.dtype
    device: torch.device
    layer_shape: tuple[int, ...]   # one layer's shape (for a (K, V) pair: one of them)
    detail: str = ""               # e.g. the CPU kernel's ISA
    cpu_attn_packing: Any = None   # CpuAttnPacking for the cpu_attn layout

    @property
    def num_layers(self) -> int:
        return len(self.plane_tensors)

    @property
    def num_planes(self) -> int:
        return len(self.planes)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def memory_format(self) -> MemoryFormat:
        return MemoryFormat.KV_MLA_FMT if self.kind.is_mla else MemoryFormat.KV_2LTD

    @property
    def fingerprint(self) -> str:
        # num_blocks depends on free device memory at start-up: left out so keys stay stable.
        dims = "x".join("B" if i == 0 else str(d) for i, d in enumerate(self.layer_shape))
        pair = "2x" if self.kind is LayoutKind.HPU_KV else ""
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.kind.value}_L{self.num_layers}_{pair}{dims}_{dtype}"

    def describe(self) -> str:
        extra = f" {self.detail}" if self.detail else ""
        return (
            f"{self.kind.value}{extra}: {self.num_layers} layers, {self.num_blocks} blocks of {self.block_size}, "
            f"hidden {self.hidden}, {self.dtype} on {self.device}, row widths "
            f"{[p.width for p in self.planes]}"
        )


def resolve_layout(
    kv_caches: Any,
    *,
    device_type: str,
    attn_backend: Any = None,
    use_mla: bool | None = None,
    cpu_attn_isa: str | None = None,
    model_dtype: torch.dtype | None = None,
) -> KVLayout:
    """Decide the layout of `kv_caches` (see module doc) for a platform of `device_type`."""
    names, entries = normalize_kv_caches(kv_caches)
    seen = f"{len(entries)} layers, first: {_describe_entry(entries[0])}"
    backend = backend_name(attn_backend)
    tensors = _all_tensors(entries, seen)
    devices = {t.device.type for t in tensors}
    if len(devices) != 1:
        raise _fail(seen, f"the layers are on several device types {sorted(devices)}")
    tensor_device = tensors[0].device
    if tensor_device.type != device_type:
        raise LayoutError(
            f"the KV caches vLLM registered are on {tensor_device.type} but the lmcache platform is "
            f"{device_type}: the tensors' device is the ground truth; set LMCACHE_DEVICE={tensor_device.type} "
            f"(accepted: cuda, hpu, cpu) or run where that device is the detected one"
        )
    _check_uniform(entries, seen)
    first = entries[0]
    if _is_pair(first):
        kind = _pair_kind(first, backend, use_mla, seen)
    else:
        kind = _tensor_kind(first, tensor_device.type, backend, use_mla, seen)
    layout = _build(kind, names, entries, seen, cpu_attn_isa, model_dtype)
    logger.info("KV cache layout: %s (fingerprint %s)", layout.describe(), layout.fingerprint)
    return layout


def _all_tensors(entries: Sequence[Any], seen: str) -> list[torch.Tensor]:
    out = []
    for entry in entries:
        if isinstance(entry, torch.Tensor):
            out.append(entry)
        elif _is_pair(entry):
            if len(entry) != 2 or not all(isinstance(e, torch.Tensor) for e in entry):
                raise _fail(seen, f"a per-layer tuple must be exactly (K, V) tensors, got {_describe_entry(entry)}")
            out.extend(entry)
        else:
            raise _fail(seen, f"a layer entry is a {type(entry).__name__}, not a tensor or a (K, V) tuple")
    return out


def _signature(entry: Any) -> tuple:
    if isinstance(entry, torch.Tensor):
        return ("t", tuple(entry.shape), tuple(entry.stride()), entry.dtype, str(entry.device))
    return ("p", *(_signature(e) for e in entry))


def _check_uniform(entries: Sequence[Any], seen: str) -> None:
    first = _signature(entries[0])
    for i, entry in enumerate(entries[1:], start=1):
        if _signature(entry) != first:
            raise _fail(
                seen,
                f"layer {i} ({_describe_entry(entry)}) differs in shape, strides, dtype or device from layer 0; "
                "all layers must share one layout",
            )


def _pair_kind(pair: tuple, backend: str | None, use_mla: bool | None, seen: str) -> LayoutKind:
    k, v = pair
    if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype:
        raise _fail(seen, "a (K, V) pair must be two tensors of the same 4-D shape [num_blocks, block_size, H, D]")
    if backend is not None and "MLA" in backend:
        raise _fail(seen, f"backend {backend} is MLA but the layers are (K, V) pairs")
    if use_mla:
        raise _fail(seen, "vLLM's model config says use_mla, but the layers are (K, V) pairs")
    return LayoutKind.HPU_KV


def _tensor_kind(t: torch.Tensor, device_type: str, backend: str | None, use_mla: bool | None, seen: str) -> LayoutKind:
    mla_hint = bool(use_mla) or (backend is not None and "MLA" in backend)
    if device_type == "hpu":
        return _hpu_tensor_kind(t, use_mla if use_mla is not None else (True if mla_hint else None), seen)
    if t.dim() == 3:
        return LayoutKind.MLA
    if t.dim() != 4:
        raise _fail(seen, f"a per-layer tensor must be 3-D or 4-D, got {t.dim()}-D")
    if mla_hint:
        if t.shape[1] != 1:
            raise _fail(seen, f"MLA caches have one head: [num_blocks, 1, block_size, C]; got dim 1 = {t.shape[1]}")
        return LayoutKind.MLA
    if backend is not None:
        if any(backend.startswith(b) for b in _FLASH_BACKENDS):
            return LayoutKind.FLASH_ATTN
        if backend in _CPU_BACKENDS:
            if device_type != "cpu":
                raise _fail(seen, f"backend {backend} is vLLM's CPU backend but the caches are on {device_type}")
            return LayoutKind.CPU_ATTN
        raise _fail(
            seen,
            f"attention backend {backend!r} is not supported; supported backends: "
            f"{', '.join(_FLASH_BACKENDS + _CPU_BACKENDS)}, or any MLA backend (name containing 'MLA')",
        )
    if device_type == "cuda":
        return LayoutKind.FLASH_ATTN
    if t.shape[1] == 1 and use_mla is None:
        raise _fail(
            seen,
            "a CPU cache with one head could be MLA or vLLM's CPU attention, which lay data out differently; "
            "pass attn_backend (vLLM's backend name) or use_mla",
        )
    return LayoutKind.CPU_ATTN


HPU_SINGLE_TENSOR = (
    "vllm-gaudi registered ONE tensor per layer for a model that is not MLA: with dynamic fp8 KV scales "
    "(VLLM_DYNAMIC_KV_QUANT=1 with a QUANT_CONFIG that quantizes the KV cache, kv_cache_dtype fp8_inc) it passes "
    "only K, so V would be lost. Turn dynamic KV scales off (unset VLLM_DYNAMIC_KV_QUANT, or use static scales "
    "in QUANT_CONFIG: then (K, V) pairs arrive), or run without LMCache"
)


def _hpu_tensor_kind(t: torch.Tensor, use_mla: bool | None, seen: str) -> LayoutKind:
    """A single tensor per layer on HPU: MLA only if vLLM's model config says so (use_mla), never
    from the shape: vllm-gaudi's K-only fp8 cache with one KV head per rank looks like MLA."""
    if use_mla is False:
        raise _fail(seen, HPU_SINGLE_TENSOR)
    if t.dim() == 3:
        return LayoutKind.HPU_MLA  # vllm-gaudi's MLA form; its K-only caches are 4-D
    if t.dim() == 4 and t.shape[2] == 1:
        if use_mla:
            return LayoutKind.HPU_MLA
        raise _fail(seen, "a 4-D single tensor with one head on HPU is either MLA or vllm-gaudi's K-only fp8 "
                    "cache with one KV head per rank; pass use_mla (vLLM's model_config.use_mla) to "
                    "create_gpu_connector. If the model is not MLA: " + HPU_SINGLE_TENSOR)
    raise _fail(seen, "on HPU a single tensor per layer must be MLA [num_blocks, block_size, C] (or [.., 1, C]); "
                "standard attention comes as (K, V) pairs. " + HPU_SINGLE_TENSOR)


def _build(kind: LayoutKind, names: list[str], entries: list[Any], seen: str,
           cpu_attn_isa: str | None, model_dtype: torch.dtype | None) -> KVLayout:
    detail = ""
    packing = None
    if kind is LayoutKind.HPU_KV:
        k = entries[0][0]
        num_blocks, block_size, heads, head_size = k.shape
        addr = _strided_addresses(block_size, heads, head_size, k.stride(1), k.stride(2), k.stride(3), seen)
        plane = plane_addressing(addr, k.stride(0), num_blocks, heads)
        planes = (plane, plane)
        plane_tensors = [(e[0], e[1]) for e in entries]
        hidden = heads * head_size
    elif kind in (LayoutKind.FLASH_ATTN, LayoutKind.CPU_ATTN):
        t = entries[0]
        num_blocks, heads, block_size, width = t.shape
        if width % 2:
            raise _fail(seen, f"the last dim ({width}) must be 2*head_size")
        head_size = width // 2
        if kind is LayoutKind.FLASH_ATTN:
            addrs = [
                _strided_addresses(block_size, heads, head_size, t.stride(2), t.stride(1), t.stride(3), seen, base=p * head_size * t.stride(3))
                for p in (0, 1)
            ]
        else:
            addrs, packing = _cpu_attn_addresses(t, seen, cpu_attn_isa, model_dtype)
            detail = packing.describe()
        planes = tuple(plane_addressing(a, t.stride(0), num_blocks, heads) for a in addrs)
        plane_tensors = [(e, e) for e in entries]
        hidden = heads * head_size
    else:  # MLA / HPU_MLA
        t = entries[0]
        if t.dim() == 3:
            num_blocks, block_size, width = t.shape
            token_stride, elem_stride = t.stride(1), t.stride(2)
        elif kind is LayoutKind.MLA:
            num_blocks, _, block_size, width = t.shape
            token_stride, elem_stride = t.stride(2), t.stride(3)
        else:
            num_blocks, block_size, _, width = t.shape
            token_stride, elem_stride = t.stride(1), t.stride(3)
        addr = _strided_addresses(block_size, 1, width, token_stride, 0, elem_stride, seen)
        planes = (plane_addressing(addr, t.stride(0), num_blocks),)
        plane_tensors = [(e,) for e in entries]
        hidden = width
    first = entries[0][0] if kind is LayoutKind.HPU_KV else entries[0]
    return KVLayout(
        kind=kind,
        layer_names=names,
        plane_tensors=plane_tensors,
        planes=planes,
        num_blocks=int(num_blocks),
        block_size=int(block_size),
        hidden=int(hidden),
        dtype=first.dtype,
        device=first.device,
        layer_shape=tuple(int(d) for d in first.shape),
        detail=detail,
        cpu_attn_packing=packing,
    )


def _strided_addresses(block_size: int, heads: int, head_size: int, token_stride: int, head_stride: int,
                       elem_stride: int, seen: str, base: int = 0) -> torch.Tensor:
    """[block_size, heads*head_size] element offsets inside a block for a strided view."""
    if elem_stride != 1:
        raise _fail(seen, f"the innermost (head_size) dimension must be contiguous, its stride is {elem_stride}")
    o = torch.arange(block_size, dtype=torch.int64).view(-1, 1, 1) * token_stride
    h = torch.arange(heads, dtype=torch.int64).view(1, -1, 1) * head_stride
    d = torch.arange(head_size, dtype=torch.int64).view(1, 1, -1)
    return (base + o + h + d).reshape(block_size, heads * head_size)


def _cpu_attn_addresses(t: torch.Tensor, seen: str, isa: str | None,
                        model_dtype: torch.dtype | None) -> tuple[list[torch.Tensor], Any]:
    from lmcache.v1.gpu_connector.cpu.attn_packing import CpuAttnProbeError, probe_cpu_attn_packing

    num_blocks, heads, block_size, width = t.shape
    head_size = width // 2
    if t.stride(3) != 1 or t.stride(2) != width:
        raise _fail(seen, "vLLM's CPU backend needs each (block, head) region [block_size, 2*D] contiguous (layout LBHNC)")
    try:
        packing = probe_cpu_attn_packing(t.dtype, block_size, head_size, isa=isa, model_dtype=model_dtype)
    except CpuAttnProbeError as exc:
        raise LayoutError(f"cannot address vLLM's CPU attention layout ({seen}): {exc}") from exc
    h = torch.arange(heads, dtype=torch.int64).view(1, -1, 1) * t.stride(1)
    addrs = [(h + pos.view(block_size, 1, head_size)).reshape(block_size, heads * head_size)
             for pos in (packing.k_pos, packing.v_pos)]
    return addrs, packing
