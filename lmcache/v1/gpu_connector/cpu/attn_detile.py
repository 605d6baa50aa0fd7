"""Whole blocks of vLLM's CPU attention layout <-> canonical token rows, fast.

The block view of a plane (addressing.BlockView: shape (o1, o0, H, d1, d0) with
element strides, probed from vLLM's own kernel) is matched against the three
shapes vLLM's CPU kernel produces; each has a compiled loop (attn_kernels.py):

  tiles        [dims][tokens] tiles: K with vec/vec16 (dims one by one) and K with
               amx (dims in VNNI pairs, 16 tokens a tile): a transpose of 2- or
               4-byte units.
  token pairs  V with amx: each dim holds two tokens side by side (VNNI pairs of
               tokens): split into two rows.
  rows         V with vec/vec16: one row per token and head.

Each shape has its inverse loop too (a Tiler, for loads of whole blocks).

A plane that matches none of them, a cache that is not one contiguous tensor,
or a missing numba, gets None: the caller keeps its other path (stores: a
strided index_select over the block view; loads: vLLM's own kernel, or numpy
over the block view), which is correct for any probed layout.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lmcache.v1.gpu_connector.addressing import BlockView

logger = logging.getLogger(__name__)

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@functools.lru_cache(maxsize=1)
def load_kernels():
    """The compiled kernels module, or None where numba is missing or fails to compile."""
    try:
        started = time.perf_counter()
        from lmcache.v1.gpu_connector.cpu import attn_kernels
    except Exception as exc:  # noqa: BLE001 - numba absent or broken: the torch path stays
        logger.info("numba unavailable (%s: %s); CPU attention blocks move through torch", type(exc).__name__, exc)
        return None
    logger.debug("cpu_attn kernels imported in %.3f s", time.perf_counter() - started)
    return attn_kernels


def flat_unsigned(t: torch.Tensor, itemsize: int) -> np.ndarray:
    """A contiguous tensor's bytes as a 1-D numpy array of unsigned `itemsize`-byte units (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy().view(_UNSIGNED[itemsize])


@dataclass(frozen=True)
class _Match:
    """One of the three shapes, with its compiled loops (both directions) and their geometry."""

    kind: str
    cache_unit: int                # bytes per cache unit
    row_unit: int                  # bytes per token-row unit
    detile: Callable               # (cache, rows, blocks, *geometry, row_len, row_offset, *tail)
    tile: Callable                 # (rows, cache, blocks, *geometry, row_len, row_offset, *tail)
    geometry: tuple
    tail: tuple = ()


@dataclass(frozen=True)
class _BlockMover:
    match: _Match

    @property
    def kind(self) -> str:         # "tiles", "token_pairs" or "rows"
        return self.match.kind

    @property
    def cache_unit(self) -> int:   # bytes per cache unit
        return self.match.cache_unit

    @property
    def row_unit(self) -> int:     # bytes per token-row unit
        return self.match.row_unit

    def _tail_args(self, hidden_bytes: int, rows_offset_bytes: int) -> tuple:
        m = self.match
        return (*m.geometry, hidden_bytes // m.row_unit, rows_offset_bytes // m.row_unit, *m.tail)


class Detiler(_BlockMover):
    """Copies whole blocks of one plane into token rows [T, hidden] of an object plane (stores)."""

    def __call__(self, cache: np.ndarray, rows: np.ndarray, blocks: np.ndarray, hidden_bytes: int,
                 rows_offset_bytes: int):
        self.match.detile(cache, rows, blocks, *self._tail_args(hidden_bytes, rows_offset_bytes))


class Tiler(_BlockMover):
    """The inverse of a Detiler: token rows of an object plane -> whole blocks of one plane (loads).

    Writes every byte of the blocks it is given and nothing else."""

    def __call__(self, rows: np.ndarray, cache: np.ndarray, blocks: np.ndarray, hidden_bytes: int,
                 rows_offset_bytes: int):
        self.match.tile(rows, cache, blocks, *self._tail_args(hidden_bytes, rows_offset_bytes))


def make_detiler(view: BlockView, elem: int, heads: int) -> Detiler | None:
    """A compiled de-tiler for this plane (`elem` bytes per element), or None (use torch)."""
    m = _match(view, elem, heads)
    return None if m is None else Detiler(m)


def make_tiler(view: BlockView, elem: int, heads: int) -> Tiler | None:
    """A compiled tiler (the de-tiler's inverse) for this plane, or None (keep the other load path)."""
    m = _match(view, elem, heads)
    return None if m is None else Tiler(m)


def _match(view: BlockView, elem: int, heads: int) -> _Match | None:
    kernels = load_kernels()
    if kernels is None:
        return None
    (n_o1, n_o0, n_h, n_d1, n_d0), (s_o1, s_o0, s_h, s_d1, s_d0) = view.shape, view.strides
    if n_h != heads:
        return None
    starts = (view.offset, view.block_stride, s_h, s_o1)

    def units(unit_bytes: int, *elems: int) -> list[int] | None:
        out = []
        for e in elems:
            if (e * elem) % unit_bytes:
                return None
            out.append(e * elem // unit_bytes)
        return out

    # tiles: per (block, head, o1) [R dim units][C tokens], unit = d0 contiguous dims (d1 > 1) or one dim
    if n_d1 > 1 and s_d0 == 1 and s_o0 == n_d0 and s_d1 == n_o0 * n_d0:
        unit, rows_, cols = n_d0 * elem, n_d1, n_o0
    elif n_d1 == 1 and n_o1 == 1 and s_o0 == 1 and s_d0 == n_o0:
        unit, rows_, cols = elem, n_d0, n_o0
    else:
        unit = 0
    if unit in (2, 4) and cols % (8 // unit) == 0 and rows_ % (8 // unit) == 0:
        words = units(8, *starts)
        if words is not None:
            off, bstride, hstride, o1stride = words
            detile, tile = ((kernels.tiles_16, kernels.untiles_16) if unit == 2
                            else (kernels.tiles_32, kernels.untiles_32))
            return _Match("tiles", 8, 8, detile, tile, (bstride, hstride, off, n_o1, o1stride, rows_, cols, heads))
    # token pairs: o0 == 2 adjacent, dims d0 at stride 2
    if n_o0 == 2 and s_o0 == 1 and s_d0 == 2 and elem in (1, 2, 4):
        pair = 2 * elem
        found = units(pair, *starts, s_d1)
        if found is not None and s_o1 * elem % pair == 0:
            off, bstride, hstride, o1stride, d1stride = found
            shift = _UNSIGNED[pair](8 * elem)
            return _Match("token_pairs", pair, elem, kernels.token_pairs, kernels.join_token_pairs,
                          (bstride, hstride, off, n_o1, o1stride, n_d1, d1stride, n_d0, heads), (shift,))
    # rows: one row of D contiguous elements per (block, head, token)
    if n_o1 == 1 and n_d1 == 1 and s_d0 == 1:
        return _Match("rows", elem, elem, kernels.token_rows, kernels.untoken_rows,
                      (view.block_stride, s_h, view.offset, n_o0, s_o0, heads, n_d0))
    return None
