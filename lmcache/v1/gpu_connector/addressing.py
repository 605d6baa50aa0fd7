"""Addressing one K or V plane of a paged KV cache as a table of rows.

Every supported layout, contiguous or not, packed or not, comes down to this:
inside one block, element (token o, hidden index j) of a plane sits at a fixed
offset `addr[o, j]` from the block's start, and block b starts `b * block_stride`
elements from the tensor's start. We pick the widest run length `w` (a divisor
of the hidden size) such that each token's hidden vector is made of runs of `w`
consecutive elements starting at multiples of `w`; the plane is then a table of
rows of `w` elements (a strided view of the same memory, never a copy), and a
token's hidden vector is rows `block * block_rows + token_rows[o]`.

A whole batch then moves with one index_select (gather) or one index_copy_
(scatter) per layer and plane over those row numbers.

Where `addr` is affine in the digits of the token offset and of the head dim
(o = o1*r + o0, d = d1*q + d0: true of every layout we know, including the tiled
ones vLLM's CPU kernel writes), a whole block is also a strided view
[o1, o0, H, d1, d0] whose row-major order is the canonical [N, H*D]: complete
blocks then move with one index_select over block numbers, without per-element
indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BlockView:
    """A block of one plane as a strided view whose row-major order is canonical [N, H*D]."""

    shape: tuple[int, ...]     # (o1, o0, H, d1, d0)
    strides: tuple[int, ...]
    offset: int                # from the tensor's start to the plane's element (0, 0)
    block_stride: int
    num_blocks: int

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """[num_blocks, *shape] view of `t`'s plane (no copy)."""
        return t.as_strided((self.num_blocks, *self.shape), (self.block_stride, *self.strides),
                            t.storage_offset() + self.offset)


@dataclass(frozen=True)
class PlaneAddressing:
    width: int                 # elements per row
    block_rows: int            # rows from one block to the next
    token_rows: torch.Tensor   # [block_size, hidden // width] int64: row offsets inside a block
    num_rows: int              # rows the table spans for all blocks
    block_view: BlockView | None = None
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def rows_per_token(self) -> int:
        return int(self.token_rows.shape[1])

    @property
    def block_size(self) -> int:
        return int(self.token_rows.shape[0])

    def rows_for(self, slots: torch.Tensor) -> torch.Tensor:
        """Row numbers [len(slots), rows_per_token] of the tokens in `slots` (all >= 0)."""
        token_rows = self._token_rows_on(slots.device)
        blocks = torch.div(slots, self.block_size, rounding_mode="floor")
        offsets = slots - blocks * self.block_size
        return (blocks * self.block_rows).unsqueeze(1) + token_rows.index_select(0, offsets)

    def _token_rows_on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        cached = self._on_device.get(key)
        if cached is None:
            cached = self.token_rows.to(device)
            self._on_device[key] = cached
        return cached

    def table(self, t: torch.Tensor) -> torch.Tensor:
        """The plane of `t` as a [num_rows, width] view (no copy)."""
        if t.is_contiguous():
            return t.view(-1, self.width)[: self.num_rows]
        return t.as_strided((self.num_rows, self.width), (self.width, 1))


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _block_view(addr: torch.Tensor, heads: int, block_stride: int, num_blocks: int) -> BlockView | None:
    """The mixed-radix affine form of addr[o, h*D + d], if it has one (see module doc)."""
    block_size, hidden = addr.shape
    head_size = hidden // heads
    a = addr.view(block_size, heads, head_size)
    base = int(a[0, 0, 0])
    o = torch.arange(block_size).view(-1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1)
    d = torch.arange(head_size).view(1, 1, -1)
    s_h = int(a[0, 1, 0]) - base if heads > 1 else 0
    for r in _divisors_descending(block_size):
        for q in _divisors_descending(head_size):
            s_o0 = int(a[1, 0, 0]) - base if r > 1 else 0
            s_o1 = int(a[r, 0, 0]) - base if r < block_size else 0
            s_d0 = int(a[0, 0, 1]) - base if q > 1 else 0
            s_d1 = int(a[0, 0, q]) - base if q < head_size else 0
            strides = (s_o1, s_o0, s_h, s_d1, s_d0)
            if min(strides) < 0:
                continue
            predicted = base + (o // r) * s_o1 + (o % r) * s_o0 + h * s_h + (d // q) * s_d1 + (d % q) * s_d0
            if torch.equal(predicted, a):
                shape = (block_size // r, r, heads, head_size // q, q)
                return BlockView(shape, strides, base, block_stride, num_blocks)
    return None


def plane_addressing(addr: torch.Tensor, block_stride: int, num_blocks: int, heads: int = 1) -> PlaneAddressing:
    """Addressing for a plane whose element (o, h*D + d) of block b is at b*block_stride + addr[o, h*D + d]."""
    if addr.dim() != 2 or addr.shape[1] % heads:
        raise ValueError(f"addresses must be [block_size, heads*head_size], got shape {tuple(addr.shape)}")
    addr = addr.to(torch.int64)
    block_size, hidden = addr.shape
    block_view = _block_view(addr, heads, block_stride, num_blocks) if block_stride > 0 else None
    for width in _divisors_descending(hidden):
        if block_stride % width:
            continue
        runs = addr.view(block_size, hidden // width, width)
        starts = runs[:, :, 0]
        if bool((starts % width != 0).any()):
            continue
        if width > 1 and not torch.equal(runs, starts.unsqueeze(2) + torch.arange(width)):
            continue
        token_rows = starts // width
        block_rows = block_stride // width
        num_rows = (num_blocks - 1) * block_rows + int(token_rows.max()) + 1
        return PlaneAddressing(width, block_rows, token_rows.contiguous(), num_rows, block_view)
    raise AssertionError("width 1 always fits")  # pragma: no cover
