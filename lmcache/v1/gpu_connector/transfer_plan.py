"""One batched transfer, worked out on the host before any device work.

Memory object i holds the tokens whose slots are slot_mapping[starts[i]:ends[i]],
at positions 0 .. ends[i]-starts[i]-1. Slots < 0 are padding: they are dropped
here, so the paged cache never sees them. The valid slots of all objects are
concatenated into one list, so each layer moves with one gather or scatter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from lmcache.v1.gpu_connector.layouts import KVLayout

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_RAW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw_view(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as integers of the same width (bit-exact moves; fp8 where index kernels lack it)."""
    return t.view(_RAW_DTYPES[t.element_size()])


@dataclass
class ObjectPart:
    tensor: torch.Tensor            # the memory object's host tensor [P, L, T, hidden]
    first: int                      # where its valid tokens start in the concatenated list
    count: int                      # how many valid tokens it has
    positions: torch.Tensor | None  # their token positions in the object, None for 0..count-1
    # complete blocks at the start of a dense part, in order (their tokens are positions
    # 0 .. len*block_size-1): they can move as whole blocks
    lead_blocks: torch.Tensor | None = None

    @property
    def lead_tokens(self) -> int:
        return 0 if self.lead_blocks is None else int(self.lead_blocks.numel()) * self._block_size

    _block_size: int = 0
    # per-part values a device's fast paths compute once (e.g. numpy views on CPU)
    scratch: dict = field(default_factory=dict, repr=False)


@dataclass
class BatchPlan:
    layout: KVLayout
    parts: list[ObjectPart]
    slots: torch.Tensor             # host int64, the valid slots of all parts, concatenated
    _rows: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(self.slots.numel())

    def rows(self, plane: int, device: torch.device) -> torch.Tensor:
        """Row numbers [total, rows_per_token] of plane `plane`, on `device` (computed once)."""
        key = (plane, str(device))
        rows = self._rows.get(key)
        if rows is None:
            rows = self.layout.planes[plane].rows_for(self.slots_on(device))
            self._rows[key] = rows
        return rows

    def slots_on(self, device: torch.device) -> torch.Tensor:
        key = ("slots", str(device))
        slots = self._rows.get(key)
        if slots is None:
            slots = self.slots if device.type == "cpu" else self.slots.to(device, non_blocking=True)
            self._rows[key] = slots
        return slots


def object_tensor(obj: Any) -> torch.Tensor:
    tensor = getattr(obj, "tensor", obj)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a MemoryObj (or its tensor), got {type(obj).__name__}")
    return tensor


def host_slot_mapping(slot_mapping: Any) -> torch.Tensor:
    if not isinstance(slot_mapping, torch.Tensor):
        raise TypeError(f"slot_mapping must be a 1-D integer tensor, got {type(slot_mapping).__name__}")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in _INT_DTYPES:
        raise ValueError(
            f"slot_mapping must be ONE 1-D integer tensor (int64/int32), got shape "
            f"{tuple(slot_mapping.shape)} dtype {slot_mapping.dtype}"
        )
    if slot_mapping.device.type != "cpu":
        # A device slot mapping costs a device->host round trip; vLLM's adapter builds them on the host.
        slot_mapping = slot_mapping.to("cpu")
    return slot_mapping.to(torch.int64)


def check_batch(memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int]) -> None:
    if not (len(memory_objs) == len(starts) == len(ends)):
        raise ValueError(
            f"memory_objs, starts and ends must have one entry per object; got {len(memory_objs)}, "
            f"{len(starts)}, {len(ends)}"
        )


def check_object(layout: KVLayout, i: int, tensor: torch.Tensor, start: int, end: int, num_slots: int) -> None:
    """Object i fits the layout and its range [start, end) of the slot mapping."""
    if not 0 <= start <= end <= num_slots:
        raise ValueError(
            f"object {i}: start={start}, end={end} must satisfy 0 <= start <= end <= len(slot_mapping)={num_slots}"
        )
    expected = (layout.num_planes, layout.num_layers, layout.hidden)
    shape = tuple(tensor.shape)
    if tensor.dim() != 4 or (shape[0], shape[1], shape[3]) != expected or tensor.dtype != layout.dtype:
        raise ValueError(
            f"object {i}: tensor {list(shape)} {tensor.dtype} does not fit this connector: expected "
            f"[{expected[0]}, {expected[1]}, num_tokens, {expected[2]}] {layout.dtype}"
        )
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"object {i}: memory objects must be contiguous host tensors, got one on {tensor.device}")
    if end - start > shape[2]:
        raise ValueError(f"object {i}: {end - start} tokens do not fit its {shape[2]} token positions")


def plan_batch(
    layout: KVLayout,
    memory_objs: Sequence[Any],
    starts: Sequence[int],
    ends: Sequence[int],
    slot_mapping: Any,
) -> BatchPlan:
    check_batch(memory_objs, starts, ends)
    slots = host_slot_mapping(slot_mapping)
    parts: list[ObjectPart] = []
    pieces: list[torch.Tensor] = []
    first = 0
    for i, (obj, start, end) in enumerate(zip(memory_objs, starts, ends)):
        tensor = object_tensor(obj)
        start, end = int(start), int(end)
        check_object(layout, i, tensor, start, end, slots.numel())
        segment = slots[start:end]
        valid = segment >= 0
        count = int(valid.sum())
        if count == 0:
            continue
        if count == segment.numel():
            positions = None
            chosen = segment
        else:
            positions = valid.nonzero().squeeze(1)
            chosen = segment[positions]
        part = ObjectPart(tensor, first, count, positions)
        if positions is None:
            part.lead_blocks = leading_full_blocks(chosen, layout.block_size)
            part._block_size = layout.block_size
        parts.append(part)
        pieces.append(chosen)
        first += count
    all_slots = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
    if all_slots.numel() and int(all_slots.max()) >= layout.num_slots:
        raise ValueError(
            f"slot {int(all_slots.max())} is out of range: the paged cache has {layout.num_blocks} blocks "
            f"of {layout.block_size} = {layout.num_slots} slots"
        )
    return BatchPlan(layout, parts, all_slots)


def leading_full_blocks(slots: torch.Tensor, block_size: int) -> torch.Tensor | None:
    """Block ids of the complete, in-order blocks that `slots` starts with (None if none)."""
    whole = slots.numel() // block_size
    if whole == 0:
        return None
    grid = slots[: whole * block_size].view(whole, block_size)
    blocks = torch.div(grid[:, 0], block_size, rounding_mode="floor")
    complete = (grid == blocks.unsqueeze(1) * block_size + torch.arange(block_size)).all(dim=1)
    lead = int(complete.to(torch.int64).cumprod(0).sum())
    return blocks[:lead].contiguous() if lead else None
