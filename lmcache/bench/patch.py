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

Each tree runs in patches/hpu_transfer_worker.py, in its own process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = REPO_ROOT / "patches" / "hpu_transfer_worker.py"


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
    parser.add_argument("--eager", action="store_true",
                        help="emulated bridge in eager mode (on a Gaudi: PT_HPU_LAZY_MODE=0)")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=512, help="tokens per batch (default 512: 2 chunks)")
    parser.add_argument("--repeat", type=int, default=2, help="timed batches per direction; the best is reported")
    parser.add_argument("--varied", type=int, default=4, help="batches of random length for the shape count")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lmcache" / "bench-patch")


def _run_worker(tree: Path, args) -> dict:
    cmd = [sys.executable, str(WORKER), "--tree", str(tree),
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
    from lmcache.bench.common import gbps, machine_name
    from lmcache.console import print_table

    if args.tokens <= 0 or args.repeat <= 0 or args.varied < 0:
        raise SystemExit(f"need --tokens, --repeat > 0, --varied >= 0; got {args.tokens}, {args.repeat}, {args.varied}")
    if args.device is None and not args.emulate_hpu:
        from lmcache.platforms.hpu import HpuPlatform

        if not HpuPlatform.is_present():
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
