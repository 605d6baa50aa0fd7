"""`python -m lmcache demo`: vLLM with LMCache, one long prompt, twice.

With no arguments it builds a small random Llama locally (no downloads), starts vLLM
on the platform it finds with LMCache on its local CPU tier, and sends a long prompt:
once cold (vLLM computes it, LMCache saves its KV), then again after
`llm.reset_prefix_cache()` so vLLM's own cache cannot help: LMCache must load it. It
prints the tokens loaded from LMCache (the workers' own counters), the time to first
token (TTFT) of both runs, and whether the outputs match a run that reads no cache at
all (same tokens, log-probabilities within bf16 noise).

    python -m lmcache demo [--model PATH] [--prompt-tokens N] [--config FILE]

Exit status 0 when LMCache loaded the prompt and the outputs match, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

# Greedy outputs of the same prompt may move by bf16 rounding when part of its KV is
# loaded instead of computed (different kernels run on different chunk shapes).
LOGPROB_TOLERANCE = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1]
    parser.add_argument("--model", help="a local Hugging Face model directory (default: build a small random Llama)")
    parser.add_argument("--prompt-tokens", type=int, default=4000, help="prompt length in tokens (default 4000)")
    parser.add_argument("--config", help="an LMCache YAML config file (default: the local CPU tier, 2 GB)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate when comparing outputs")
    parser.add_argument("--connector", default="LMCacheConnectorV1", choices=["LMCacheConnectorV1", "lmcache"],
                        help="vLLM's built-in LMCache connector (default) or ours ('lmcache')")


def say(msg: str) -> None:
    print(msg, flush=True)


class Step:
    """Prints `[i/n] what ...` and, when the block ends, `done (x s)`."""

    def __init__(self, index: int, total: int, what: str):
        self.label = f"[{index}/{total}] {what}"

    def __enter__(self):
        self.start = time.perf_counter()
        print(f"{self.label} ...", flush=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            print(f"{self.label}: done ({time.perf_counter() - self.start:.1f} s)", flush=True)


def _check(args) -> None:
    if args.prompt_tokens < 2:
        raise SystemExit(f"--prompt-tokens {args.prompt_tokens}: accepted: an integer >= 2")
    if args.model and not Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model!r} is not a directory; accepted: a local Hugging Face model directory")
    if args.config and not Path(args.config).is_file():
        raise SystemExit(f"--config {args.config!r} does not exist; accepted: the path of an LMCache YAML file")


def _demo_model_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmcache" / "demo-tiny-llama"
    return cache


def prepare_platform(device_type: str) -> dict:
    """Environment and engine arguments for the platform (set before vLLM starts)."""
    llm_args: dict = {}
    if device_type == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of host memory for vLLM's KV cache
        # vLLM compiles its log-probability kernel with inductor on first use (tens of
        # seconds on a small CPU); eager is as good for a demo.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        llm_args.update(enforce_eager=True, gpu_memory_utilization=0.2)
    return llm_args


def _top_logprobs(completion) -> list[dict[int, float]]:
    return [{int(t): float(lp.logprob) for t, lp in pos.items()} for pos in (completion.logprobs or [])]


def _compare(reference, candidate) -> tuple[bool, float]:
    """Same generated tokens, and the largest log-probability gap over the top tokens."""
    same_tokens = list(reference.token_ids) == list(candidate.token_ids)
    gap = 0.0
    for ref, got in zip(_top_logprobs(reference), _top_logprobs(candidate)):
        for token in set(ref) & set(got):
            gap = max(gap, abs(ref[token] - got[token]))
    return same_tokens and gap <= LOGPROB_TOLERANCE, gap


def run(args) -> int:
    _check(args)
    from lmcache.utils import get_device_type

    device_type = get_device_type()
    total = 4 if args.model else 5
    step = 0
    if args.model:
        model = args.model
    else:
        from lmcache.testing.tiny_llama import TinyLlamaSpec, build_tiny_llama

        step += 1
        spec = TinyLlamaSpec()
        with Step(step, total, f"building a small random Llama ({spec.num_layers} layers, no downloads)"):
            model = str(build_tiny_llama(_demo_model_dir(), spec))
    llm_args = prepare_platform(device_type)
    if args.config:
        os.environ["LMCACHE_CONFIG_FILE"] = os.path.abspath(args.config)
        extra = {}
    else:
        extra = {"lmcache.local_cpu": True, "lmcache.max_local_cpu_size": 2.0}

    step += 1
    with Step(step, total, f"starting vLLM on {device_type} with LMCache ({args.connector}; a minute on a small CPU)"):
        from vllm import LLM, SamplingParams

        llm = LLM(
            model=model,
            max_model_len=args.prompt_tokens + args.max_tokens + 16,
            max_num_batched_tokens=max(2048, min(args.prompt_tokens + 16, 8192)),
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
    from lmcache.integration.vllm.worker_stats import loaded_tokens, reset_vllm_prefix_cache

    vocab = llm.get_tokenizer().vocab_size if args.model else None
    prompt = make_prompt(model, args.prompt_tokens, vocab, seed=1)
    warm = make_prompt(model, min(256, args.prompt_tokens), vocab, seed=2)

    def generate(ids, max_tokens, **extra_params):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5, **extra_params)
        start = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0]
        return out, time.perf_counter() - start

    step += 1
    with Step(step, total, "warming up (first requests pay one-time costs)"):
        generate(warm, 2)
        reset_vllm_prefix_cache(llm)
        generate(warm, 2)

    step += 1
    with Step(step, total, f"sending a {args.prompt_tokens}-token prompt twice (vLLM's prefix cache reset in between)"):
        reset_vllm_prefix_cache(llm)
        before = loaded_tokens(llm)
        cold, ttft_cold = generate(prompt, 1)
        after_cold = loaded_tokens(llm)
        reset_vllm_prefix_cache(llm)
        hit, ttft_hit = generate(prompt, 1)
        loaded = loaded_tokens(llm) - after_cold

    step += 1
    with Step(step, total, f"comparing {args.max_tokens} generated tokens with a run that reads no cache"):
        reset_vllm_prefix_cache(llm)
        with_cache, _ = generate(prompt, args.max_tokens)
        reference, _ = generate(prompt, args.max_tokens, skip_reading_prefix_cache=True)

    first_ok, first_gap = _compare(cold, hit)
    full_ok, full_gap = _compare(reference, with_cache)
    say("")
    say(f"LMCache demo on {device_type}: model {model}, prompt {args.prompt_tokens} tokens")
    say(f"  tokens loaded from LMCache:   {loaded} (cold run: {after_cold - before})")
    say(f"  TTFT without cache (cold):    {ttft_cold * 1000:.1f} ms")
    say(f"  TTFT with LMCache:            {ttft_hit * 1000:.1f} ms  ({ttft_cold / ttft_hit:.1f}x faster)")
    say(f"  first token, cold vs LMCache: {'match' if first_ok else 'DIFFER'} (max |d logprob| {first_gap:.4f})")
    say(f"  {args.max_tokens} tokens, LMCache vs no cache: {'match' if full_ok else 'DIFFER'} "
        f"(max |d logprob| {full_gap:.4f}, tolerance {LOGPROB_TOLERANCE})")
    ok = loaded > 0 and first_ok and full_ok
    say("  result: " + ("OK, the second run loaded its prefix from LMCache" if ok else "FAILED"))
    return 0 if ok else 1


def make_prompt(model: str, num_tokens: int, vocab_size: int | None, seed: int) -> list[int]:
    if vocab_size is None:
        from lmcache.testing.tiny_llama import prompt_token_ids

        return prompt_token_ids(model, num_tokens, seed=seed)
    import random

    rng = random.Random(seed)
    # Ordinary vocabulary ids (special tokens sit at the ends of most vocabularies).
    low, high = min(1000, vocab_size // 4), max(vocab_size - 1000, vocab_size // 2)
    return [rng.randrange(low, high) for _ in range(num_tokens)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m lmcache.demo")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
