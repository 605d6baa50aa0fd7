"""One upstream LMCache tree's HPU connector, measured in its own process.

    python patches/hpu_transfer_worker.py --tree TREE --tokens N --repeat R --varied V [--emulate-hpu] [--lazy]

Run by `python -m lmcache bench patch` (once per tree: upstream's package is named
`lmcache`, as is this repository's) and, for its recorders, by tests/patch/. At
module level it imports only the standard library and torch, so that it can run
beside an upstream tree. Moves one batch at the Llama-3.1-8B KV shape (32 layers,
8 KV heads x 128, bf16, vllm-gaudi's (K, V) tuples, block 128) through the tree's
own HPU connector, store and load, and prints one JSON line: times, mark_step()s
and synchronize()s per batch, and the distinct (op, shapes, dtype) signatures run
on hpu tensors (each new one is a graph compile in lazy mode, a new recipe in eager
mode), per batch and over batches of varied length. With --emulate-hpu, hpu tensors
are CPU memory (lmcache.testing): counts as on a Gaudi, CPU times.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO_ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = {"layers": 32, "kv_heads": 8, "head_size": 128, "block_size": 128, "chunk_size": 256}
_COPIES = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize", "copy"}
_METADATA = {"dim", "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense"}


class ShapeRecorder:
    """The distinct (op, operand shapes and dtypes) signatures of aten ops run on
    hpu tensors while active. Views and metadata queries (no kernel) and copies
    between host and device (DMA, no graph) are left out."""

    def __init__(self) -> None:
        self.signatures: set[tuple] = set()

    def __enter__(self) -> "ShapeRecorder":
        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                recorder.see(func, args, kwargs or {})
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)

    def see(self, func, args, kwargs) -> None:
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        if func.is_view or name.startswith("sym_") or name in _METADATA:
            return
        if not any(t.device.type == "hpu" for t in tensors):
            return
        devices = {t.device.type for t in tensors}
        target = kwargs.get("device")
        if target is not None:
            devices.add(torch.device(target).type)
        if name in _COPIES and len(devices) > 1:
            return
        self.signatures.add((name, tuple((tuple(t.shape), str(t.dtype)) for t in tensors)))


class SyncCounter:
    """Counts htcore.mark_step() and torch.hpu.synchronize() calls by wrapping
    them (works on a real bridge and on the emulation alike)."""

    def __init__(self) -> None:
        self.mark_steps = self.synchronizes = 0

    @contextlib.contextmanager
    def counting(self):
        import habana_frameworks.torch.core as htcore

        saved = htcore.mark_step, torch.hpu.synchronize

        def mark_step(*a, **k):
            self.mark_steps += 1
            return saved[0](*a, **k)

        def synchronize(*a, **k):
            self.synchronizes += 1
            return saved[1](*a, **k)

        htcore.mark_step, torch.hpu.synchronize = mark_step, synchronize
        try:
            yield self
        finally:
            htcore.mark_step, torch.hpu.synchronize = saved


def _is_ours(name: str) -> bool:
    return name == "lmcache" or name.startswith("lmcache.")


class OurPackage:
    """This repository's lmcache (for its HPU emulation), loaded once and then set
    aside, so that the name `lmcache` means the upstream tree everywhere else."""

    def __init__(self, repo: str):
        sys.path.insert(0, repo)
        try:
            importlib.import_module("lmcache.platforms")
            self.emulation = importlib.import_module("lmcache.testing.hpu_emulation")
        finally:
            sys.path.remove(repo)
        self.modules = {k: v for k, v in sys.modules.items() if _is_ours(k)}
        for name in self.modules:
            del sys.modules[name]

    @contextlib.contextmanager
    def in_charge(self):
        theirs = {k: sys.modules.pop(k) for k in list(sys.modules) if _is_ours(k)}
        sys.modules.update(self.modules)
        try:
            yield
        finally:
            for name in [k for k in sys.modules if _is_ours(k)]:
                del sys.modules[name]
            sys.modules.update(theirs)

    def emulate(self, **kwargs: Any):
        emu = self.emulation.HpuEmulation(**kwargs)
        with self.in_charge():
            emu.activate()
        return emu

    def stop(self, emu) -> None:
        with self.in_charge():
            emu.deactivate()


class _HostObj:
    def __init__(self, tensor, fmt):  # what the HPU connector reads of a memory object
        self.tensor = tensor
        self.metadata = type("Meta", (), {"fmt": fmt})()


def _connector_and_caches(tokens: int):
    from lmcache.utils import EngineType
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.gpu_connector import CreateGPUConnector
    from lmcache.v1.metadata import LMCacheMetadata

    s = LLAMA_8B
    config = LMCacheEngineConfig.from_defaults(chunk_size=s["chunk_size"], local_cpu=True, max_local_cpu_size=1.0)
    metadata = LMCacheMetadata(
        model_name="llama-3.1-8b", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.bfloat16, kv_shape=(s["layers"], 2, s["chunk_size"], s["kv_heads"], s["head_size"]),
        role="worker", chunk_size=s["chunk_size"],
    )  # fmt: skip
    connector = CreateGPUConnector(config, metadata, EngineType.VLLM)
    num_blocks = -(-tokens // s["block_size"]) + 4
    shape = (num_blocks, s["block_size"], s["kv_heads"], s["head_size"])

    def caches(fill):
        make = torch.randn if fill else torch.zeros
        return [tuple(make(*shape, dtype=torch.bfloat16).to("hpu") for _ in range(2)) for _ in range(s["layers"])]

    return connector, caches, num_blocks * s["block_size"]


def _objects(lengths):
    from lmcache.v1.memory_management import MemoryFormat

    s = LLAMA_8B
    hidden = s["kv_heads"] * s["head_size"]
    return [_HostObj(torch.empty(2, s["layers"], n, hidden, dtype=torch.bfloat16), MemoryFormat.KV_2LTD)
            for n in lengths]  # fmt: skip


def _chunks(n: int):
    size = LLAMA_8B["chunk_size"]
    starts = list(range(0, n, size))
    return starts, [min(s + size, n) for s in starts]


def _batch_counts(connector, kwargs_store, kwargs_load, objs, starts, ends) -> dict:
    out = {}
    for what, call, kwargs in (("store", connector.batched_from_gpu, kwargs_store),
                               ("load", connector.batched_to_gpu, kwargs_load)):  # fmt: skip
        counter, recorder = SyncCounter(), ShapeRecorder()
        with counter.counting(), recorder:
            call(objs, starts, ends, **kwargs)
        out[what] = {"mark_steps": counter.mark_steps, "synchronizes": counter.synchronizes,
                     "shapes": len(recorder.signatures)}  # fmt: skip
    return out


def worker(args) -> dict:
    ours = OurPackage(str(REPO_ROOT)) if args.emulate_hpu else None
    emu = ours.emulate(lazy=args.lazy, gpu_migration=True) if ours else None
    if not args.emulate_hpu:  # the real bridge registers torch.hpu
        import habana_frameworks.torch  # noqa: F401
    sys.path.insert(0, args.tree)
    import lmcache

    from habana_frameworks.torch.utils.internal import is_lazy

    connector, caches, num_slots = _connector_and_caches(args.tokens)
    result: dict[str, Any] = {"lmcache_file": lmcache.__file__, "torch_device_type": lmcache.torch_device_type,
                              "connector": type(connector).__name__, "lazy": bool(is_lazy())}  # fmt: skip
    source, target = caches(True), caches(False)
    gen = torch.Generator().manual_seed(0)
    slots = torch.randperm(num_slots, generator=gen)[: args.tokens].to("hpu")
    starts, ends = _chunks(args.tokens)
    objs = _objects([e - s for s, e in zip(starts, ends)])
    store_kw, load_kw = {"kvcaches": source, "slot_mapping": slots}, {"kvcaches": target, "slot_mapping": slots}

    result["per_batch"] = _batch_counts(connector, store_kw, load_kw, objs, starts, ends)
    cpu = emu.to_cpu if emu else (lambda t: t.cpu())
    s_cpu = cpu(slots)
    result["bit_exact"] = all(
        torch.equal(cpu(a).reshape(num_slots, -1)[s_cpu], cpu(b).reshape(num_slots, -1)[s_cpu])
        for la, lb in zip(source, target) for a, b in zip(la, lb)
    )  # fmt: skip

    best = {"store": float("inf"), "load": float("inf")}
    for _ in range(args.repeat):
        for what, call, kw in (("store", connector.batched_from_gpu, store_kw),
                               ("load", connector.batched_to_gpu, load_kw)):  # fmt: skip
            begin = time.perf_counter()
            call(objs, starts, ends, **kw)
            best[what] = min(best[what], time.perf_counter() - begin)
    result["seconds"] = best
    result["bytes"] = sum(o.tensor.numel() * o.tensor.element_size() for o in objs)

    recorder = ShapeRecorder()
    for n in torch.randint(1, args.tokens + 1, (args.varied,), generator=gen).tolist():
        st, en = _chunks(n)
        vo = _objects([e - s for s, e in zip(st, en)])
        with recorder:
            connector.batched_from_gpu(vo, st, en, **store_kw)
            connector.batched_to_gpu(vo, st, en, **load_kw)
    result["varied"] = {"batches": args.varied, "shapes": len(recorder.signatures)}
    return result


def _worker_main() -> None:
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # patches/ must not shadow upstream's imports
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", required=True)
    for name in ("--emulate-hpu", "--lazy"):
        parser.add_argument(name, action="store_true")
    for name in ("--tokens", "--repeat", "--varied"):
        parser.add_argument(name, type=int, required=True)
    result = worker(parser.parse_args())
    print(json.dumps(result), flush=True)
    os._exit(0)  # upstream's engine modules leave non-daemon threads behind


if __name__ == "__main__":
    _worker_main()
