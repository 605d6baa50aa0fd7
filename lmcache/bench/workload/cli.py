"""`python -m lmcache bench workload`: real vLLM serving workloads, with and without LMCache.

Each configuration (vLLM alone, LMCache host memory, disk (sync and async loads), Redis,
lm://; see tiers.py) gets one OpenAI-compatible vLLM server; all are started at
once and kept up for the whole run, and the measured requests alternate between them
(runner.py), so the ratios are side by side in time. vLLM's own KV cache is
trimmed (`--num-gpu-blocks-override`) to hold C+1 of the longest requests, less than the
working set, so its prefix cache must evict and a request that comes back to a context
finds it only if LMCache brings it back. Scenarios: scenarios.py and
stall.py. Printed per scenario and configuration: TTFT p50/p90, end-to-end
latency, output tokens/s, LMCache hit rate (tokens loaded / prompt tokens) and bytes
moved, vLLM's own prefix-cache hit rate; for `stall`, decode tokens/s of running streams
during a long disk load vs before it. The last line is JSON with `*_vs_vllm_alone` ratios
and `stall_*_async_vs_sync`. `multi-instance` (on request) compares two instances with
private host tiers against two sharing one `lmcache server` (multi_instance.py).

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
from lmcache.bench.workload.scenarios import DEFAULT, DEFAULT_SCENARIOS, SCENARIOS, SMOKE, TokenSource
from lmcache.bench.workload.tiers import STALL_TIERS, TIER_NAMES, TIERS, TierContext, select_tiers

BLOCK_TOKENS = 128  # vLLM CPU's default block size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "vLLM alone vs LMCache tiers on long-document QA and multi-round chat workloads"
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                        help=f"comma-separated: {', '.join(SCENARIOS)} (default: {', '.join(DEFAULT_SCENARIOS)}; "
                             "multi-instance: 2 vLLM instances, private host tiers vs one shared lmcache server, "
                             "its own 4 vLLM servers, --tiers does not apply)")
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


def _tiers(arg: str, with_stall: bool) -> list:
    if arg == "all":
        return [t for t in TIERS if t.unavailable() is None]
    tiers = select_tiers(arg, with_stall)
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
    from lmcache.testing.tiny_llama import (
        BENCH_MODEL_DIR, BENCH_SPEC, DEMO_MODEL_DIR, TinyLlamaSpec, build_tiny_llama, model_cache_dir,
    )

    if args.smoke:
        return str(build_tiny_llama(model_cache_dir(DEMO_MODEL_DIR), TinyLlamaSpec())), "small random Llama 4x256"
    _progress("building the reference random Llama (8 layers, hidden 1024, 8 heads, 4 KV heads) ...")
    return str(build_tiny_llama(model_cache_dir(BENCH_MODEL_DIR), BENCH_SPEC)), "reference random Llama 8x1024"


def _service(stack: ExitStack, kind: str | None, workdir: Path):
    from lmcache.testing.lm_server import LmServerProcess
    from lmcache.testing.redis_servers import RedisServer

    if kind is None:
        return None
    server = RedisServer(str(workdir / "redis")) if kind == "redis" else LmServerProcess(workdir / "lm", ("cpu", "--max-size-gb", "2.0"))
    server.start()
    stack.callback(server.stop)
    return server.url


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


def _machine() -> str:
    import os

    return f"{machine_name()}, {os.cpu_count()} x {_cpu_model()}"


def _load() -> str:
    import os

    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _device_sizes(sizes) -> tuple[int, int]:
    """(vLLM KV blocks, max model length): C+1 of the longest requests, and the stall
    scenario's loader with its streams; vLLM keeps one block back (its null block)."""
    from lmcache.bench.workload.scenarios import STALL_LOADER_TOKENS, STALL_SUFFIX_TOKENS

    request = sizes.longest_prompt() + sizes.max_tokens
    loader = sizes.stall_prefix_tokens + STALL_SUFFIX_TOKENS + STALL_LOADER_TOKENS
    max_model_len = -(-max(request, loader) // BLOCK_TOKENS) * BLOCK_TOKENS
    tokens = max((sizes.concurrency + 1) * request, sizes.stall_tokens(), max_model_len)
    return -(-tokens // BLOCK_TOKENS) + 1, max_model_len


def _start_servers(stack: ExitStack, tiers, model: str, workdir: Path, sizes, host_gb: float) -> dict:
    from lmcache.bench.workload.services import VllmServer

    device_blocks, max_model_len = _device_sizes(sizes)
    servers = {}
    for tier in tiers:
        ctx = TierContext(workdir, host_gb=host_gb, disk_gb=host_gb, service_url=_service(stack, tier.service, workdir))
        lmcache = tier.settings(ctx)
        servers[tier.name] = VllmServer(model, workdir, lmcache=lmcache, device_blocks=device_blocks,
                                        block_size=BLOCK_TOKENS, max_model_len=max_model_len,
                                        max_num_batched_tokens=max_model_len, name=tier.name,
                                        connector_extra=tier.connector_extra if lmcache is not None else None)
    _progress(f"starting {len(servers)} vLLM servers side by side: {', '.join(servers)} (load {_load()}) ...")
    for server in servers.values():
        stack.callback(server.stop)
        server.launch()
    for server in servers.values():
        server.wait_ready()
        _progress(f"[{server.name}] ready after {server.start_seconds:.0f} s, RSS {server.rss_bytes() / 2**20:.0f} MiB")
    return servers


def run(args) -> dict:
    if args.scale <= 0 or (args.concurrency is not None and args.concurrency < 1):
        raise SystemExit("--scale must be > 0 and --concurrency >= 1")
    from dataclasses import asdict, replace

    from lmcache.bench.workload.report import figures, print_results, print_stall, ratios, targets_met
    from lmcache.bench.workload.runner import RUNNERS, each_server, warm_engine
    from lmcache.bench.workload import multi_instance
    from lmcache.bench.workload.stall import run_stall, stall_ratios

    began = time.perf_counter()
    scenarios = _scenarios(args.scenarios)
    tier_scenarios = [s for s in scenarios if s != multi_instance.NAME]
    tiers = _tiers(args.tiers, "stall" in scenarios) if tier_scenarios else []
    sizes = (SMOKE if args.smoke else DEFAULT).scaled(args.scale)
    if args.concurrency:
        sizes = replace(sizes, concurrency=args.concurrency)
    model, model_name = _model(args)
    source = TokenSource(model)
    device_blocks, max_model_len = _device_sizes(sizes)
    host_gb = 1.0 * args.scale
    _progress(f"machine: {_machine()}; load average {_load()}; model: {model_name}; sizes: {sizes}")
    results: dict[str, dict[str, dict]] = {s: {} for s in scenarios if s in RUNNERS}
    stall: dict[str, dict] = {}
    multi: dict[str, dict] = {}
    loads = [_load()]
    starts: dict = {}
    rss: dict = {}
    with ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lmcache-workload-"))
        if not args.workdir:
            stack.callback(shutil.rmtree, workdir, True)
        if tier_scenarios:
            _progress(f"vLLM KV cache: {device_blocks} blocks of {BLOCK_TOKENS} = {device_blocks * BLOCK_TOKENS} "
                      f"tokens (working set {sizes.working_set_tokens()} tokens; max model length {max_model_len})")
            with ExitStack() as servers_up:
                servers = _start_servers(servers_up, tiers, model, workdir, sizes, host_gb)
                starts = {n: round(s.start_seconds, 1) for n, s in servers.items()}
                each_server(servers, lambda n, s: warm_engine(s, source))
                for scenario in results:
                    t0 = time.perf_counter()
                    phases = RUNNERS[scenario](servers, sizes, source)
                    for name, phase in phases.items():
                        fig = results[scenario][name] = figures(phase)
                        _progress(f"[{name}] {scenario}: TTFT p50 {fig['ttft_p50_s'] * 1000:.0f} ms, "
                                  f"{fig['output_tokens_per_s']:.1f} tok/s, LMCache hit {fig['lmcache_hit_rate']:.0%}, "
                                  f"vLLM prefix hit {fig['vllm_prefix_hit_rate']:.0%}, {fig['failed']} failed")
                    _progress(f"{scenario}: {time.perf_counter() - t0:.0f} s (load {_load()})")
                    loads.append(_load())
                    each_server(servers, lambda n, s: s.reset_prefix_cache())
                if "stall" in scenarios:
                    t0 = time.perf_counter()
                    stall = run_stall({n: servers[n] for n in STALL_TIERS}, sizes, source)
                    _progress(f"stall: {time.perf_counter() - t0:.0f} s (load {_load()})")
                    loads.append(_load())
                rss = {n: round(s.rss_bytes() / 2**20) for n, s in servers.items()}
        if multi_instance.NAME in scenarios:
            t0 = time.perf_counter()
            multi = multi_instance.run_multi_instance(model, workdir, sizes, source, host_gb, _progress)
            _progress(f"{multi_instance.NAME}: {time.perf_counter() - t0:.0f} s with its engine starts (load {_load()})")
            loads.append(_load())
    labels = {t.name: t.label for t in tiers}
    print_results(results, labels)
    if stall:
        print_stall(stall, labels)
    ratio_figures = {**ratios(results), **stall_ratios(stall)}
    met = targets_met(results, ratio_figures, stall) and not args.smoke
    if multi:
        multi_figures = multi_instance.ratios(multi)
        multi_instance.print_figures(multi, multi_figures)
        ratio_figures.update(multi_figures)
        met = met and multi_instance.targets_met(multi, multi_figures)
    wall = time.perf_counter() - began
    started = f"; engine starts (s): {starts}; RSS at the end (MiB): {rss}" if starts else ""
    print(f"\nmachine: {_machine()}; model: {model_name}{started}")
    print(f"load average (1/5/15 min) at start and after each scenario: {'; '.join(loads)}; wall time {wall / 60:.1f} min")
    return {
        "bench": "workload", "machine": _machine(), "model": model_name, "smoke": bool(args.smoke),
        "scale": args.scale, "sizes": asdict(sizes), "wall_s": round(wall, 1), "load_average": loads,
        "device_kv_tokens": device_blocks * BLOCK_TOKENS, "working_set_tokens": sizes.working_set_tokens(),
        "tiers": [t.name for t in tiers], "engine_start_s": starts, "rss_mib": rss, "results": results,
        "stall": stall, "multi_instance": multi, **ratio_figures, "targets_met": met,
    }
