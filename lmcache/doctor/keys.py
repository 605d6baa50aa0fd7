"""Keys are stable: the same prompt gives the same chunk keys in two fresh processes
(different hash seeds) and in this one, so a cache written by one vLLM process is found
by the next. Also names what else decides whether a prompt can hit at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lmcache.doctor.report import FAIL, OK, Finding

_SCRIPT = """
import json, sys, types
import torch
from lmcache.v1.token_database import ChunkedTokenDatabase
chunk = int(sys.argv[1])
meta = types.SimpleNamespace(model_name="doctor/probe-model", world_size=1, worker_id=0, kv_dtype=torch.bfloat16,
                             kv_shape=(2, 2, chunk, 2, 64), use_mla=False, layout_fingerprint="")
tokens = [(i * 7919) % 32000 for i in range(2 * chunk + 7)]
print(json.dumps([c.key.to_string() for c in ChunkedTokenDatabase(chunk, meta).chunks(tokens)]))
"""


def _spawn(chunk_size: int, seed: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, str(chunk_size)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def key_strings(chunk_size: int, seeds=("1", "2"), timeout: float = 120.0) -> list[list[str]]:
    """The probe prompt's keys as computed by one fresh process per hash seed."""
    procs = [_spawn(chunk_size, s) for s in seeds]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"the key process failed: {stderr.strip().splitlines()[-1:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def checks(config) -> list[Finding]:
    chunk = config.chunk_size if config is not None else 256
    try:
        first, second = key_strings(chunk)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        return [Finding("keys.stable", FAIL, f"could not compute keys in a fresh process: {exc}",
                        "run `python -c 'import lmcache.v1.token_database'` to see the import error")]
    if first != second or not first:
        differ = sum(a != b for a, b in zip(first, second))
        return [Finding("keys.stable", FAIL, f"the same prompt gave different keys in two processes ({differ} of "
                                             f"{len(first)} chunks differ): no process finds another's cache",
                        "report this as a bug: keys must not depend on PYTHONHASHSEED or the process")]
    unfull = config is not None and config.save_unfull_chunk
    return [Finding("keys.stable", OK,
                    f"same prompt, two fresh processes (PYTHONHASHSEED 1 and 2): the same {len(first)} keys "
                    f"(e.g. {first[0][:60]}...). A hit also needs the same model name, tensor-parallel size, "
                    f"rank, KV dtype and layout, and chunk_size={chunk} in both; prompts shorter than "
                    f"{chunk} tokens are {'stored as a partial chunk' if unfull else 'never stored'} "
                    f"(save_unfull_chunk={str(unfull).lower()})")]
