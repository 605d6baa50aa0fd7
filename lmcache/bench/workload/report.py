"""Figures of `bench workload`: per scenario and configuration, the table and the JSON."""

from __future__ import annotations

import statistics

from lmcache.console import print_table
from lmcache.bench.workload.runner import Phase

# Targets (issue 15), judged on every scenario: TTFT p50 of vLLM alone / the tier's.
TTFT_TARGETS = {"cpu": 5.0, "disk": 3.0, "redis": 3.0}
THROUGHPUT_TARGETS = {"cpu": 2.0}  # output tokens/s of the tier / vLLM alone's


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def figures(phase: Phase) -> dict:
    ok = [c for c in phase.completions if not c.error]
    ttft = [c.ttft for c in ok]
    latency = [c.latency for c in ok]
    out_tokens = sum(len(c.token_ids) for c in ok)
    queried = phase.vllm_prefix_query_tokens
    floor = [c.ttft for c in phase.floor if not c.error]
    return {
        "requests": len(phase.completions),
        "failed": len(phase.failures),
        "ttft_p50_s": round(percentile(ttft, 50), 4),
        "ttft_p90_s": round(percentile(ttft, 90), 4),
        "latency_p50_s": round(percentile(latency, 50), 4),
        "latency_p90_s": round(percentile(latency, 90), 4),
        "output_tokens_per_s": round(out_tokens / phase.wall_s, 2) if phase.wall_s else 0.0,
        "wall_s": round(phase.wall_s, 2),
        "warmup_s": round(phase.warmup_s, 2),
        "lmcache_hit_rate": round(phase.lmcache_loaded_tokens / phase.prompt_tokens, 4) if phase.prompt_tokens else 0.0,
        "lmcache_bytes_moved": phase.lmcache_bytes_moved,
        "vllm_prefix_hit_rate": round(phase.vllm_prefix_hit_tokens / queried, 4) if queried else 0.0,
        **({"short_prompt_ttft_p50_s": round(percentile(floor, 50), 4)} if floor else {}),
    }


def ratios(results: dict[str, dict[str, dict]]) -> dict:
    """`results[scenario][tier]` figures -> `<scenario>_<tier>_<what>_vs_vllm_alone`."""
    out = {}
    for scenario, by_tier in results.items():
        base = by_tier.get("vllm")
        if not base:
            continue
        key = scenario.replace("-", "_")
        for tier, fig in by_tier.items():
            if tier == "vllm":
                continue
            out[f"{key}_{tier}_ttft_p50_speedup_vs_vllm_alone"] = _ratio(base["ttft_p50_s"], fig["ttft_p50_s"])
            out[f"{key}_{tier}_ttft_p90_speedup_vs_vllm_alone"] = _ratio(base["ttft_p90_s"], fig["ttft_p90_s"])
            out[f"{key}_{tier}_throughput_vs_vllm_alone"] = _ratio(fig["output_tokens_per_s"], base["output_tokens_per_s"])
    return out


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("inf")


def targets_met(results: dict[str, dict[str, dict]], ratio_figures: dict, stall: dict | None = None) -> bool:
    """Every request served, and the TTFT / throughput targets (the stall scenario has no
    numeric target: its figures are reported)."""
    met = all(fig["failed"] == 0 for fig in (stall or {}).values())
    for scenario, by_tier in results.items():
        key = scenario.replace("-", "_")
        for tier, fig in by_tier.items():
            met &= fig["failed"] == 0
            if tier in TTFT_TARGETS:
                met &= ratio_figures[f"{key}_{tier}_ttft_p50_speedup_vs_vllm_alone"] >= TTFT_TARGETS[tier]
            if tier in THROUGHPUT_TARGETS:
                met &= ratio_figures[f"{key}_{tier}_throughput_vs_vllm_alone"] >= THROUGHPUT_TARGETS[tier]
    return bool(met)


def print_results(results: dict[str, dict[str, dict]], labels: dict[str, str]) -> None:
    for scenario, by_tier in results.items():
        print(f"\n{scenario}:")
        base = by_tier.get("vllm")
        rows = []
        for tier, f in by_tier.items():
            speedup = f"{base['ttft_p50_s'] / f['ttft_p50_s']:.1f}x" if base and f["ttft_p50_s"] else "-"
            rows.append([labels[tier], f["ttft_p50_s"] * 1000, f["ttft_p90_s"] * 1000, f["latency_p50_s"] * 1000,
                         f["output_tokens_per_s"], speedup, f"{f['lmcache_hit_rate']:.0%}",
                         f"{f['lmcache_bytes_moved'] / 1e6:.0f}", f"{f['vllm_prefix_hit_rate']:.0%}",
                         f"{f['requests']}/{f['failed']}",
                         f"{f['short_prompt_ttft_p50_s'] * 1000:.0f}" if "short_prompt_ttft_p50_s" in f else "-"])
        print_table(["configuration", "ttft_p50_ms", "ttft_p90_ms", "e2e_p50_ms", "out_tok/s", "ttft_p50 vs alone",
                     "lmcache_hit", "MB_moved", "vllm_prefix_hit", "requests/failed", "short_prompt_ttft_ms"], rows)


def print_stall(stall: dict[str, dict], labels: dict[str, str]) -> None:
    print("\nstall (decode of running streams while one request loads a long prefix from disk):")
    rows = [[labels[n], f["decode_tps_before"], f["decode_tps_during_load"], f["max_gap_before_s"] * 1000,
             f["max_gap_during_load_s"] * 1000, f["load_window_s"] * 1000, f["loader_ttft_s"] * 1000,
             f["lmcache_loaded_tokens"], "yes" if f["streams_outlasted_window"] else "NO",
             f"{f['repetitions']}/{f['failed']}"] for n, f in stall.items()]
    print_table(["configuration", "decode_tok/s before", "during load", "max_gap_before_ms", "max_gap_during_ms",
                 "window_ms", "loader_ttft_ms", "lmcache_loaded_tok", "streams_outlast", "reps/failed"], rows)
