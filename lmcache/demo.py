"""`python -m lmcache demo`: vLLM with LMCache, one long prompt, twice.

With no arguments it builds a small random Llama locally (no downloads), starts vLLM
on the platform it finds with LMCache on its local CPU tier, and sends a long prompt:
once cold (vLLM computes it, LMCache saves its KV), then again after
`llm.reset_prefix_cache()` so vLLM's own cache cannot help: LMCache must load it. It
prints the tokens loaded from LMCache (the workers' own counters), the time to first
token (TTFT) cold, with LMCache and with vLLM's own prefix cache, and whether the
outputs with LMCache are identical to those with vLLM's own prefix cache (same
split, same KV) and match a run that reads no cache (within bf16 rounding).

    python -m lmcache demo [--model PATH] [--prompt-tokens N] [--config FILE] [--verbose]

Exit status 0 when LMCache loaded the prompt and the outputs agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

from lmcache.console import Console, Phase, print_table, quiet_vllm
from lmcache.testing.tiny_llama import DEMO_MODEL_DIR, make_prompt, model_cache_dir
from lmcache.testing.tolerances import EXACT_TOLERANCE, LOGPROB_TOLERANCE
from lmcache.testing.vllm_env import prepare_platform



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1]
    parser.add_argument("--model", help="a local Hugging Face model directory (default: build a small random Llama)")
    parser.add_argument("--prompt-tokens", type=int, default=4097,
                        help="prompt length in tokens (default 4097: 16 chunks of 256 plus one)")
    parser.add_argument("--config", help="an LMCache YAML config file (default: the local CPU tier, 2 GB)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens to generate per run (default 8)")
    parser.add_argument("--connector", default="LMCacheConnectorV1", choices=["LMCacheConnectorV1", "lmcache"],
                        help="vLLM's built-in LMCache connector (default) or ours ('lmcache')")
    parser.add_argument("--verbose", action="store_true",
                        help="show vLLM's own log lines here (default: they go to a log file under ~/.cache/lmcache/logs)")


def say(msg: str = "") -> None:
    Console.say(msg)


def _check(args) -> None:
    if args.prompt_tokens < 2:
        raise SystemExit(f"--prompt-tokens {args.prompt_tokens}: accepted: an integer >= 2")
    if args.max_tokens < 1:
        raise SystemExit(f"--max-tokens {args.max_tokens}: accepted: an integer >= 1")
    if args.model and not Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model!r} is not a directory; accepted: a local Hugging Face model directory")
    if args.config and not Path(args.config).is_file():
        raise SystemExit(f"--config {args.config!r} does not exist; accepted: the path of an LMCache YAML file")


def _aligned_prompt_tokens(requested: int, extra: dict) -> int:
    """The largest `k * chunk_size + 1` <= requested (at least one chunk plus one)."""
    from lmcache.v1.config import load_config

    chunk = load_config(extra).chunk_size
    return max(requested - 1, chunk) // chunk * chunk + 1


def _top_logprobs(completion) -> list[dict[int, float]]:
    return [{int(t): float(lp.logprob) for t, lp in pos.items()} for pos in (completion.logprobs or [])]


def _compare(reference, candidate, tolerance: float) -> tuple[bool, float]:
    """Same generated tokens, and the largest log-probability gap over the top tokens."""
    same_tokens = list(reference.token_ids) == list(candidate.token_ids)
    gap = 0.0
    for ref, got in zip(_top_logprobs(reference), _top_logprobs(candidate)):
        for token in set(ref) & set(got):
            gap = max(gap, abs(ref[token] - got[token]))
    return same_tokens and gap <= tolerance, gap


def run(args) -> int:
    _check(args)
    with quiet_vllm("demo", args.verbose):
        return _run(args)


def _run(args) -> int:
    from lmcache.utils import get_device_type

    device_type = get_device_type()
    total = 5 if args.model else 6
    step = 0
    if args.model:
        model = args.model
    else:
        from lmcache.testing.tiny_llama import TinyLlamaSpec, build_tiny_llama

        step += 1
        spec = TinyLlamaSpec()
        with Phase(step, total, f"building a small random Llama ({spec.num_layers} layers, hidden {spec.hidden_size}; "
                                "no downloads, kept in ~/.cache/lmcache)"):
            model = str(build_tiny_llama(model_cache_dir(DEMO_MODEL_DIR), spec))
    llm_args = prepare_platform(device_type)
    if args.config:
        os.environ["LMCACHE_CONFIG_FILE"] = os.path.abspath(args.config)
        extra = {}
    else:
        extra = {"lmcache.local_cpu": True, "lmcache.max_local_cpu_size": 2.0}
    num_tokens = _aligned_prompt_tokens(args.prompt_tokens, extra)
    if num_tokens != args.prompt_tokens:
        say(f"(prompt length {args.prompt_tokens} -> {num_tokens} tokens: whole chunks plus one, so that vLLM's "
            "own prefix cache and LMCache hold the same prefix and their outputs can be compared exactly)")

    step += 1
    with Phase(step, total, f"starting vLLM on {device_type} with LMCache ({args.connector})",
               eta_key=f"demo.start_vllm.{device_type}"):
        from vllm import LLM, SamplingParams

        llm = LLM(
            model=model,
            max_model_len=num_tokens + args.max_tokens + 16,
            max_num_batched_tokens=max(2048, min(num_tokens + 16, 8192)),
            seed=0,
            kv_transfer_config={
                "kv_connector": args.connector,
                "kv_role": "kv_both",
                "engine_id": f"lmcache-demo-{uuid.uuid4()}",
                "kv_connector_extra_config": extra,
                # A chunk that cannot be loaded is recomputed, never a failed request.
                "kv_load_failure_policy": "recompute",
            },
            **llm_args,
        )
    from lmcache.integration.vllm.metrics.worker_stats import loaded_tokens, reset_vllm_prefix_cache, shutdown_llm

    vocab = llm.get_tokenizer().vocab_size if args.model else None
    prompt = make_prompt(model, num_tokens, vocab, seed=1)
    warm = make_prompt(model, min(300, num_tokens), vocab, seed=2)

    def generate(ids, max_tokens, **extra_params):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5, **extra_params)
        start = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0]
        return out, time.perf_counter() - start

    step += 1
    with Phase(step, total, "warming up (first requests pay one-time costs)", eta_key=f"demo.warmup.{device_type}"):
        generate(warm, 2)
        reset_vllm_prefix_cache(llm)
        generate(warm, 2)

    step += 1
    with Phase(step, total, f"time to first token of the {num_tokens}-token prompt: cold, from LMCache, from "
                            "vLLM's own prefix cache"):
        reset_vllm_prefix_cache(llm)
        before = loaded_tokens(llm)
        _, ttft_cold = generate(prompt, 1)
        reset_vllm_prefix_cache(llm)  # so that LMCache, not vLLM's own cache, must provide the prefix
        after_cold = loaded_tokens(llm)
        _, ttft_lmcache = generate(prompt, 1)
        loaded = loaded_tokens(llm) - after_cold
        _, ttft_vllm = generate(prompt, 1)

    step += 1
    with Phase(step, total, f"comparing {args.max_tokens} generated tokens: no cache, vLLM's own cache, LMCache"):
        reset_vllm_prefix_cache(llm)
        # computes the whole prompt, as the cold run whose KV LMCache saved
        reference, _ = generate(prompt, args.max_tokens, skip_reading_prefix_cache=True)
        vllm_hit, _ = generate(prompt, args.max_tokens)
        reset_vllm_prefix_cache(llm)
        lmcache_hit, _ = generate(prompt, args.max_tokens)
    shutdown_llm(llm)

    same_as_vllm, vllm_gap = _compare(vllm_hit, lmcache_hit, EXACT_TOLERANCE)
    close_to_cold, cold_gap = _compare(reference, lmcache_hit, LOGPROB_TOLERANCE)
    ok = loaded > 0 and same_as_vllm and close_to_cold
    say("")
    say(f"LMCache demo on {device_type}: {num_tokens}-token prompt, model {model}")
    say("")
    print_table(["time to first token", "ms", "vs cold"], [
        ["cold: vLLM computes the prompt", f"{ttft_cold * 1000:.1f}", "1.0x"],
        ["LMCache: the prompt's KV loaded", f"{ttft_lmcache * 1000:.1f}", f"{ttft_cold / ttft_lmcache:.1f}x faster"],
        ["vLLM's own prefix cache (the floor)", f"{ttft_vllm * 1000:.1f}", f"{ttft_cold / ttft_vllm:.1f}x faster"],
    ], say=lambda line: say("  " + line))
    say("")
    say(f"  tokens loaded from LMCache:  {loaded} of {num_tokens} (the last token is always computed; "
        f"cold run loaded {after_cold - before})")
    say(f"  outputs, LMCache vs vLLM's own prefix cache: {'identical' if same_as_vllm else 'DIFFERENT'} "
        f"(max |d logprob| {vllm_gap:.5f}; same split, same KV: must be identical)")
    say(f"  outputs, LMCache vs no cache:  {'match' if close_to_cold else 'DIFFER'} "
        f"(max |d logprob| {cold_gap:.4f}, tolerance {LOGPROB_TOLERANCE}: bf16 rounding of another split)")
    say("  result: " + ("OK, the prompt's KV came back from LMCache, with the same outputs" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m lmcache.demo")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
