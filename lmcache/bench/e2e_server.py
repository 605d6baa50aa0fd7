"""`python -m lmcache bench e2e --server-vs-in-process`: the TTFT of a hit loaded through an
`lmcache server` next to that of a hit from the in-process host tier, in one run.

Two vLLM engines in this process (same model, same arguments, same connector): one whose
LMCache host tier lives in the process, one whose host tier is a real `lmcache server`
the bench starts. Each round takes a fresh prompt; both engines compute it once (a miss:
each stores it in its tier); then, --hit-repeats times, alternating: both prefix caches
reset, the in-process hit and the server hit timed (which goes first alternates; each waits
out the other engine's worker spin, VLLM_WORKER_SPIN_S, first), then vLLM's own prefix-cache
hit on the server engine (the floor). The target is judged on the median over all back-to-back
pairs of (server hit TTFT / in-process hit TTFT), same prompt: <= 1.25 (a hit through the
server at least 0.8x as fast as an in-process hit).
"""

from __future__ import annotations

import statistics
import time

from lmcache.bench.common import machine_name
from lmcache.bench.workload.services import VLLM_WORKER_SPIN_S
from lmcache.console import Console, print_table

SERVER_VS_IN_PROCESS_TARGET = 1.25


def _say(msg: str) -> None:
    Console.say(msg)


def measure(args, model: str, start_vllm, device_type: str) -> dict:
    """`start_vllm(server_port)`: an LLM whose host tier is in process (None) or the server's."""
    from vllm import SamplingParams

    from lmcache.integration.vllm.metrics.worker_stats import loaded_tokens, reset_vllm_prefix_cache, shutdown_llm
    from lmcache.testing.cache_server import CacheServerProcess
    from lmcache.testing.tiny_llama import make_prompt

    server = CacheServerProcess(l1_gb=2.0, chunk_size=256, log_level="WARNING").start()
    engines = {}
    try:
        _say("starting two vLLM engines: host tier in process, and an lmcache server's shared memory ...")
        engines["in_process"] = start_vllm(None)
        engines["server"] = start_vllm(server.port)
        vocab = engines["server"].get_tokenizer().vocab_size if args.model else None
        params = SamplingParams(temperature=0.0, max_tokens=1)

        def ttft(llm, ids) -> float:
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            return time.perf_counter() - start

        warm = make_prompt(model, min(1024, args.prompt_tokens), vocab, seed=999)  # within max_model_len
        for llm in engines.values():
            for _ in range(2):
                reset_vllm_prefix_cache(llm)
                ttft(llm, warm)
                ttft(llm, warm)
        samples = {"miss": [], "in_process_hit": [], "server_hit": [], "vllm_hit": []}
        loaded = {"in_process": [], "server": []}
        pairs = []  # (in-process hit, the server hit right after it)
        for r in range(args.rounds):
            prompt = make_prompt(model, args.prompt_tokens, vocab, seed=2000 + r)
            for llm in engines.values():
                reset_vllm_prefix_cache(llm)
                samples["miss"].append(ttft(llm, prompt))
            for k in range(args.hit_repeats):
                hit = {}
                for name in (("in_process", "server") if (r + k) % 2 == 0 else ("server", "in_process")):
                    llm = engines[name]
                    reset_vllm_prefix_cache(llm)
                    before = loaded_tokens(llm)
                    time.sleep(VLLM_WORKER_SPIN_S)  # the other engine's worker stops spinning first
                    hit[name] = ttft(llm, prompt)
                    loaded[name].append(loaded_tokens(llm) - before)
                samples["in_process_hit"].append(hit["in_process"])
                samples["server_hit"].append(hit["server"])
                samples["vllm_hit"].append(ttft(engines["server"], prompt))
                pairs.append((hit["in_process"], hit["server"]))
            _say(f"      round {r + 1}/{args.rounds}: in-process hit "
                 f"{' / '.join(f'{h * 1000:.1f}' for h, _ in pairs[-args.hit_repeats:])} ms, server hit "
                 f"{' / '.join(f'{s * 1000:.1f}' for _, s in pairs[-args.hit_repeats:])} ms")
    finally:
        for llm in engines.values():
            shutdown_llm(llm)
        server.stop()
    best = {k: min(v) for k, v in samples.items()}
    ratio = statistics.median(s / i for i, s in pairs)
    _say("")
    print_table(["case", "best_ttft_ms", "median_ttft_ms", "note"], [
        ["miss", best["miss"] * 1000, statistics.median(samples["miss"]) * 1000, "cold prefill (both engines)"],
        ["in_process_hit", best["in_process_hit"] * 1000, statistics.median(samples["in_process_hit"]) * 1000,
         f"{min(loaded['in_process'])} tokens loaded from the in-process host tier"],
        ["server_hit", best["server_hit"] * 1000, statistics.median(samples["server_hit"]) * 1000,
         f"{min(loaded['server'])} tokens loaded through the lmcache server"],
        ["vllm_hit", best["vllm_hit"] * 1000, statistics.median(samples["vllm_hit"]) * 1000,
         "vLLM's own prefix cache (floor)"],
    ], say=_say)
    _say(f"server hit vs in-process hit: {ratio:.2f}x the TTFT, median of {len(pairs)} back-to-back pairs, same "
         f"prompt (target <= {SERVER_VS_IN_PROCESS_TARGET:g}x); machine: {machine_name()}")
    met = ratio <= SERVER_VS_IN_PROCESS_TARGET and min(loaded["server"]) > 0 and min(loaded["in_process"]) > 0
    return {
        "bench": "e2e", "device": device_type, "machine": machine_name(), "mode": "server_vs_in_process",
        "model": "reference random Llama 8x1024 (8 heads, 4 KV heads)" if not args.model else args.model,
        "prompt_tokens": args.prompt_tokens, "rounds": args.rounds, "hit_repeats": args.hit_repeats,
        "loaded_tokens_in_process": min(loaded["in_process"]), "loaded_tokens_server": min(loaded["server"]),
        "ttft_miss_s": round(best["miss"], 4),
        "ttft_in_process_hit_s": round(best["in_process_hit"], 4),
        "ttft_server_hit_s": round(best["server_hit"], 4),
        "ttft_vllm_hit_s": round(best["vllm_hit"], 4),
        "server_hit_vs_in_process_hit": round(ratio, 3),
        "best_server_hit_vs_best_in_process_hit": round(best["server_hit"] / best["in_process_hit"], 3),
        "targets_met": bool(met),
    }
