"""Whole blocks between the paged cache and memory objects on CPU: one memcpy per block.

Where a whole block's share of a plane is one contiguous piece in the cache (vllm-gaudi's
K and V, MLA, vLLM's CPU cache kept as native blocks) it is also one contiguous piece in
the memory object (rows i*N .. i*N+N-1 of one plane and layer), so a batch of whole
blocks is a list of same-size memcpys. Doing them from Python costs a GIL hand-off per
piece, and with two threads those hand-offs, not the copies, set the pace: at block 16
(32 KB pieces) numpy row copies and torch.index_select reached 0.55-0.78 of a memcpy of
the same bytes here. So the pieces' addresses are computed with numpy, checked against
the tensors they belong to, and a compiled loop (memcpy_kernel.py) calls memcpy for
each without the GIL, the pieces split over torch's thread count: 0.95-1.05 of memcpy.

Without numba `WholeBlockCopier.for_planes` returns None and callers keep their
torch / numpy paths.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np
import torch

from lmcache.v1.gpu_connector.cpu_threads import run_threaded

logger = logging.getLogger(__name__)

MIN_BYTES_PER_THREAD = 1 << 20  # below this a batch is not worth a hand-off to a helper thread


@functools.lru_cache(maxsize=1)
def load_kernel():
    """memcpy_kernel.copy_pieces, or None where numba is missing or fails to compile."""
    try:
        from lmcache.v1.gpu_connector.memcpy_kernel import copy_pieces

        probe = np.arange(2, dtype=np.uint8)
        copy_pieces(np.array([probe.ctypes.data + 1], dtype=np.uint64),
                    np.array([probe.ctypes.data], dtype=np.uint64), 1)
        if probe[1] != 0:
            raise RuntimeError("the compiled memcpy loop copied nothing")
    except Exception as exc:  # numba absent or broken: callers keep their torch path
        logger.info("numba unavailable (%s: %s); whole blocks move through torch", type(exc).__name__, exc)
        return None
    return copy_pieces


class WholeBlockCopier:
    """Whole blocks of every (layer, plane) of one paged cache, as contiguous pieces.

    Block b of (layer l, plane p) is `piece` bytes at bases[l, p] + b * block_stride; in a
    memory object ([P, L, T, hidden], contiguous) block i of a part is at rows i*N.. of
    plane p, layer l, i.e. byte (p*L + l)*T*row_bytes + i*piece."""

    def __init__(self, kernel, tensors: list, bases: np.ndarray, block_stride: int, piece: int,
                 num_blocks: int):
        self._kernel = kernel
        self._tensors = tensors          # kept alive: the addresses below point into them
        self.bases = bases               # [L, P] uint64
        self.block_stride = block_stride
        self.piece = piece
        self.num_blocks = num_blocks

    @classmethod
    def for_planes(cls, per_layer: Sequence[Sequence[torch.Tensor]]) -> "WholeBlockCopier | None":
        """From per layer, per plane block views ([num_blocks, ...] host tensors whose every block is
        one contiguous piece, with one block stride and piece size for all): a copier, or None
        where they are not such views or numba is missing."""
        views = [v for planes in per_layer for v in planes]
        if not views or any(v is None or v.device.type != "cpu" or v.dim() < 2 for v in views):
            return None
        first = views[0]
        elem = first.element_size()
        piece = first[0].numel() * elem
        stride = first.stride(0) * elem
        num_blocks = first.shape[0]
        for v in views:
            if (not v[0].is_contiguous() or v[0].numel() * v.element_size() != piece
                    or v.stride(0) * v.element_size() != stride or v.shape[0] != num_blocks or stride < piece):
                return None
        kernel = load_kernel()
        if kernel is None:
            return None
        bases = np.array([[v.data_ptr() for v in planes] for planes in per_layer], dtype=np.uint64)
        return cls(kernel, views, bases, stride, piece, num_blocks)

    # -- batches ------------------------------------------------------------------
    def store(self, parts: Sequence[tuple[torch.Tensor, np.ndarray]]) -> None:
        """Cache -> objects, for (object tensor, block ids of its leading whole blocks) pairs."""
        cache, objects = self._addresses(parts)
        self._run(objects, cache)

    def load(self, parts: Sequence[tuple[torch.Tensor, np.ndarray]]) -> None:
        """Objects -> cache (as store)."""
        cache, objects = self._addresses(parts)
        self._run(cache, objects)

    def _addresses(self, parts) -> tuple[np.ndarray, np.ndarray]:
        """Cache and object addresses of every piece, [layer, plane, block] per part, checked."""
        cache_all, object_all = [], []
        layers, planes = self.bases.shape
        for tensor, blocks in parts:
            blocks = np.asarray(blocks, dtype=np.int64)
            if blocks.size == 0:
                continue
            if tensor.device.type != "cpu" or not tensor.is_contiguous() or tuple(tensor.shape[:2]) != (planes, layers):
                raise ValueError(f"whole blocks: the object tensor {list(tensor.shape)} is not a contiguous host "
                                 f"[{planes}, {layers}, T, hidden] tensor")
            if blocks.min() < 0 or blocks.max() >= self.num_blocks:
                raise ValueError(f"whole blocks: block ids must be in [0, {self.num_blocks}), got "
                                 f"{int(blocks.min())}..{int(blocks.max())}")
            layer_bytes = tensor.stride(1) * tensor.element_size()
            if blocks.size * self.piece > layer_bytes:
                raise ValueError(f"whole blocks: {blocks.size} blocks of {self.piece} bytes do not fit an object "
                                 f"layer of {layer_bytes} bytes")
            cache = self.bases[:, :, None] + (blocks * self.block_stride).astype(np.uint64)[None, None, :]
            within = np.arange(blocks.size, dtype=np.uint64) * np.uint64(self.piece)
            plane_layer = (np.arange(planes, dtype=np.uint64)[None, :] * np.uint64(layers)
                           + np.arange(layers, dtype=np.uint64)[:, None]) * np.uint64(layer_bytes)
            objects = np.uint64(tensor.data_ptr()) + plane_layer[:, :, None] + within[None, None, :]
            cache_all.append(cache.reshape(-1))
            object_all.append(objects.reshape(-1))
        if not cache_all:
            empty = np.empty(0, dtype=np.uint64)
            return empty, empty
        return np.concatenate(cache_all), np.concatenate(object_all)

    def _run(self, dst: np.ndarray, src: np.ndarray) -> None:
        count = dst.size
        threads = max(1, min(torch.get_num_threads(), count * self.piece // MIN_BYTES_PER_THREAD))
        step = -(-count // threads) if count else 0
        run_threaded([(self._kernel, dst[a: a + step], src[a: a + step], self.piece)
                      for a in range(0, count, step or 1)])
