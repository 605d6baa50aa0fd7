"""The batched paged connector: vLLM's paged KV cache <-> host memory objects.

One implementation for CUDA, Gaudi HPU and CPU; device specifics come only
from the Platform.

Store (paged -> host), for all objects of a batch at once:
  CPU     per layer and plane, an index_select straight into each object's
          slice (no staging, no extra copy: the objects are the destination);
          whole blocks made of runs of at least 64 bytes (the whole block for
          vllm-gaudi's K and V and MLA, one head of one token for CUDA's
          flash-attention layout) are memcpys of those runs, from a compiled
          loop over threads (block_copies.py, where numba is present);
          whole blocks of vLLM's CPU attention layout are de-tiled by compiled
          loops where numba is present (cpu_attn_detile.py), or, with
          native_blocks, kept in vLLM's own byte order (native_blocks.py).
  device  flush() (HPU lazy mode: run the graph that wrote the KV), then per
          layer and plane ONE index_select over the concatenated slots of all
          objects into a device staging buffer [layers, planes, tokens, hidden]
          (sized by `staging_bytes`, several layers at a time), then
          non_blocking device->host copies of each object's slice into its
          (pinned) host tensor; on CUDA all of it on a side stream that waits
          for the compute stream. One synchronize at the end.
Load (host -> paged): the mirror image; per layer and plane ONE index_copy_ on
the device (CPU: whole blocks of runs as in stores, the rest one numpy fancy
assignment per object, several times faster than torch's CPU index_copy_; layers
spread over torch's threads), then flush()
once (HPU lazy mode) and one synchronize. vLLM's CPU attention layout: whole
blocks are tiled by compiled loops (the de-tilers' inverses), the other tokens
written by vLLM's own kernel (or numpy where its kernel would not be bit-exact).

Bytes are moved through integer views of the same width (bit-exact, and fp8
works where the index kernels lack fp8), except on HPU, whose bridge kernels
get the native dtype.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import torch

from lmcache.platforms import Platform
from lmcache.v1.gpu_connector import GPUConnectorInterface
from lmcache.v1.gpu_connector.block_copies import WholeBlockCopier
from lmcache.v1.gpu_connector.cpu_threads import run_threaded
from lmcache.v1.gpu_connector.layouts import KVLayout
from lmcache.v1.gpu_connector.transfer_plan import BatchPlan, ObjectPart, plan_batch, raw_view
from lmcache.v1.memory import MemoryFormat

logger = logging.getLogger(__name__)

DEFAULT_STAGING_BYTES = 256 << 20

class VLLMPagedMemConnector(GPUConnectorInterface):
    """Batched connector for every supported layout (see layouts.py) and device."""

    def __init__(self, layout: KVLayout, platform: Platform, staging_bytes: int = DEFAULT_STAGING_BYTES,
                 native_blocks: bool = False):
        self.layout = layout
        self.platform = platform
        self.staging_bytes = int(staging_bytes)
        self._on_cpu = layout.device.type == "cpu"
        # HPU kernels get native dtypes; elsewhere integer views keep every bit and allow fp8.
        self._as_moved = (lambda t: t) if layout.device.type == "hpu" else raw_view
        self._tables = [
            [plane.table(self._as_moved(t)) for plane, t in zip(layout.planes, tensors)]
            for tensors in layout.plane_tensors
        ]
        self._np_tables = None
        self._block_views: list[list] = [[None] * layout.num_planes for _ in range(layout.num_layers)]
        self._np_block_views: list[list] = [[None] * layout.num_planes for _ in range(layout.num_layers)]
        self._kernel_writer = None
        self._whole_blocks = None  # CPU: whole blocks as memcpys of runs, where their runs are long (block_copies.py)
        # cpu_attn: compiled de-tiling of whole blocks per plane (None: the torch block view path)
        self._detilers: list = [None] * layout.num_planes
        # and their inverses, for loads of whole blocks (None: vLLM's kernel or the numpy path)
        self._tilers: list = [None] * layout.num_planes
        self._np_layers: list[list] = [[None] * layout.num_planes for _ in range(layout.num_layers)]
        if layout.cpu_attn_packing is not None and self._on_cpu:
            self._setup_detilers()
        if layout.cpu_attn_packing is not None:
            # vLLM's own CPU kernel writes its tiled layout several times faster than any
            # torch indexing can (it is the writer the layout is defined by).
            self._kernel_writer = layout.cpu_attn_packing.writer(layout.dtype)
        if self._on_cpu:
            # CPU moves complete blocks as blocks (see addressing.py) and the rest as rows.
            self._np_tables = [[table.numpy() for table in per_layer] for per_layer in self._tables]
            for layer, tensors in enumerate(layout.plane_tensors):
                for p, (plane, t) in enumerate(zip(layout.planes, tensors)):
                    if plane.block_view is not None:
                        view = plane.block_view.view(raw_view(t))
                        self._block_views[layer][p] = view
                        self._np_block_views[layer][p] = view.numpy()
            self._whole_blocks = WholeBlockCopier.for_planes(self._block_views)
        self._stream = None
        # cpu_attn: whole blocks kept in vLLM's own byte order (native_blocks.py), when asked for
        self._native = None
        if native_blocks:
            from lmcache.v1.gpu_connector.native_blocks import NativeBlocks

            self._native = NativeBlocks.for_layout(layout)

    def _move_whole_blocks(self, plan: BatchPlan, store: bool) -> set[int]:
        """Store (or load) the leading whole blocks of every part as memcpys of runs, where the
        planes allow it (block_copies.py); returns the indices of the parts so done."""
        if self._whole_blocks is None:
            return set()
        done = [i for i, part in enumerate(plan.parts) if part.lead_blocks is not None]
        pairs = [(plan.parts[i].tensor, plan.parts[i].lead_blocks_numpy()) for i in done]
        if store:
            self._whole_blocks.store(pairs)
        else:
            self._whole_blocks.load(pairs)
        return set(done)

    def _setup_detilers(self) -> None:
        from lmcache.v1.gpu_connector.cpu_attn_detile import flat_unsigned, make_detiler, make_tiler

        layers = [tensors[0] for tensors in self.layout.plane_tensors]
        if not all(t.is_contiguous() and t.data_ptr() % 8 == 0 for t in layers):
            return
        heads = int(layers[0].shape[1])
        elem = self.layout.dtype.itemsize
        detilers = [make_detiler(plane.block_view, elem, heads) if plane.block_view is not None else None
                    for plane in self.layout.planes]
        if any(d is None for d in detilers):
            return
        self._detilers = detilers
        self._tilers = [make_tiler(plane.block_view, elem, heads) for plane in self.layout.planes]
        for layer, t in enumerate(layers):
            self._np_layers[layer] = [flat_unsigned(t, d.cache_unit) for d in detilers]
        logger.debug("cpu_attn blocks (de-)tiled by compiled loops: %s", [d.kind for d in detilers])

    # -- what the engine asks -------------------------------------------------
    @property
    def memory_format(self) -> MemoryFormat:
        return self.layout.memory_format

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def layout_fingerprint(self) -> str:
        return self.layout.fingerprint

    @property
    def host_format_tag(self) -> str:
        """What the memory objects' bytes depend on beyond model, dtype and shape: "" for the
        portable per-token format, else the native block tiling (it goes into the cache keys)."""
        return self._native.tag if self._native is not None else ""

    @property
    def hidden_size(self) -> int:
        return self.layout.hidden

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size((self.layout.num_planes, self.layout.num_layers, int(num_tokens), self.layout.hidden))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layout.describe()})"

    # -- single object ----------------------------------------------------------
    def from_gpu(self, memory_obj: Any, start: int, end: int, *, slot_mapping: torch.Tensor, **kw: Any) -> None:
        self.batched_from_gpu([memory_obj], [start], [end], slot_mapping=slot_mapping, **kw)

    def to_gpu(self, memory_obj: Any, start: int, end: int, *, slot_mapping: torch.Tensor, **kw: Any) -> None:
        self.batched_to_gpu([memory_obj], [start], [end], slot_mapping=slot_mapping, **kw)

    # -- batches ------------------------------------------------------------------
    def batched_from_gpu(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                         slot_mapping: torch.Tensor, **kw: Any) -> None:
        if self._native is not None:
            jobs = self._native.plan(self.layout, memory_objs, starts, ends, slot_mapping)
            self._native.store(jobs, self._portable_from_gpu, self.layout.dtype)
            self.platform.synchronize()
            return
        self._portable_from_gpu(memory_objs, starts, ends, slot_mapping=slot_mapping)

    def batched_to_gpu(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                       slot_mapping: torch.Tensor, **kw: Any) -> None:
        if self._native is not None:
            jobs = self._native.plan(self.layout, memory_objs, starts, ends, slot_mapping)
            self._native.load(jobs, self._portable_to_gpu, self.layout.dtype)
            self.platform.synchronize()
            return
        self._portable_to_gpu(memory_objs, starts, ends, slot_mapping=slot_mapping)

    def _portable_from_gpu(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                           slot_mapping: torch.Tensor) -> None:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        if not plan.parts:
            return
        if self._on_cpu:
            whole_blocks_done = self._move_whole_blocks(plan, store=True)
            for layer in range(self.num_layers):
                self._cpu_store_layer(plan, layer, whole_blocks_done)
            self.platform.synchronize()
            return
        self.platform.flush()
        fixups: list = []
        with self._side_stream():
            for first, last in self._layer_groups(plan.total):
                staging = self._staging(last - first, plan.total)
                for layer in range(first, last):
                    self._gather_layer(plan, layer, staging[layer - first])
                for part in plan.parts:
                    self._staging_to_host(part, staging, first, last, fixups)
        self.platform.synchronize()
        _apply_fixups(fixups)

    def _portable_to_gpu(self, memory_objs: Sequence[Any], starts: Sequence[int], ends: Sequence[int], *,
                         slot_mapping: torch.Tensor) -> None:
        plan = plan_batch(self.layout, memory_objs, starts, ends, slot_mapping)
        if not plan.parts:
            return
        if self._on_cpu:
            # Layers write disjoint parts of the cache and the copies release the GIL:
            # spread them over torch's thread count, as a memcpy of the same bytes would be.
            whole_blocks_done = self._move_whole_blocks(plan, store=False)
            run_threaded([(self._cpu_load_layer, plan, layer, whole_blocks_done) for layer in range(self.num_layers)])
            self.platform.synchronize()
            return
        with self._side_stream():
            for first, last in self._layer_groups(plan.total):
                staging = self._staging(last - first, plan.total)
                for part in plan.parts:
                    self._host_to_staging(part, staging, first, last)
                for layer in range(first, last):
                    self._scatter_layer(plan, layer, staging[layer - first])
        self.platform.flush()
        self.platform.synchronize()

    # -- CPU: the memory objects are the destination, no staging ------------------
    def _cpu_store_layer(self, plan: BatchPlan, layer: int, whole_blocks_done: set[int] = frozenset()) -> None:
        device = self.layout.device
        compiled: list = []   # whole-block de-tiling calls, run together (in threads) at the end
        for plane_index, (plane, table) in enumerate(zip(self.layout.planes, self._tables[layer])):
            blocks = self._block_views[layer][plane_index]
            detiler = self._detilers[plane_index]
            for index, part in enumerate(plan.parts):
                dst = raw_view(part.tensor)[plane_index, layer]
                done = 0
                if index in whole_blocks_done:
                    done = part.lead_tokens
                elif detiler is not None and part.lead_blocks is not None and part.tensor.data_ptr() % 8 == 0:
                    done = part.lead_tokens
                    tokens, hidden_bytes = part.tensor.shape[2], self.layout.hidden * self.layout.dtype.itemsize
                    offset = (plane_index * self.num_layers + layer) * tokens * hidden_bytes
                    compiled.append((detiler, self._np_layers[layer][plane_index], part.numpy_units(detiler.row_unit),
                                     part.lead_blocks_numpy(), hidden_bytes, offset))
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

    def _cpu_load_layer(self, plan: BatchPlan, layer: int, whole_blocks_done: set[int] = frozenset()) -> None:
        tiled = self._tile_lead_blocks(plan, layer, whole_blocks_done)
        if self._kernel_writer is not None:
            self._kernel_load_layer(plan, layer, tiled)
            return
        device = self.layout.device
        assert self._np_tables is not None
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
        if any(t is None for t in self._tilers):
            return tiled
        hidden_bytes = self.layout.hidden * self.layout.dtype.itemsize
        for i, part in enumerate(plan.parts):
            if tiled[i] or part.lead_blocks is None or part.tensor.data_ptr() % 8:
                continue
            tokens = part.tensor.shape[2]
            blocks = part.lead_blocks_numpy()
            for plane_index, tiler in enumerate(self._tilers):
                offset = (plane_index * self.num_layers + layer) * tokens * hidden_bytes
                tiler(part.numpy_units(tiler.row_unit), self._np_layers[layer][plane_index], blocks, hidden_bytes,
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

    # -- devices: one gather / scatter per layer and plane through staging ----------
    def _gather_layer(self, plan: BatchPlan, layer: int, out: torch.Tensor) -> None:
        for plane_index, (plane, table) in enumerate(zip(self.layout.planes, self._tables[layer])):
            rows = plan.rows(plane_index, self.layout.device).reshape(-1)
            torch.index_select(table, 0, rows, out=out[plane_index].view(-1, plane.width))

    def _scatter_layer(self, plan: BatchPlan, layer: int, src: torch.Tensor) -> None:
        for plane_index, (plane, table) in enumerate(zip(self.layout.planes, self._tables[layer])):
            rows = plan.rows(plane_index, self.layout.device).reshape(-1)
            table.index_copy_(0, rows, src[plane_index].view(-1, plane.width))

    def _staging_to_host(self, part: ObjectPart, staging: torch.Tensor, first: int, last: int, fixups: list) -> None:
        host = self._as_moved(part.tensor)
        for plane_index in range(self.layout.num_planes):
            src = staging[:, plane_index, part.first: part.first + part.count]
            if part.positions is None:
                host[plane_index, first:last, : part.count].copy_(src, non_blocking=True)
            else:
                temp = self.platform.empty_host(tuple(src.shape), src.dtype)
                temp.copy_(src, non_blocking=True)
                fixups.append((host[plane_index, first:last], part.positions, temp))

    def _host_to_staging(self, part: ObjectPart, staging: torch.Tensor, first: int, last: int) -> None:
        host = self._as_moved(part.tensor)
        for plane_index in range(self.layout.num_planes):
            src = host[plane_index, first:last]
            src = src[:, : part.count] if part.positions is None else src.index_select(1, part.positions)
            staging[:, plane_index, part.first: part.first + part.count].copy_(src, non_blocking=True)

    def _layer_groups(self, total: int) -> list[tuple[int, int]]:
        per_layer = self.layout.num_planes * total * self.layout.hidden * self.layout.dtype.itemsize
        group = max(1, min(self.num_layers, self.staging_bytes // max(1, per_layer)))
        return [(first, min(first + group, self.num_layers)) for first in range(0, self.num_layers, group)]

    def _staging(self, layers: int, total: int) -> torch.Tensor:
        dtype = self._tables[0][0].dtype
        return torch.empty((layers, self.layout.num_planes, total, self.layout.hidden), dtype=dtype,
                           device=self.layout.device)

    def _side_stream(self):
        """Run on a side stream that first waits for the compute stream (CUDA); plain elsewhere.

        HPU stays on its default stream: in lazy mode the copies belong to the graph
        that flush() ends, which is how vllm-gaudi orders its own work."""
        if self.layout.device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = self.platform.stream()
        ready = self.platform.event()
        ready.record(self.platform.current_stream())
        self._stream.wait_event(ready)
        return self.platform.use_stream(self._stream)


def _apply_fixups(fixups: list) -> None:
    """Objects with padding: scatter their valid tokens into place once the copies are done."""
    for host_layers, positions, temp in fixups:
        raw_view(host_layers).index_copy_(1, positions, raw_view(temp))
