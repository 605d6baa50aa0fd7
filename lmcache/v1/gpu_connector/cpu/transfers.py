"""The CPU device's batched and per-layer transfers (vLLM's CPU backend and any KV on host).

The memory objects are the destination (store) or the source (load): no staging,
no extra copy. Per batch:

  whole blocks   made of runs of at least 64 bytes (the whole block for vllm-gaudi's
                 K and V and MLA, one head of one token for CUDA's flash-attention
                 layout): memcpys of those runs from a compiled loop over threads
                 (block_copies.py, where numba is present);
  cpu_attn       whole blocks of vLLM's CPU attention layout de-tiled (stores) or
                 tiled (loads) by compiled loops where numba is present
                 (attn_detile.py), or, with native blocks, kept in vLLM's own byte
                 order (native_blocks.py); the other tokens of a load written by
                 vLLM's own kernel (attn_packing.writer; numpy where that kernel
                 would not be bit-exact);
  the rest       per layer and plane an index_select straight into each object's
                 slice (stores), one numpy fancy assignment per object (loads,
                 several times faster than torch's CPU index_copy_), layers spread
                 over torch's threads (threads.py).

It is the CPU's `Transfers` (transfers.py): `store` / `load` for a batch, and
`store_layers` / `load_layers` (one layer per next()) for the layerwise connector.
"""

from __future__ import annotations

import logging
from typing import Any, Generator, Sequence

import torch

from lmcache.v1.gpu_connector.cpu.block_copies import WholeBlockCopier
from lmcache.v1.gpu_connector.cpu.threads import run_threaded
from lmcache.v1.gpu_connector.layouts import KVLayout
from lmcache.v1.gpu_connector.transfer_plan import BatchPlan, ObjectPart, plan_batch, raw_view

logger = logging.getLogger(__name__)


def part_units(part: ObjectPart, itemsize: int):
    """The object's bytes as a flat numpy array of unsigned `itemsize`-byte units (cached, no copy)."""
    found = part.scratch.get(itemsize)
    if found is None:
        from lmcache.v1.gpu_connector.cpu.attn_detile import flat_unsigned

        found = part.scratch[itemsize] = flat_unsigned(part.tensor, itemsize)
    return found


def lead_blocks_numpy(part: ObjectPart):
    """The part's leading whole blocks as a numpy array (cached), or None."""
    found = part.scratch.get("blocks")
    if found is None and part.lead_blocks is not None:
        found = part.scratch["blocks"] = part.lead_blocks.numpy()
    return found


class CpuTransfers:
    """Paged KV on the host <-> memory objects, for one registered layout."""

    def __init__(self, layout: KVLayout, platform=None, native_blocks: bool = False):
        self.layout = layout
        self.platform = platform  # synchronized after each batch (a no-op for KV on the host)
        self._tables = [[plane.table(raw_view(t)) for plane, t in zip(layout.planes, tensors)]
                        for tensors in layout.plane_tensors]
        self._np_tables = [[table.numpy() for table in per_layer] for per_layer in self._tables]
        # complete blocks move as blocks (see addressing.py), the rest as rows
        self._block_views: list[list] = [[None] * layout.num_planes for _ in range(layout.num_layers)]
        self._np_block_views: list[list] = [[None] * layout.num_planes for _ in range(layout.num_layers)]
        for layer, tensors in enumerate(layout.plane_tensors):
            for p, (plane, t) in enumerate(zip(layout.planes, tensors)):
                if plane.block_view is not None:
                    view = plane.block_view.view(raw_view(t))
                    self._block_views[layer][p] = view
                    self._np_block_views[layer][p] = view.numpy()
        # whole blocks as memcpys of runs, where their runs are long (block_copies.py)
        self._whole_blocks = WholeBlockCopier.for_planes(self._block_views)
        # cpu_attn: compiled de-tiling of whole blocks per plane (None: the torch block view path)
        self.detilers: list = [None] * layout.num_planes
        # and their inverses, for loads of whole blocks (None: vLLM's kernel or the numpy path)
        self.tilers: list = [None] * layout.num_planes
        self._np_layers: list[list] = [[None] * layout.num_planes for _ in range(layout.num_layers)]
        self._kernel_writer = None
        if layout.cpu_attn_packing is not None:
            self._setup_detilers()
            # vLLM's own CPU kernel writes its tiled layout several times faster than any
            # torch indexing can (it is the writer the layout is defined by).
            self._kernel_writer = layout.cpu_attn_packing.writer(layout.dtype)
        # cpu_attn: whole blocks kept in vLLM's own byte order (native_blocks.py), when asked for
        self.native = None
        if native_blocks:
            from lmcache.v1.gpu_connector.cpu.native_blocks import NativeBlocks

            self.native = NativeBlocks.for_layout(layout)

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def host_format_tag(self) -> str:
        return self.native.tag if self.native is not None else ""

    # -- batches ------------------------------------------------------------------
    def store(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
              slot_mapping: torch.Tensor) -> None:
        """Paged cache -> memory objects, a whole batch."""
        if self.native is not None:
            jobs = self.native.plan(self.layout, memory_objs, starts, ends, slot_mapping)
            self.native.store(jobs, self._portable_store, self.layout.dtype)
        else:
            self._portable_store(memory_objs, starts, ends, slot_mapping=slot_mapping)
        self._synchronize()

    def load(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
             slot_mapping: torch.Tensor) -> None:
        """Memory objects -> paged cache, a whole batch."""
        if self.native is not None:
            jobs = self.native.plan(self.layout, memory_objs, starts, ends, slot_mapping)
            self.native.load(jobs, self._portable_load, self.layout.dtype)
        else:
            self._portable_load(memory_objs, starts, ends, slot_mapping=slot_mapping)
        self._synchronize()

    def store_layers(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
                     slot_mapping: torch.Tensor) -> Generator:
        """Per layer, in the portable per-token format (no stream to overlap with: each
        next() moves its layer directly)."""
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        for layer in range(self.num_layers):
            if plan.parts:
                self.store_layer(plan, layer)
            yield
        self._synchronize()
        yield

    def load_layers(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int],
                    slot_mapping: torch.Tensor) -> Generator:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        for layer in range(self.num_layers):
            if plan.parts:
                self.load_layer(plan, layer)
            yield
        self._synchronize()
        yield

    def _synchronize(self) -> None:
        if self.platform is not None:
            self.platform.synchronize()

    def _portable_store(self, memory_objs, starts, ends, *, slot_mapping) -> None:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        if not plan.parts:
            return
        whole_blocks_done = self._move_whole_blocks(plan, store=True)
        for layer in range(self.num_layers):
            self.store_layer(plan, layer, whole_blocks_done)

    def _portable_load(self, memory_objs, starts, ends, *, slot_mapping) -> None:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        if not plan.parts:
            return
        # Layers write disjoint parts of the cache and the copies release the GIL:
        # spread them over torch's thread count, as a memcpy of the same bytes would be.
        whole_blocks_done = self._move_whole_blocks(plan, store=False)
        run_threaded([(self.load_layer, plan, layer, whole_blocks_done) for layer in range(self.num_layers)])

    def _move_whole_blocks(self, plan: BatchPlan, store: bool) -> set[int]:
        """Store (or load) the leading whole blocks of every part as memcpys of runs, where the
        planes allow it (block_copies.py); returns the indices of the parts so done."""
        if self._whole_blocks is None:
            return set()
        done = [i for i, part in enumerate(plan.parts) if part.lead_blocks is not None]
        pairs = [(plan.parts[i].tensor, lead_blocks_numpy(plan.parts[i])) for i in done]
        if store:
            self._whole_blocks.store(pairs)
        else:
            self._whole_blocks.load(pairs)
        return set(done)

    def _setup_detilers(self) -> None:
        from lmcache.v1.gpu_connector.cpu.attn_detile import flat_unsigned, make_detiler, make_tiler

        layers = [tensors[0] for tensors in self.layout.plane_tensors]
        if not all(t.is_contiguous() and t.data_ptr() % 8 == 0 for t in layers):
            return
        heads = int(layers[0].shape[1])
        elem = self.layout.dtype.itemsize
        detilers = [make_detiler(plane.block_view, elem, heads) if plane.block_view is not None else None
                    for plane in self.layout.planes]
        if any(d is None for d in detilers):
            return
        self.detilers = detilers
        self.tilers = [make_tiler(plane.block_view, elem, heads) for plane in self.layout.planes]
        for layer, t in enumerate(layers):
            self._np_layers[layer] = [flat_unsigned(t, d.cache_unit) for d in detilers]
        logger.debug("cpu_attn blocks (de-)tiled by compiled loops: %s", [d.kind for d in detilers])

    # -- one layer ----------------------------------------------------------------
    def store_layer(self, plan: BatchPlan, layer: int, whole_blocks_done: set[int] = frozenset()) -> None:
        device = self.layout.device
        compiled: list = []   # whole-block de-tiling calls, run together (in threads) at the end
        for plane_index, (plane, table) in enumerate(zip(self.layout.planes, self._tables[layer])):
            blocks = self._block_views[layer][plane_index]
            detiler = self.detilers[plane_index]
            for index, part in enumerate(plan.parts):
                dst = raw_view(part.tensor)[plane_index, layer]
                done = 0
                if index in whole_blocks_done:
                    done = part.lead_tokens
                elif detiler is not None and part.lead_blocks is not None and part.tensor.data_ptr() % 8 == 0:
                    done = part.lead_tokens
                    tokens, hidden_bytes = part.tensor.shape[2], self.layout.hidden * self.layout.dtype.itemsize
                    offset = (plane_index * self.num_layers + layer) * tokens * hidden_bytes
                    compiled.append((detiler, self._np_layers[layer][plane_index], part_units(part, detiler.row_unit),
                                     lead_blocks_numpy(part), hidden_bytes, offset))
                elif blocks is not None and part.lead_blocks is not None:
                    done = part.lead_tokens
                    out = dst[:done].view(part.lead_blocks.numel(), *plane.block_view.shape)
                    torch.index_select(blocks, 0, part.lead_blocks, out=out)
                if done == part.count:
                    continue
                # row numbers only where a part has tokens outside whole blocks (they can be large:
                # one int64 per row of `plane.width` elements)
                rows = plan.rows(plane_index, device)
                part_rows = rows[part.first + done: part.first + part.count].reshape(-1)
                if part.positions is None:
                    torch.index_select(table, 0, part_rows, out=dst[done: part.count].view(-1, plane.width))
                else:
                    gathered = torch.index_select(table, 0, part_rows)
                    dst.index_copy_(0, part.positions, gathered.view(part.count, -1))
        if compiled:
            run_threaded(compiled)

    def load_layer(self, plan: BatchPlan, layer: int, whole_blocks_done: set[int] = frozenset()) -> None:
        tiled = self._tile_lead_blocks(plan, layer, whole_blocks_done)
        if self._kernel_writer is not None:
            self._kernel_load_layer(plan, layer, tiled)
            return
        device = self.layout.device
        for plane_index, (plane, table) in enumerate(zip(self.layout.planes, self._np_tables[layer])):
            blocks = self._np_block_views[layer][plane_index]
            for part, done in zip(plan.parts, tiled):
                src = raw_view(part.tensor)[plane_index, layer].numpy()
                if not done and blocks is not None and part.lead_blocks is not None:
                    done = part.lead_tokens
                    blocks[part.lead_blocks.numpy()] = src[:done].reshape(-1, *plane.block_view.shape)
                if done == part.count:
                    continue
                rows = plan.rows(plane_index, device)
                part_rows = rows[part.first + done: part.first + part.count].reshape(-1).numpy()
                src = src[done: part.count] if part.positions is None else src[part.positions.numpy()]
                table[part_rows] = src.reshape(-1, plane.width)

    def _tile_lead_blocks(self, plan: BatchPlan, layer: int, whole_blocks_done: set[int]) -> list[int]:
        """Write each part's leading whole blocks with the compiled tilers (all planes, or none),
        except the parts whose whole blocks are already in (whole_blocks_done); returns the
        tokens written by either per part (0 where the other path has them all)."""
        tiled = [plan.parts[i].lead_tokens if i in whole_blocks_done else 0 for i in range(len(plan.parts))]
        if any(t is None for t in self.tilers):
            return tiled
        hidden_bytes = self.layout.hidden * self.layout.dtype.itemsize
        for i, part in enumerate(plan.parts):
            if tiled[i] or part.lead_blocks is None or part.tensor.data_ptr() % 8:
                continue
            tokens = part.tensor.shape[2]
            blocks = lead_blocks_numpy(part)
            for plane_index, tiler in enumerate(self.tilers):
                offset = (plane_index * self.num_layers + layer) * tokens * hidden_bytes
                tiler(part_units(part, tiler.row_unit), self._np_layers[layer][plane_index], blocks, hidden_bytes,
                      offset)
            tiled[i] = part.lead_tokens
        return tiled

    def _kernel_load_layer(self, plan: BatchPlan, layer: int, tiled: list[int]) -> None:
        """vLLM's kernel for the tokens the tilers did not write (it touches only those tokens' slots)."""
        cache = self.layout.plane_tensors[layer][0]
        heads = cache.shape[1]
        for part, done in zip(plan.parts, tiled):
            if done == part.count:
                continue
            planes = part.tensor[:, layer]
            if part.positions is None:
                planes = planes[:, done: part.count]
            else:
                planes = planes.index_select(1, part.positions)
            count = part.count - done
            key, value = (planes[p].view(count, heads, -1) for p in (0, 1))
            self._kernel_writer(cache, key, value, plan.slots[part.first + done: part.first + part.count])
