"""`python -m lmcache bench workload`: real vLLM serving workloads, with and without LMCache.

Each configuration (vLLM alone, LMCache host memory, disk, Redis, lm:// where it exists;
see workload_tiers.py) gets one OpenAI-compatible vLLM server, started once and driven
through both scenarios (workload_scenarios.py) by concurrent streaming HTTP clients. vLLM's
own KV cache is trimmed (`--num-gpu-blocks-override`) to a third of the working set, so its
prefix cache must evict and a request that comes back to a context finds it only if
LMCache brings it back. Printed per scenario and configuration: TTFT p50/p90, end-to-end
latency, output tokens/s, LMCache hit rate (tokens loaded / prompt tokens) and bytes moved,
vLLM's own prefix-cache hit rate; the last line is JSON with `*_vs_vllm_alone` ratios.

Targets (default sizes): host-memory tier TTFT p50 >= 5x lower than vLLM alone and output
throughput >= 2x; disk and Redis tiers TTFT p50 >= 3x lower.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from lmcache.bench.common import machine_name
from lmcache.bench.workload_scenarios import DEFAULT, SCENARIOS, SMOKE, TokenSource
from lmcache.bench.workload_tiers import TIER_NAMES, TIERS, TierContext, select_tiers

BLOCK_TOKENS = 128  # vLLM CPU's default block size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "vLLM alone vs LMCache tiers on long-document QA and multi-round chat workloads"
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--tiers", default="all",
                        help=f"comma-separated from {', '.join(TIER_NAMES)}, or 'all' (every one available here); "
                             "vLLM alone always runs (the baseline)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply documents and users (default 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the small test model (CI)")
    parser.add_argument("--concurrency", type=int, help=f"requests in flight (default {DEFAULT.concurrency})")
    parser.add_argument("--model", help="a local model directory (default: the reference random Llama)")
    parser.add_argument("--workdir", help="where logs and the disk tier go (default: a temporary directory)")


def _progress(msg: str) -> None:
    print(msg, flush=True)


def _tiers(arg: str) -> list:
    if arg == "all":
        return [t for t in TIERS if t.unavailable() is None]
    tiers = select_tiers(arg)
    for t in tiers:
        if t.unavailable():
            raise SystemExit(f"--tiers {t.name}: {t.unavailable()}")
    return tiers


def _scenarios(arg: str) -> list[str]:
    names = [s.strip() for s in arg.split(",") if s.strip()]
    bad = [s for s in names if s not in SCENARIOS]
    if bad or not names:
        raise SystemExit(f"--scenarios {arg!r}: accepted: {', '.join(SCENARIOS)} (comma-separated)")
    return names


def _model(args) -> tuple[str, str]:
    if args.model:
        if not Path(args.model).is_dir():
            raise SystemExit(f"--model {args.model!r} is not a directory; accepted: a local model directory")
        return args.model, args.model
    from lmcache.demo import BENCH_MODEL_DIR, DEMO_MODEL_DIR, model_cache_dir
    from lmcache.testing.tiny_llama import BENCH_SPEC, TinyLlamaSpec, build_tiny_llama

    if args.smoke:
        return str(build_tiny_llama(model_cache_dir(DEMO_MODEL_DIR), TinyLlamaSpec())), "small random Llama 4x256"
    _progress("building the reference random Llama (8 layers, hidden 1024, 8 heads, 4 KV heads) ...")
    return str(build_tiny_llama(model_cache_dir(BENCH_MODEL_DIR), BENCH_SPEC)), "reference random Llama 8x1024"


def _service(stack: ExitStack, kind: str | None, workdir: Path):
    from lmcache.bench.workload_services import LmServerProcess, RedisProcess

    if kind is None:
        return None
    server = RedisProcess(workdir / "redis") if kind == "redis" else LmServerProcess(workdir / "lm")
    server.start()
    stack.callback(server.stop)
    return server.url


def run(args) -> dict:
    if args.scale <= 0 or (args.concurrency is not None and args.concurrency < 1):
        raise SystemExit("--scale must be > 0 and --concurrency >= 1")
    from dataclasses import asdict, replace

    from lmcache.bench.workload_report import figures, print_results, ratios, targets_met
    from lmcache.bench.workload_runner import RUNNERS, warm_engine
    from lmcache.bench.workload_services import VllmServer

    tiers, scenarios = _tiers(args.tiers), _scenarios(args.scenarios)
    sizes = (SMOKE if args.smoke else DEFAULT).scaled(args.scale)
    if args.concurrency:
        sizes = replace(sizes, concurrency=args.concurrency)
    model, model_name = _model(args)
    source = TokenSource(model)
    max_model_len = -(-(sizes.longest_prompt() + sizes.max_tokens) // BLOCK_TOKENS) * BLOCK_TOKENS
    # a third of the working set, never less than one longest request; vLLM keeps one block back (its null block)
    device_blocks = max(max_model_len, sizes.working_set_tokens() // 3) // BLOCK_TOKENS + 1
    host_gb = 2.0 * args.scale
    _progress(f"machine: {machine_name()}; model: {model_name}; sizes: {sizes}")
    _progress(f"vLLM KV cache: {device_blocks} blocks of {BLOCK_TOKENS} = {device_blocks * BLOCK_TOKENS} tokens "
              f"(working set {sizes.working_set_tokens()} tokens)")
    results: dict[str, dict[str, dict]] = {s: {} for s in scenarios}
    starts = {}
    with ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lmcache-workload-"))
        if not args.workdir:
            stack.callback(shutil.rmtree, workdir, True)
        for tier in tiers:
            ctx = TierContext(workdir, host_gb=host_gb, disk_gb=host_gb, service_url=_service(stack, tier.service, workdir))
            server = VllmServer(model, workdir, lmcache=tier.settings(ctx), device_blocks=device_blocks,
                                block_size=BLOCK_TOKENS, max_model_len=max_model_len,
                                max_num_batched_tokens=max_model_len, name=tier.name)
            _progress(f"[{tier.name}] starting vLLM: {tier.label} ...")
            server.start()
            try:
                starts[tier.name] = round(server.start_seconds, 1)
                warm_engine(server, source)
                for scenario in scenarios:
                    began = time.perf_counter()
                    fig = figures(RUNNERS[scenario](server, sizes, source))
                    results[scenario][tier.name] = fig
                    _progress(f"[{tier.name}] {scenario}: TTFT p50 {fig['ttft_p50_s'] * 1000:.0f} ms, "
                              f"{fig['output_tokens_per_s']:.1f} tok/s, LMCache hit {fig['lmcache_hit_rate']:.0%}, "
                              f"{fig['failed']} failed ({time.perf_counter() - began:.0f} s)")
                    server.reset_prefix_cache()
            finally:
                server.stop()
    labels = {t.name: t.label for t in tiers}
    print_results(results, labels)
    ratio_figures = ratios(results)
    met = targets_met(results, ratio_figures) and not args.smoke
    print(f"\nmachine: {machine_name()}; model: {model_name}; engine starts (s): {starts}")
    return {
        "bench": "workload", "machine": machine_name(), "model": model_name, "smoke": bool(args.smoke),
        "scale": args.scale, "sizes": asdict(sizes),
        "device_kv_tokens": device_blocks * BLOCK_TOKENS, "working_set_tokens": sizes.working_set_tokens(),
        "tiers": [t.name for t in tiers], "results": results, **ratio_figures, "targets_met": met,
    }
