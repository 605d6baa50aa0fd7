"""Unpatched vs patched upstream LMCache HPU connector, side by side.

    python -m lmcache bench patch [--base 0.5.6] [--emulate-hpu | --device hpu] [--tokens N]

Fetches upstream's release (patches/upstream_base.py, sha256-checked) into a cache
directory, as published and with patches/lmcache-X-hpu.patch applied, and runs each
in its own process (both are named `lmcache`, as is this package). Each moves one
batch at the Llama-3.1-8B KV shape (32 layers, 8 KV heads, head size 128, bf16;
vllm-gaudi's (K, V) tuples, block size 128) through the release's own HPU connector,
store and load. Per batch: time, GB/s, mark_step()s, synchronize()s and distinct
(op, shapes, dtype) signatures on hpu tensors (each new one is a graph compile in
lazy mode, a new recipe in eager mode); and those signatures over varied lengths.

With --emulate-hpu (no Gaudi here) `hpu` tensors are CPU memory (lmcache.testing):
the counts are what a Gaudi would see, the times are CPU times and labelled so.
On a Gaudi host run it with --device hpu.

This file is also the worker (`python patch.py --worker ...`): at module level
it imports only the standard library and torch, so that it can run beside an
upstream tree named `lmcache`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO_ROOT = Path(__file__).resolve().parents[2]
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


# -- the worker: one upstream tree, in its own process ---------------------------


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


# -- the bench: prepare both trees, run both workers, print the comparison --------


def _upstream_base():
    path = REPO_ROOT / "patches" / "upstream_base.py"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run this bench from a clone of this repository")
    spec = importlib.util.spec_from_file_location("lmcache_patches_upstream_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="0.5.6", help="upstream release (default 0.5.6)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--emulate-hpu", action="store_true",
                       help="CPU memory behind hpu tensors (lmcache.testing); the default without a Gaudi")  # fmt: skip
    where.add_argument("--device", choices=["hpu"], help="a real Gaudi (Habana bridge installed)")
    parser.add_argument("--eager", action="store_true", help="emulated bridge in eager mode (a Gaudi: PT_HPU_LAZY_MODE)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per batch (default 1024: 4 chunks)")
    parser.add_argument("--repeat", type=int, default=2, help="timed batches per direction; the best is reported")
    parser.add_argument("--varied", type=int, default=6, help="batches of random length for the shape count")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lmcache" / "bench-patch")


def _run_worker(tree: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(tree),
           "--tokens", str(args.tokens), "--repeat", str(args.repeat), "--varied", str(args.varied)]  # fmt: skip
    if args.emulate_hpu:
        cmd.append("--emulate-hpu")
    if not args.eager:
        cmd.append("--lazy")
    env = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)  # `lmcache` must mean the upstream tree there
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker for {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run(args: argparse.Namespace) -> dict:
    from lmcache.bench.common import gbps, machine_name, print_table

    if args.tokens <= 0 or args.repeat <= 0 or args.varied < 0:
        raise SystemExit(f"need --tokens, --repeat > 0, --varied >= 0; got {args.tokens}, {args.repeat}, {args.varied}")
    if args.device is None and not args.emulate_hpu:
        if importlib.util.find_spec("habana_frameworks") is None:
            args.emulate_hpu = True
            print("no Habana bridge here: emulating HPU (--emulate-hpu); times are CPU times")
        else:
            args.device = "hpu"
    trees = _upstream_base().prepare_trees(args.base, args.cache)
    got = {kind: _run_worker(tree, args) for kind, tree in trees.items()}
    label = "emulated hpu (CPU memory)" if args.emulate_hpu else "hpu"
    mode = "lazy" if got["patched"]["lazy"] else "eager"  # as the bridge reports it
    rows = []
    for kind, r in got.items():
        for what in ("store", "load"):
            c, sec = r["per_batch"][what], r["seconds"][what]
            rows.append([kind, what, sec * 1e3, gbps(r["bytes"], sec), c["mark_steps"], c["synchronizes"],
                         c["shapes"]])  # fmt: skip
    print(f"upstream lmcache {args.base} HPU connector ({got['patched']['connector']}), Llama-3.1-8B KV, "
          f"{args.tokens} tokens per batch, {label}, bridge {mode} mode, on {machine_name()}")  # fmt: skip
    print_table(["tree", "op", "ms", "GB/s", "mark_steps", "syncs", "shapes"], rows)
    for kind, r in got.items():
        print(f"{kind}: {r['varied']['shapes']} distinct shapes over {r['varied']['batches']} batches of "
              f"random length; round trip bit-exact: {r['bit_exact']}")  # fmt: skip
    p, u = got["patched"], got["unpatched"]
    result: dict[str, Any] = {"bench": "patch", "base": args.base, "device": label, "bridge_mode": mode,
                              "machine": machine_name(), "tokens": args.tokens,
                              "varied_shapes_patched": p["varied"]["shapes"],
                              "varied_shapes_unpatched": u["varied"]["shapes"]}  # fmt: skip
    for what in ("store", "load"):
        result[f"{what}_gbps_patched"] = gbps(p["bytes"], p["seconds"][what])
        result[f"{what}_gbps_unpatched"] = gbps(u["bytes"], u["seconds"][what])
        result[f"{what}_speed_patched_vs_unpatched"] = u["seconds"][what] / p["seconds"][what]
        for key in ("mark_steps", "synchronizes", "shapes"):
            result[f"{what}_{key}_patched"] = p["per_batch"][what][key]
            result[f"{what}_{key}_unpatched"] = u["per_batch"][what][key]
    result["bit_exact"] = p["bit_exact"] and u["bit_exact"]
    result["targets_met"] = bool(
        result["bit_exact"]
        and all(p["per_batch"][w]["mark_steps"] <= (1 if mode == "lazy" else 0) for w in ("store", "load"))
        and all(p["per_batch"][w]["synchronizes"] == 1 for w in ("store", "load"))
    )
    return result


def _worker_main() -> None:
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # this folder's modules must not shadow upstream's imports
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
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
