"""`python -m lmcache bench connector`: paged KV <-> host memory objects, in GB/s.

At a Llama-3.1-8B KV shape (32 layers, 8 KV heads, head size 128, bf16), a batch
of --tokens tokens in 256-token chunks, spread over shuffled blocks, is stored
(paged cache -> memory objects) and loaded back with the batched connector, and
measured side by side (alternating rounds) with:

  memcpy             plain copies of the same bytes on the same path, one copy per
                     memory object (the same destination buffers): host->host on
                     CPU; device->pinned host (store) and pinned host->device (load)
                     on a GPU/HPU.
  upstream pattern   a re-implementation of upstream LMCache 0.4.3's Gaudi connector
                     pattern on the Gaudi (K, V) layout: per 256-token chunk,
                     index_select per layer for K and V, torch.stack into
                     [2, L, T, H*D], copy to the host object, synchronize per chunk;
                     on load a graph break (mark_step) after every layer; batches
                     are Python loops over chunks.

Layouts: flash_attn (CUDA layout, LBNHC, block 16), cpu_attn (vLLM's CPU backend,
block 16, as packed by vLLM's own CPU kernel, with native blocks as the vLLM integration
uses them by default: config cpu_native_blocks), cpu_attn_portable (the same cache into
portable per-token objects: cpu_native_blocks false), hpu_kv (vllm-gaudi's (K, V),
block 128). Default: all four on --device cpu, flash_attn on cuda, hpu_kv on hpu.

--device hpu uses the real Habana bridge (run it on a Gaudi host). On a machine
without one, --emulate-hpu runs the HPU code path on lmcache's CPU-backed HPU
emulation: those figures are CPU figures and say nothing about Gaudi speed.
On HPU it also counts, over --shape-steps steps of varied request mixes, the
distinct (op, shapes, dtype) run on hpu tensors (each a graph compile or recipe
on a Gaudi): ours with slot buckets, ours without ("off"), upstream's pattern.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lmcache.bench.common import gbps, interleaved_best, machine_name
from lmcache.console import print_table

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("flash_attn", "cpu_attn", "cpu_attn_portable", "hpu_kv")
DEFAULT_LAYOUTS = {"cpu": LAYOUTS, "cuda": ("flash_attn",), "hpu": ("hpu_kv",)}
BLOCK_SIZES = {"flash_attn": 16, "cpu_attn": 16, "cpu_attn_portable": 16, "hpu_kv": 128}
TARGET_VS_MEMCPY = 0.8
TARGET_VS_UPSTREAM = 5.0  # on CPU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda", "hpu"), default=None,
                        help="device of the paged cache (default: the detected platform)")
    parser.add_argument("--emulate-hpu", action="store_true",
                        help="with --device hpu on a machine without Gaudi: use the CPU-backed HPU emulation "
                             "(figures are emulated, not Gaudi speed)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per batch (default 8192)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per memory object (default 256)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--layouts", default=None,
                        help=f"comma-separated subset of {','.join(LAYOUTS)} (default depends on --device)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="block size for every layout (default: 16 for flash_attn/cpu_attn, 128 for hpu_kv)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best of each is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server", action="store_true",
                        help="also store into and load from slots of a real lmcache server's shared memory "
                             "(connector_server.py), side by side with the in-process objects and memcpy")
    parser.add_argument("--shape-steps", type=int, default=20,
                        help="HPU: steps of varied batch sizes over which distinct op shapes are counted "
                             "(0: skip; default 20)")


@dataclass
class Setup:
    layout: str
    platform: Any
    caches: dict                  # what vLLM would register
    slots: torch.Tensor           # host int64, all tokens of the batch
    objs: list                    # memory objects
    starts: list
    ends: list
    nbytes: int                   # bytes moved per store (or load)


def _platform(device: str, emulate_hpu: bool, stack: contextlib.ExitStack):
    from lmcache.platforms import current_platform, make_platform, set_platform

    if device == "hpu" and emulate_hpu:
        from lmcache.testing.hpu_emulation import HpuEmulation

        emu = HpuEmulation(lazy=True)
        stack.enter_context(emu)
        print("NOTE: --emulate-hpu: the HPU code path runs on lmcache's CPU-backed HPU emulation; "
              "these figures are CPU figures and say NOTHING about Gaudi speed.")
        return current_platform(), emu
    if device is None:
        return current_platform(), None
    hint = " (or add --emulate-hpu to run the HPU code path on the CPU emulation)" if device == "hpu" else ""
    try:
        platform = make_platform(device)
        present = device == "cpu" or type(platform).is_present()
    except Exception as exc:
        raise SystemExit(f"--device {device}: that device is not usable here: {exc}{hint}") from exc
    if not present:
        raise SystemExit(f"--device {device}: no {device} device is present on this machine{hint}")
    previous = set_platform(platform)
    stack.callback(set_platform, previous)
    return platform, None


def _make_setup(layout: str, platform, args, dtype: torch.dtype, gen: torch.Generator) -> Setup:
    from lmcache.v1.memory import MemoryFormat, MemoryObj

    block = args.block_size or BLOCK_SIZES[layout]
    heads, head, layers, tokens = args.kv_heads, args.head_size, args.layers, args.tokens
    num_blocks = (tokens + block - 1) // block + max(8, tokens // block // 4)
    device = platform.device

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).to(device)

    if layout == "flash_attn":
        caches = {f"layers.{i}": rand(num_blocks, block, heads, 2 * head).permute(0, 2, 1, 3) for i in range(layers)}
    elif layout.startswith("cpu_attn"):
        caches = {f"layers.{i}": rand(num_blocks, heads, block, 2 * head) for i in range(layers)}
    else:
        caches = {f"layers.{i}": (rand(num_blocks, block, heads, head), rand(num_blocks, block, heads, head))
                  for i in range(layers)}
    order = torch.randperm(num_blocks, generator=gen)[: (tokens + block - 1) // block]
    slots = (order.view(-1, 1) * block + torch.arange(block)).reshape(-1)[:tokens].contiguous()
    starts = list(range(0, tokens, args.chunk))
    ends = [min(s + args.chunk, tokens) for s in starts]
    hidden = heads * head
    objs = [MemoryObj(platform.empty_host((2, layers, e - s, hidden), dtype), MemoryFormat.KV_2LTD)
            for s, e in zip(starts, ends)]
    nbytes = sum(o.nbytes for o in objs)
    return Setup(layout, platform, caches, slots, objs, starts, ends, nbytes)


def _memcpy_cases(s: Setup, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """Plain copies of the same bytes into / out of the same memory objects, one copy per object."""
    platform = s.platform
    if platform.device_type == "cpu":
        sources = [torch.ones_like(o.tensor) for o in s.objs]

        def copy():
            for src, obj in zip(sources, s.objs):
                obj.tensor.copy_(src)

        return {"memcpy": copy}
    device_side = [torch.ones(o.tensor.shape, dtype=dtype, device=platform.device) for o in s.objs]

    def d2h():
        for dev, obj in zip(device_side, s.objs):
            obj.tensor.copy_(dev, non_blocking=True)
        platform.synchronize()

    def h2d():
        for dev, obj in zip(device_side, s.objs):
            dev.copy_(obj.tensor, non_blocking=True)
        platform.synchronize()

    return {"memcpy_store": d2h, "memcpy_load": h2d}


def _upstream_store(platform, layers, objs, chunk_slots) -> None:
    heads_dim = objs[0].tensor.shape[3]
    for obj, slots in zip(objs, chunk_slots):
        keys, values = [], []
        for k, v in layers:
            keys.append(k.view(-1, heads_dim).index_select(0, slots))
            values.append(v.view(-1, heads_dim).index_select(0, slots))
        stacked = torch.stack([torch.stack(keys), torch.stack(values)])
        obj.tensor.copy_(stacked)
        platform.synchronize()


def _upstream_load(platform, layers, objs, chunk_slots) -> None:
    heads_dim = objs[0].tensor.shape[3]
    for obj, slots in zip(objs, chunk_slots):
        kv = platform.to_device(obj.tensor)
        for layer, (k, v) in enumerate(layers):
            k.view(-1, heads_dim).index_copy_(0, slots, kv[0, layer])
            v.view(-1, heads_dim).index_copy_(0, slots, kv[1, layer])
            platform.flush()
        platform.synchronize()


def _upstream_pattern_cases(s: Setup) -> dict[str, Callable[[], object]]:
    """Upstream LMCache 0.4.3's Gaudi connector pattern, on the (K, V) layout (see module doc)."""
    platform = s.platform
    layers = list(s.caches.values())
    slot_dev = platform.to_device(s.slots)
    chunk_slots = [slot_dev[a:b] for a, b in zip(s.starts, s.ends)]
    return {"upstream_store": lambda: _upstream_store(platform, layers, s.objs, chunk_slots),
            "upstream_load": lambda: _upstream_load(platform, layers, s.objs, chunk_slots)}


def _distinct_shapes(s: Setup, args, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Distinct (op, shapes, dtype) on hpu tensors over --shape-steps steps of varied request
    mixes (store, then load), for ours with buckets, ours without, and upstream's pattern."""
    from lmcache.testing.shape_log import ShapeLog
    from lmcache.testing.vllm_gaudi import random_steps
    from lmcache.v1.gpu_connector import create_gpu_connector
    from lmcache.v1.memory import MemoryFormat, MemoryObj

    block = args.block_size or BLOCK_SIZES[s.layout]
    num_blocks = next(iter(s.caches.values()))[0].shape[0]
    per_request = max(1, min(3 * args.chunk, num_blocks * block // 4 - block))
    steps = list(random_steps(args.shape_steps, num_blocks, block, torch.Generator().manual_seed(args.seed + 1),
                              chunk=args.chunk, max_requests=4, max_tokens=per_request))
    hidden, layers = args.kv_heads * args.head_size, list(s.caches.values())
    out = {}
    for variant in ("ours", "ours_unbucketed", "upstream_pattern"):
        conn = None if variant == "upstream_pattern" else create_gpu_connector(
            s.caches, platform=s.platform, use_mla=False, slot_buckets="off" if variant == "ours_unbucketed" else "auto")
        with ShapeLog() as log:
            for slots, starts, ends in steps:
                objs = [MemoryObj(s.platform.empty_host((2, args.layers, e - a, hidden), dtype), MemoryFormat.KV_2LTD)
                        for a, e in zip(starts, ends)]
                if conn is not None:
                    conn.batched_from_gpu(objs, starts, ends, slot_mapping=slots)
                    conn.batched_to_gpu(objs, starts, ends, slot_mapping=slots)
                    continue
                keep = [i for i, (a, e) in enumerate(zip(starts, ends)) if bool((slots[a:e] >= 0).all())]
                if not keep:
                    continue
                chunk_slots = [s.platform.to_device(slots[starts[i]:ends[i]]) for i in keep]
                _upstream_store(s.platform, layers, [objs[i] for i in keep], chunk_slots)
                _upstream_load(s.platform, layers, [objs[i] for i in keep], chunk_slots)
        out[variant] = (log.per_op(views=False), log.per_op())
    return out


def _measure(s: Setup, dtype: torch.dtype, repeat: int, server: bool = False) -> dict[str, float]:
    from lmcache.v1.gpu_connector import create_gpu_connector

    backend = {"flash_attn": "FLASH_ATTN", "cpu_attn": "CPU_ATTN", "cpu_attn_portable": "CPU_ATTN",
               "hpu_kv": None}[s.layout]
    connector = create_gpu_connector(s.caches, attn_backend=backend, platform=s.platform,
                                     native_blocks=s.layout == "cpu_attn")
    if s.layout == "cpu_attn" and not connector.host_format_tag:
        raise SystemExit("cpu_attn: native blocks are not available for this cache (see gpu_connector/cpu/native_blocks.py)")

    def store():
        connector.batched_from_gpu(s.objs, s.starts, s.ends, slot_mapping=s.slots)

    def load():
        connector.batched_to_gpu(s.objs, s.starts, s.ends, slot_mapping=s.slots)

    cases: dict[str, Callable[[], object]] = {"store": store, "load": load}
    cases.update(_memcpy_cases(s, dtype))
    if s.layout == "hpu_kv":
        cases.update(_upstream_pattern_cases(s))
    with contextlib.ExitStack() as stack:
        if server:
            from lmcache.bench.connector_server import server_cases

            cases.update(server_cases(s, dtype, connector, stack))
        best = interleaved_best(cases, repeat=repeat)
    speed = {name: gbps(s.nbytes, t) for name, t in best.items()}
    out = {"store_gbps": speed["store"], "load_gbps": speed["load"]}
    memcpy_store = speed.get("memcpy", speed.get("memcpy_store"))
    memcpy_load = speed.get("memcpy", speed.get("memcpy_load"))
    out["memcpy_store_gbps"], out["memcpy_load_gbps"] = memcpy_store, memcpy_load
    out["store_vs_memcpy"] = speed["store"] / memcpy_store
    out["load_vs_memcpy"] = speed["load"] / memcpy_load
    if "upstream_store" in speed:
        out["upstream_store_gbps"] = speed["upstream_store"]
        out["upstream_load_gbps"] = speed["upstream_load"]
        out["store_vs_upstream_pattern"] = speed["store"] / speed["upstream_store"]
        out["load_vs_upstream_pattern"] = speed["load"] / speed["upstream_load"]
    if "server_store" in speed:
        for op in ("store", "load"):
            out[f"server_{op}_gbps"] = speed[f"server_{op}"]
            out[f"server_{op}_vs_memcpy"] = speed[f"server_{op}"] / out[f"memcpy_{op}_gbps"]
            out[f"server_{op}_vs_in_process"] = speed[f"server_{op}"] / speed[op]
    out["row_widths"] = [p.width for p in connector.layout.planes]
    return out


def _targets(device: str, figures: dict) -> dict[str, bool]:
    met = {
        "store_vs_memcpy": figures["store_vs_memcpy"] >= TARGET_VS_MEMCPY,
        "load_vs_memcpy": figures["load_vs_memcpy"] >= TARGET_VS_MEMCPY,
    }
    for key in ("server_store_vs_memcpy", "server_load_vs_memcpy"):
        if key in figures:
            met[key] = figures[key] >= TARGET_VS_MEMCPY
    if device == "cpu" and "store_vs_upstream_pattern" in figures:
        met["store_vs_upstream_pattern"] = figures["store_vs_upstream_pattern"] >= TARGET_VS_UPSTREAM
        met["load_vs_upstream_pattern"] = figures["load_vs_upstream_pattern"] >= TARGET_VS_UPSTREAM
    return met


def _report_shapes(shapes: dict, steps: int, result: dict) -> None:
    print(f"distinct op shapes on hpu tensors over {steps} steps of varied request mixes (store + load each; "
          "each a graph compile / recipe on a Gaudi); data ops = ops that move or compute data (views aside):")
    rows = []
    for layout, variants in shapes.items():
        for variant, (data_ops, all_ops) in variants.items():
            top = ", ".join(f"{op} {n}" for op, n in sorted(data_ops.items(), key=lambda kv: -kv[1])[:5])
            rows.append([layout, variant, sum(all_ops.values()), sum(data_ops.values()),
                         max(data_ops.values(), default=0), top])
            result[f"{layout}_distinct_shapes_{variant}"] = sum(all_ops.values())
            result[f"{layout}_distinct_data_op_shapes_{variant}"] = sum(data_ops.values())
            result[f"{layout}_max_shapes_per_data_op_{variant}"] = max(data_ops.values(), default=0)
        ours, upstream = (sum(variants[v][0].values()) for v in ("ours", "upstream_pattern"))
        result[f"{layout}_data_op_shapes_vs_upstream_pattern"] = round(ours / max(1, upstream), 4)
    print_table(["layout", "variant", "all shapes", "data op shapes", "max per data op", "data ops, most shapes"],
                rows)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    with contextlib.ExitStack() as stack:
        platform, emu = _platform(args.device, args.emulate_hpu, stack)
        device = platform.device_type
        layouts = tuple(args.layouts.split(",")) if args.layouts else DEFAULT_LAYOUTS[device]
        unknown = [name for name in layouts if name not in LAYOUTS]
        if unknown:
            raise SystemExit(f"--layouts: unknown {unknown}; accepted: {', '.join(LAYOUTS)}")
        if device == "hpu" and any(name != "hpu_kv" for name in layouts):
            raise SystemExit("--device hpu: only the hpu_kv layout exists on Gaudi")
        gen = torch.Generator().manual_seed(args.seed)
        results = {}
        shapes = {}
        for name in layouts:
            setup = _make_setup(name, platform, args, dtype, gen)
            results[name] = _measure(setup, dtype, args.repeat, args.server)
            if device == "hpu" and args.shape_steps > 0:
                shapes[name] = _distinct_shapes(setup, args, dtype)
            del setup
        emulated = emu is not None
    nbytes = 2 * args.layers * args.tokens * args.kv_heads * args.head_size * dtype.itemsize
    print(f"connector bench on {machine_name()}, device {device}{' (EMULATED HPU)' if emulated else ''}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{args.tokens} tokens in {args.chunk}-token chunks, {args.layers} layers x {args.kv_heads} KV heads x "
          f"{args.head_size}, {args.dtype}: {nbytes / 1e9:.3f} GB per store/load; best of {args.repeat} rounds")
    rows = []
    for name, f in results.items():
        rows.append([name, args.block_size or BLOCK_SIZES[name], f["store_gbps"], f["load_gbps"], f["memcpy_store_gbps"],
                     f["memcpy_load_gbps"], f["store_vs_memcpy"], f["load_vs_memcpy"],
                     f.get("upstream_store_gbps", "-"), f.get("upstream_load_gbps", "-"),
                     f.get("store_vs_upstream_pattern", "-"), f.get("load_vs_upstream_pattern", "-"),
                     "x".join(str(w) for w in f["row_widths"])])
    print_table(["layout", "block", "store GB/s", "load GB/s", "memcpy st", "memcpy ld", "store/memcpy",
                 "load/memcpy", "upstream st", "upstream ld", "store/upstream", "load/upstream", "row widths"], rows)
    if args.server:
        print_table(["layout", "server store GB/s", "server load GB/s", "server st/memcpy", "server ld/memcpy",
                     "server st/in-process", "server ld/in-process"],
                    [[name, f["server_store_gbps"], f["server_load_gbps"], f["server_store_vs_memcpy"],
                      f["server_load_vs_memcpy"], f["server_store_vs_in_process"], f["server_load_vs_in_process"]]
                     for name, f in results.items()])
    result: dict = {"bench": "connector", "device": device, "emulated": emulated, "machine": machine_name(),
                    "torch_threads": torch.get_num_threads(), "tokens": args.tokens, "chunk": args.chunk,
                    "bytes_per_transfer": nbytes}
    if shapes:
        _report_shapes(shapes, args.shape_steps, result)
    all_met = True
    for name, f in results.items():
        for key, value in f.items():
            if key != "row_widths":
                result[f"{name}_{key}"] = round(value, 4)
        met = _targets(device, f)
        for key, ok in met.items():
            if not ok:
                print(f"target missed: {name} {key} = {f[key]:.3f}")
        all_met = all_met and all(met.values())
    first = results[layouts[0]]
    for key in ("store_gbps", "load_gbps", "store_vs_memcpy", "load_vs_memcpy",
                "store_vs_upstream_pattern", "load_vs_upstream_pattern"):
        source = results.get("hpu_kv", first) if "upstream" in key else first
        if key in source:
            result[key] = round(source[key], 4)
    result["targets_met"] = bool(all_met and not emulated)
    if emulated:
        print("targets_met is false by definition on the emulation: it measures CPU, not Gaudi.")
    return result
