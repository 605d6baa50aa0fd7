"""Whole blocks of vLLM's CPU attention cache kept in its own byte order ("native blocks").

vLLM's CPU kernel tiles K and V inside each (block, head) region (attn_packing.py),
so turning a block into per-token rows is a transpose, which cannot stream like a
copy. With native blocks a memory object holds, for every whole block of its chunk,
that block's bytes exactly as the cache holds them, and a store or load of such a
block is one contiguous copy per plane half (memcpy speed, no tiling work at all:
block_copies.py, or index_select / numpy without numba).

The format, per memory object of T tokens ([2, L, T, H*D], as KV_2LTD), per layer l:

  positions j*N .. j*N+N-1 for j < T // N (N = block size): the cache block region
      [H, 2N, D] that held those tokens, its first half in plane 0 rows
      [j*N, (j+1)*N) and its second half in plane 1 rows [j*N, (j+1)*N);
  positions T // N * N .. T-1 (a partly filled last block): plain per-token K (plane 0)
      and V (plane 1), as in the portable format.

The bytes depend on the tiling vLLM picked (ISA, block size, dtype), so `tag` names it
(with a hash of the probed positions) and goes into the cache keys: such objects are
only ever found by instances with the same tiling. The portable format (plain
per-token K/V for every token) stays available for sharing with CUDA and Gaudi.

Tokens of a native position whose slots are not one whole block in order (padding,
a chunk that does not start on a block boundary) go through plain rows and the
probed positions (`to_plain` / `from_plain`): slower, exact, rare in vLLM.
"""

from __future__ import annotations

import hashlib
import itertools

import torch

from lmcache.v1.gpu_connector.cpu.block_copies import WholeBlockCopier
from lmcache.v1.gpu_connector.cpu.threads import run_threaded
from lmcache.v1.gpu_connector.layouts import KVLayout, LayoutKind
from lmcache.v1.gpu_connector.transfer_plan import (
    check_batch, check_object, host_slot_mapping, leading_full_blocks, object_tensor, raw_view,
)


class NativeBlocks:
    """The geometry of native blocks for one registered cpu_attn layout."""

    def __init__(self, layout: KVLayout, addresses: list[torch.Tensor]):
        self.block_size = layout.block_size
        self.hidden = layout.hidden
        self.half = layout.block_size * layout.hidden  # elements of one plane's share of a block
        # per layer: [num_blocks, 2, half] (raw integer view of the contiguous layer)
        self.halves = [raw_view(tensors[0]).view(layout.num_blocks, 2, self.half) for tensors in layout.plane_tensors]
        self.addresses = addresses  # per plane: [N * hidden] element offsets of token rows inside a block
        # whole blocks as one memcpy per plane half (None without numba: index_select / numpy)
        self.copier = WholeBlockCopier.for_planes([[h[:, 0], h[:, 1]] for h in self.halves])
        digest = hashlib.blake2b(digest_size=6)
        for a in addresses:
            digest.update(a.numpy().tobytes())
        packing = layout.cpu_attn_packing
        isa = packing.isa if packing is not None else "cpu"
        dtype = str(layout.dtype).removeprefix("torch.")
        self.tag = f"cpu_native_{isa}_b{layout.block_size}_{dtype}_{digest.hexdigest()}"

    @classmethod
    def for_layout(cls, layout: KVLayout) -> "NativeBlocks | None":
        """Native blocks for a cpu_attn layout on CPU whose block regions are exactly K + V; else None."""
        if layout.kind is not LayoutKind.CPU_ATTN or layout.device.type != "cpu" or layout.num_planes != 2:
            return None
        region = 2 * layout.block_size * layout.hidden
        for tensors in layout.plane_tensors:
            t = tensors[0]
            if not t.is_contiguous() or t.numel() != layout.num_blocks * region:
                return None
        addresses = []
        for plane in layout.planes:
            if plane.block_rows * plane.width != region:
                return None
            offsets = plane.token_rows.unsqueeze(2) * plane.width + torch.arange(plane.width)
            addresses.append(offsets.reshape(-1).contiguous())
        covered = torch.cat(addresses).sort().values
        if not torch.equal(covered, torch.arange(region)):
            return None  # the two planes do not tile the region exactly: bytes outside K/V
        return cls(layout, addresses)

    # -- one block region <-> plain rows (the slow, exact path) -----------------
    def to_plain(self, slab: torch.Tensor) -> torch.Tensor:
        """[2, N, hidden] raw plain K/V rows of a native block held as slab [2, N, hidden]."""
        region = slab.reshape(-1)
        return torch.stack([region[a].view(self.block_size, self.hidden) for a in self.addresses])

    def from_plain(self, plain: torch.Tensor, slab: torch.Tensor) -> None:
        """Write plain rows [2, N, hidden] into slab [2, N, hidden] (a native block) in place."""
        region = torch.empty(2 * self.half, dtype=slab.dtype)
        for plane, a in enumerate(self.addresses):
            region[a] = plain[plane].reshape(-1)
        slab.copy_(region.view(slab.shape))

    # -- batches ------------------------------------------------------------------
    def plan(self, layout: KVLayout, memory_objs, starts, ends, slot_mapping) -> list["NativeJob"]:
        """Split each object of a batch into whole blocks moved as blocks, and tokens moved as rows."""
        check_batch(memory_objs, starts, ends)
        slots = host_slot_mapping(slot_mapping)
        n_size = self.block_size
        jobs = []
        for i, (obj, start, end) in enumerate(zip(memory_objs, starts, ends)):
            tensor = object_tensor(obj)
            start, end = int(start), int(end)
            check_object(layout, i, tensor, start, end, slots.numel())
            segment = slots[start:end]
            count = end - start
            whole = tensor.shape[2] // n_size * n_size  # positions before this are native
            native_end = min(count, whole)
            lead = leading_full_blocks(segment[: native_end // n_size * n_size], n_size)
            if lead is not None and int(lead.max()) >= layout.num_blocks:
                raise ValueError(
                    f"block {int(lead.max())} is out of range: the paged cache has {layout.num_blocks} blocks"
                )
            job = NativeJob(raw_view(tensor), lead)
            first_odd = 0 if lead is None else lead.numel()
            for j in range(first_odd, -(-native_end // n_size)):
                piece = segment[j * n_size: min((j + 1) * n_size, native_end)]
                if bool((piece >= 0).any()):
                    padded = torch.full((n_size,), -1, dtype=torch.int64)
                    padded[: piece.numel()] = piece
                    job.odd.append((j, padded))
            if count > whole and bool((segment[whole:] >= 0).any()):
                job.tail = (whole, segment[whole:])
            jobs.append(job)
        return jobs

    def store(self, jobs: list["NativeJob"], plain_store, dtype: torch.dtype) -> None:
        """Paged cache -> objects. plain_store(objs, starts, ends, slot_mapping=...) is the
        portable path, used for the tokens that are not whole blocks."""
        direct = [job for job in jobs if job.lead is not None]
        if direct and self.copier is not None:
            self.copier.store([(job.tensor, job.lead.numpy()) for job in direct])
        else:
            for job in direct:
                for layer, halves in enumerate(self.halves):
                    for plane in (0, 1):
                        out = torch.from_numpy(self._lead_rows(job, plane, layer))
                        torch.index_select(halves[:, plane], 0, job.lead, out=out)
        temps, writebacks = self._plain_temps(jobs)
        if temps:
            self._move_plain(temps, plain_store, dtype)
        n_size = self.block_size
        for job, (kind, position), temp in writebacks:
            if kind == "block":  # plain rows -> the block's bytes at native position `position`
                for layer in range(temp.shape[1]):
                    self.from_plain(temp[:, layer], job.tensor[:, layer, position * n_size: (position + 1) * n_size])
            else:  # plain rows from position `position` on
                job.tensor[:, :, position: position + temp.shape[2]].copy_(temp)

    def load(self, jobs: list["NativeJob"], plain_load, dtype: torch.dtype) -> None:
        """Objects -> paged cache (plain_load as in store)."""
        direct = [job for job in jobs if job.lead is not None]
        if direct and self.copier is not None:
            self.copier.load([(job.tensor, job.lead.numpy()) for job in direct])
        elif direct:
            def load_layer(layer: int) -> None:
                halves = self.halves[layer].numpy()
                for job in direct:
                    blocks = job.lead.numpy()
                    for plane in (0, 1):
                        halves[blocks, plane] = self._lead_rows(job, plane, layer)

            run_threaded([(load_layer, layer) for layer in range(len(self.halves))])
        temps, _ = self._plain_temps(jobs)
        if temps:
            self._move_plain(temps, plain_load, dtype)

    def _lead_rows(self, job: "NativeJob", plane: int, layer: int):
        """The object's whole-block rows of one plane and layer as numpy [k, half] (no copy)."""
        k = job.lead.numel()
        return job.tensor[plane, layer, : k * self.block_size].numpy().reshape(k, self.half)

    def _plain_temps(self, jobs: list["NativeJob"]) -> tuple[list, list]:
        """Plain-row copies of what does not move as whole blocks: (temp [2, L, n, hidden] raw,
        its slots) pairs, and (job, ("block", j) or ("rows", first position), temp) for writing
        them back into the objects."""
        temps, writebacks = [], []
        for job in jobs:
            n_size = self.block_size
            for j, slots in job.odd:
                slab = job.tensor[:, :, j * n_size: (j + 1) * n_size]
                temp = torch.stack([self.to_plain(slab[:, layer]) for layer in range(slab.shape[1])], dim=1)
                temps.append((temp, slots))
                writebacks.append((job, ("block", j), temp))
            if job.tail is not None:
                first, slots = job.tail
                temp = job.tensor[:, :, first: first + slots.numel()].clone()
                temps.append((temp, slots))
                writebacks.append((job, ("rows", first), temp))
        return temps, writebacks

    @staticmethod
    def _move_plain(temps: list, move, dtype: torch.dtype) -> None:
        objs = [temp.view(dtype) for temp, _ in temps]
        ends = list(itertools.accumulate(slots.numel() for _, slots in temps))
        starts = [0] + ends[:-1]
        move(objs, starts, ends, slot_mapping=torch.cat([slots for _, slots in temps]))


class NativeJob:
    """One memory object of a native batch."""

    __slots__ = ("tensor", "lead", "odd", "tail")

    def __init__(self, tensor: torch.Tensor, lead: torch.Tensor | None):
        self.tensor = tensor            # the object's tensor, raw integer view [2, L, T, hidden]
        self.lead = lead                # cache blocks of positions 0 .. k*N-1, moved as blocks
        self.odd: list[tuple[int, torch.Tensor]] = []   # other native positions j: slots [N] (-1: none)
        self.tail: tuple[int, torch.Tensor] | None = None  # (first plain position, its slots)
