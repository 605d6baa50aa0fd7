"""Runs one vLLM engine (with or without LMCache) through a list of steps.

    python tests/helpers/driver.py SPEC.json OUT.json

Each engine runs in its own process (vLLM spawns its workers; LLM(...) must be
created under `if __name__ == "__main__"`). The spec names the model, the connector
("LMCacheConnectorV1", "lmcache" or null), its "kv_role" (default kv_both), LMCache
settings and the steps; the
results (outputs with log-probabilities, TTFTs, LMCache counters) go to OUT.json.

Steps:
  {"op": "generate", "name": N, "prompts": [[ids...], ...], "max_tokens": 4,
   "logprobs": 5, "reset_prefix_cache": true}   one batch of prompts, submitted together;
      a prompt may also be {"ids": [...], "cache_salt": S, "lora": NAME (of spec["loras"]:
      {name: path}), "images": [seed, ...] (random images, lmcache.testing.tiny_lora_vlm)};
      with "until_loaded": T (and "timeout": S) the batch is generated again, a second
      apart, until LMCache loaded T tokens for its first prompt or S seconds passed
      (a store coming back after a failover or a restart); "attempts" says how often
  {"op": "control", "command": {...}}            LMCache test hooks (LMCACHE_TEST_HOOKS=1)
  {"op": "flush"}                                wait for queued disk/remote writes
  {"op": "stats"}                                LMCache counters of every rank
  {"op": "kill", "pid": P}                       SIGKILL a process (a Redis server)
  {"op": "remove_files", "dir": D}               delete every file in D (a disk tier's chunks)
  {"op": "copy_files", "src": S, "dir": D}       copy every file of S into D (put them back)
  {"op": "start_process", "argv": [...], "log": L, "pid_file": F, "port": P}
                                                 start a process of its own (an lmcache server)
                                                 and wait until it accepts connections on P
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import uuid


def build_llm(spec: dict):
    from vllm import LLM

    kv_transfer_config = None
    if spec.get("connector"):
        extra = {f"lmcache.{k}": v for k, v in (spec.get("lmcache") or {}).items()}
        extra.update(spec.get("extra_config") or {})
        kv_transfer_config = {
            "kv_connector": spec["connector"],
            "kv_role": spec.get("kv_role", "kv_both"),
            "engine_id": spec.get("engine_id") or str(uuid.uuid4()),
            "kv_connector_extra_config": extra,
            "kv_load_failure_policy": spec.get("kv_load_failure_policy", "recompute"),
        }
    args = dict(
        model=spec["model"],
        dtype=spec.get("dtype", "bfloat16"),
        max_model_len=4096,
        max_num_batched_tokens=4096,
        enforce_eager=True,
        gpu_memory_utilization=0.2,
        seed=0,
        # the workers in processes of their own, as vLLM's CPU backend runs them, also
        # with the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        distributed_executor_backend="mp",
    )
    args.update(spec.get("llm") or {})
    return LLM(kv_transfer_config=kv_transfer_config, **args)


def top_logprobs(position) -> list[list]:
    items = sorted(position.items(), key=lambda kv: -kv[1].logprob)
    return [[int(token), float(lp.logprob)] for token, lp in items]


def lmcache_stats(llm) -> list:
    from lmcache.integration.vllm.metrics.worker_stats import worker_stats

    return worker_stats(llm)


def reset_prefix_cache(llm, with_lmcache: bool, timeout: float = 10.0) -> bool:
    from lmcache.integration.vllm.metrics.worker_stats import reset_vllm_prefix_cache

    from vllm.v1.engine.core_client import InprocClient

    if not with_lmcache:
        return llm.reset_prefix_cache()
    # With the engine core in this process (harness.ENGINE_CORE_IN_PROCESS) nothing
    # steps it between requests: the workers could not report the saves that finished,
    # and vLLM would keep those requests' blocks. Its own process steps while such
    # requests remain; this does the same.
    in_process = isinstance(llm.llm_engine.engine_core, InprocClient)
    deadline = time.monotonic() + timeout
    while not reset_vllm_prefix_cache(llm, timeout=0.2):
        if time.monotonic() > deadline:
            return False
        if in_process:
            llm.llm_engine.step()
    return True


def vllm_prompt(prompt, loras: dict):
    """(vLLM prompt, LoRARequest or None) of a spec prompt (a list of ids or an object)."""
    if isinstance(prompt, list):
        return {"prompt_token_ids": prompt}, None
    out = {"prompt_token_ids": prompt["ids"]}
    if prompt.get("cache_salt"):
        out["cache_salt"] = prompt["cache_salt"]
    if prompt.get("images"):
        from lmcache.testing.tiny_lora_vlm import random_image

        out["multi_modal_data"] = {"image": [random_image(seed) for seed in prompt["images"]]}
    lora = None
    if prompt.get("lora"):
        from vllm.lora.request import LoRARequest

        name = prompt["lora"]
        lora = LoRARequest(name, sorted(loras).index(name) + 1, loras[name])
    return out, lora


def run_generate(llm, step: dict, with_lmcache: bool, loras: dict | None = None) -> dict:
    from vllm import SamplingParams

    reset_ok = reset_prefix_cache(llm, with_lmcache) if step.get("reset_prefix_cache", True) else None
    params = SamplingParams(temperature=0.0, max_tokens=step.get("max_tokens", 4), logprobs=step.get("logprobs", 5),
                            extra_args=step.get("extra_args"))
    before = lmcache_stats(llm) if with_lmcache else None
    start = time.perf_counter()
    prompts, lora_requests = zip(*(vllm_prompt(p, loras or {}) for p in step["prompts"]))
    outputs = llm.generate(list(prompts), params, use_tqdm=False,
                           lora_request=list(lora_requests) if any(lora_requests) else None)
    seconds = time.perf_counter() - start
    after = lmcache_stats(llm) if with_lmcache else None
    result = {
        "seconds": seconds,
        "reset_prefix_cache": reset_ok,
        "outputs": [
            {"token_ids": list(o.outputs[0].token_ids), "logprobs": [top_logprobs(p) for p in o.outputs[0].logprobs],
             "num_prompt_tokens": len(o.prompt_token_ids or ()), "num_cached_tokens": o.num_cached_tokens}
            for o in outputs
        ],
    }
    if with_lmcache:
        result["stats"] = after
        result["loaded_tokens"] = [
            (a["adapter"]["loaded_tokens"] - b["adapter"]["loaded_tokens"]) if a and b else None
            for a, b in zip(after, before)
        ]
        result["load_failed_tokens"] = [
            (a["adapter"]["load_failed_tokens"] - b["adapter"]["load_failed_tokens"]) if a and b else None
            for a, b in zip(after, before)
        ]
    return result


def generate_until_loaded(llm, step: dict, with_lmcache: bool, loras: dict | None = None) -> dict:
    deadline = time.monotonic() + step.get("timeout", 60)
    attempts = 1
    result = run_generate(llm, step, with_lmcache, loras)
    while (result["loaded_tokens"][0] or 0) < step["until_loaded"] and time.monotonic() < deadline:
        time.sleep(1.0)
        attempts += 1
        result = run_generate(llm, step, with_lmcache, loras)
    result["attempts"] = attempts
    return result


def start_process(step: dict) -> dict:
    import socket
    import subprocess

    with open(step["log"], "ab") as log:
        proc = subprocess.Popen(step["argv"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    with open(step["pid_file"], "w") as f:
        f.write(str(proc.pid))
    deadline = time.monotonic() + step.get("timeout", 60)
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", int(step["port"])), timeout=0.5).close()
            return {"pid": proc.pid}
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{step['argv']} did not listen on port {step['port']} (log {step['log']})")


def main(spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    results: dict = {"steps": {}}
    started = time.perf_counter()
    llm = build_llm(spec)
    results["engine_start_s"] = time.perf_counter() - started
    # "with_lmcache": LMCache chosen another way (e.g. kv_offloading_backend in "llm")
    with_lmcache = bool(spec.get("connector") or spec.get("with_lmcache"))
    for i, step in enumerate(spec["steps"]):
        name = step.get("name", f"step{i}")
        op = step["op"]
        if op == "generate" and "until_loaded" in step:
            results["steps"][name] = generate_until_loaded(llm, step, with_lmcache, spec.get("loras"))
        elif op == "generate":
            results["steps"][name] = run_generate(llm, step, with_lmcache, spec.get("loras"))
        elif op == "control":
            from lmcache.integration.vllm.metrics.worker_stats import control

            results["steps"][name] = control(llm, step["command"])
        elif op == "flush":
            from lmcache.integration.vllm.metrics.worker_stats import control

            results["steps"][name] = control(llm, {"flush": step.get("timeout", 30)})
        elif op == "stats":
            results["steps"][name] = lmcache_stats(llm)
        elif op == "kill":
            os.kill(int(step["pid"]), signal.SIGKILL)
            results["steps"][name] = {"killed": step["pid"]}
        elif op == "remove_files":
            names = sorted(os.listdir(step["dir"]))
            for file_name in names:
                os.unlink(os.path.join(step["dir"], file_name))
            results["steps"][name] = {"removed": len(names)}
        elif op == "copy_files":
            names = sorted(os.listdir(step["src"]))
            for file_name in names:
                shutil.copyfile(os.path.join(step["src"], file_name), os.path.join(step["dir"], file_name))
            results["steps"][name] = {"copied": len(names)}
        elif op == "start_process":
            results["steps"][name] = start_process(step)
        else:
            raise ValueError(f"unknown step op {op!r}")
        print(f"driver: {name} done", file=sys.stderr, flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
