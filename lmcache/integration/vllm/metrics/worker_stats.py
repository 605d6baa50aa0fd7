"""Read LMCache's counters from the workers of a running vLLM `LLM`.

vLLM runs the workers in their own processes; each answers on its lookup socket
(lookup_channel), so the process that owns the `LLM` can ask them:

    from lmcache.integration.vllm.metrics.worker_stats import worker_stats, loaded_tokens
    worker_stats(llm)   # one dict per rank: {"rank", "adapter": {...}, "engine": {...}}
    loaded_tokens(llm)  # tokens rank 0 loaded from LMCache so far
"""

from __future__ import annotations

from lmcache.integration.vllm.lookup_channel import LookupClient, socket_address


def _config(llm):
    return llm.llm_engine.vllm_config


def client_for(llm, timeout_ms: int = 10000) -> LookupClient:
    config = _config(llm)
    if config.kv_transfer_config is None:
        raise ValueError("this LLM was started without a kv_transfer_config: LMCache is not in use")
    parallel = config.parallel_config
    world = int(parallel.tensor_parallel_size) * int(parallel.pipeline_parallel_size)
    engine_id = str(config.kv_transfer_config.engine_id)
    return LookupClient([socket_address(engine_id, r) for r in range(world)], timeout_ms)


def worker_stats(llm) -> list[dict | None]:
    client = client_for(llm)
    try:
        return client.stats()
    finally:
        client.close()


def loaded_tokens(llm) -> int:
    stats = worker_stats(llm)
    first = stats[0] if stats else None
    if not first:
        raise RuntimeError("LMCache worker 0 did not answer (is the connector LMCache's?)")
    return int(first["adapter"]["loaded_tokens"])


def control(llm, command: dict) -> list[dict | None]:
    """Test hooks (only in workers started with LMCACHE_TEST_HOOKS=1)."""
    client = client_for(llm)
    try:
        return client.control(command)
    finally:
        client.close()


def reset_vllm_prefix_cache(llm, timeout: float = 10.0) -> bool:
    """`llm.reset_prefix_cache()`, retried while vLLM refuses because blocks are still
    held (with asynchronous saving, a finished request keeps its blocks until its save
    is done, a few steps later). True once vLLM's own prefix cache is empty."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if llm.reset_prefix_cache():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def shutdown_llm(llm) -> None:
    """Stop an LLM's engine core and workers now, not at interpreter exit (vLLM logs its
    shutdown to stdout, and a benchmark's JSON result must be the last line there)."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
    gc.collect()
