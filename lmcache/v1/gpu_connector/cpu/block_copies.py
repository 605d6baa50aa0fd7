"""Whole blocks between the paged cache and memory objects on CPU, as memcpys of runs.

A whole block of one plane is, in the memory object, one contiguous piece (rows
i*N .. i*N+N-1 of that plane and layer); in the cache it is a strided view whose
row-major order is the object's (addressing.BlockView) and whose innermost dims are
contiguous runs: the whole block for vllm-gaudi's K and V, MLA and native cpu_attn
blocks; one head's K (or V) of one token for the CUDA flash-attention layout. A batch
of whole blocks is then a list of memcpys of runs. Doing them from Python costs a GIL
hand-off each, and with two threads those hand-offs, not the copies, set the pace (at
block 16, numpy row copies and torch.index_select reached 0.55-0.78 of a memcpy of the
same bytes here). So each block's addresses are computed with numpy and checked
against the tensors they belong to, and a compiled loop (memcpy_kernel.py) walks the
runs and calls memcpy for each without the GIL, the blocks split over torch's thread
count: 0.9-1.05 of memcpy (`bench connector`).

Runs shorter than MIN_RUN_BYTES (vLLM's CPU attention tiles, 2-4 bytes) are not
worth a call each: those planes get no copier and keep their own path, as does
everything where numba is missing.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np
import torch

from lmcache.v1.gpu_connector.cpu.threads import run_threaded

logger = logging.getLogger(__name__)

MIN_RUN_BYTES = 64
MAX_OUTER_DIMS = 3               # what memcpy_kernel.copy_blocks walks
MIN_BYTES_PER_THREAD = 1 << 20   # below this a batch is not worth a hand-off to a helper thread


@functools.lru_cache(maxsize=1)
def load_kernel():
    """memcpy_kernel.copy_blocks, or None where numba is missing or fails to compile."""
    try:
        from lmcache.v1.gpu_connector.cpu.memcpy_kernel import copy_blocks

        probe = np.arange(4, dtype=np.uint8)
        one = np.ones(3, dtype=np.int64)
        copy_blocks(np.array([[probe.ctypes.data]], dtype=np.uint64),
                    np.array([[probe.ctypes.data + 2]], dtype=np.uint64), one, np.zeros(3, dtype=np.int64), 1, True)
        if probe[2] != 0:
            raise RuntimeError("the compiled memcpy loop copied nothing")
    except Exception as exc:  # noqa: BLE001 - numba absent or broken: callers keep their torch path
        logger.info("numba unavailable (%s: %s); whole blocks move through torch", type(exc).__name__, exc)
        return None
    return copy_blocks


def block_runs(view: torch.Tensor) -> tuple[int, list[tuple[int, int]]] | None:
    """(run bytes, outer [(size, byte stride)] outermost first) of one block of a [num_blocks, ...]
    view, or None if its innermost elements are not contiguous."""
    elem = view.element_size()
    dims = [(size, stride) for size, stride in zip(view.shape[1:], view.stride()[1:]) if size != 1]
    run = 1
    while dims and dims[-1][1] == run:
        run *= dims.pop()[0]
    if run == 1 and dims:
        return None
    outer: list[tuple[int, int]] = []
    for size, stride in dims:
        if outer and outer[-1][1] == stride * size:
            outer[-1] = (outer[-1][0] * size, stride)
        else:
            outer.append((size, stride))
    return run * elem, [(size, stride * elem) for size, stride in outer]


class WholeBlockCopier:
    """Whole blocks of every (layer, plane) of one paged cache, moved as runs.

    Block b of (layer l, plane p) starts at bases[l, p] + b * block_stride and is the runs of
    `shape` / `strides` (bytes); in a memory object ([P, L, T, hidden], contiguous) block i
    of a part is at byte (p*L + l)*T*row_bytes + i*block_bytes, its runs back to back."""

    def __init__(self, kernel, views: list, bases: np.ndarray, block_stride: int, run: int,
                 outer: list[tuple[int, int]], num_blocks: int):
        self._kernel = kernel
        self._views = views              # kept alive: the addresses below point into them
        self.bases = bases               # [L, P] uint64
        self.block_stride = block_stride
        self.run = run
        padded = outer + [(1, 0)] * (MAX_OUTER_DIMS - len(outer))
        self.shape = np.array([size for size, _ in padded], dtype=np.int64)
        self.strides = np.array([stride for _, stride in padded], dtype=np.int64)
        self.block_bytes = run * int(self.shape.prod())
        self.num_blocks = num_blocks

    @classmethod
    def for_planes(cls, per_layer: Sequence[Sequence[torch.Tensor | None]]) -> "WholeBlockCopier | None":
        """From per layer, per plane block views ([num_blocks, ...] host tensors, row-major order =
        the object's rows; one shape, block stride and set of strides for all): a copier, or None
        where they are not such views, their runs are short, or numba is missing."""
        views = [v for planes in per_layer for v in planes]
        if not views or any(v is None or v.device.type != "cpu" or v.dim() < 2 for v in views):
            return None
        first = views[0]
        if any(v.shape != first.shape or v.stride() != first.stride() or v.dtype != first.dtype for v in views):
            return None
        runs = block_runs(first)
        if runs is None or runs[0] < MIN_RUN_BYTES or len(runs[1]) > MAX_OUTER_DIMS:
            return None
        kernel = load_kernel()
        if kernel is None:
            return None
        bases = np.array([[v.data_ptr() for v in planes] for planes in per_layer], dtype=np.uint64)
        return cls(kernel, views, bases, first.stride(0) * first.element_size(), runs[0], runs[1],
                   int(first.shape[0]))

    # -- batches ------------------------------------------------------------------
    def store(self, parts: Sequence[tuple[torch.Tensor, np.ndarray]]) -> None:
        """Cache -> objects, for (object tensor, block ids of its leading whole blocks) pairs."""
        self._run(parts, store=True)

    def load(self, parts: Sequence[tuple[torch.Tensor, np.ndarray]]) -> None:
        """Objects -> cache (as store)."""
        self._run(parts, store=False)

    def _run(self, parts, store: bool) -> None:
        cache, objects = self._addresses(parts)
        count = cache.shape[0]
        if count == 0:
            return
        total = count * self.bases.shape[1] * self.block_bytes
        threads = max(1, min(torch.get_num_threads(), count, total // MIN_BYTES_PER_THREAD))
        step = -(-count // threads)
        run_threaded([(self._kernel, cache[a: a + step], objects[a: a + step], self.shape, self.strides,
                       self.run, store) for a in range(0, count, step)])

    def _addresses(self, parts) -> tuple[np.ndarray, np.ndarray]:
        """Cache and object addresses [blocks, planes] of every block of every part (checked)."""
        layers, planes = self.bases.shape
        u64 = np.uint64
        cache_all, object_all = [], []
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
            if blocks.size * self.block_bytes > layer_bytes:
                raise ValueError(f"whole blocks: {blocks.size} blocks of {self.block_bytes} bytes do not fit an "
                                 f"object layer of {layer_bytes} bytes")
            # [layer, block, plane]
            cache = self.bases[:, None, :] + (blocks * self.block_stride).astype(u64)[None, :, None]
            plane_layer = (np.arange(planes, dtype=u64)[None, :] * u64(layers)
                           + np.arange(layers, dtype=u64)[:, None]) * u64(layer_bytes)
            within = np.arange(blocks.size, dtype=u64) * u64(self.block_bytes)
            objects = u64(tensor.data_ptr()) + plane_layer[:, None, :] + within[None, :, None]
            cache_all.append(cache.reshape(-1, planes))
            object_all.append(objects.reshape(-1, planes))
        if not cache_all:
            empty = np.empty((0, planes), dtype=np.uint64)
            return empty, empty
        return np.concatenate(cache_all), np.concatenate(object_all)
