"""What the demo and the benchmarks set before they start vLLM on a platform."""

from __future__ import annotations

import os


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
