"""Running vLLM engines for the end-to-end tests, and comparing their outputs.

Each engine runs in its own process (tests/helpers/driver.py) so tests stay isolated;
several scenarios share one engine to keep the number of engine starts small.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lmcache.testing.processes import child_env
from lmcache.testing.vllm_server import CPU_ENGINE_ENV
from lmcache.testing.tolerances import EXACT_TOLERANCE, LOGPROB_TOLERANCE  # noqa: F401 (re-exported to the tests)

DRIVER = Path(__file__).with_name("driver.py")
REPO = Path(__file__).resolve().parents[2]

# Engines on this CPU-only machine (lmcache/testing/vllm_server.py says why each), and
# LMCache's test hooks on.
ENGINE_ENV = {**CPU_ENGINE_ENV, "LMCACHE_TEST_HOOKS": "1"}

# The driver's engines: vLLM's engine core in the driver's own process, one process
# start and vLLM import fewer per engine (~15 s here). The driver asks for the "mp"
# executor: the workers, where LMCache's worker side runs, stay in processes of
# their own, apart from its scheduler side, as in every deployment.
ENGINE_CORE_IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}



class EngineRunError(RuntimeError):
    pass


def run_engine(spec: dict, workdir: Path, name: str, timeout: float = 600, env: dict | None = None) -> dict:
    """Run one engine through `spec["steps"]`; returns the driver's results."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    full_env = child_env({**ENGINE_ENV, **ENGINE_CORE_IN_PROCESS, **(env or {})})
    with open(log_path, "wb") as log:
        proc = subprocess.run(
            [sys.executable, str(DRIVER), str(spec_path), str(out_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(workdir), env=full_env, timeout=timeout,
        )
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text(errors="replace")[-6000:]
        raise EngineRunError(f"engine {name!r} exited with {proc.returncode}; log {log_path}:\n{tail}")
    return json.loads(out_path.read_text())


def logprob_mismatches(reference: dict, candidate: dict, tolerance: float = LOGPROB_TOLERANCE) -> list[str]:
    """Differences between two outputs of the same prompt: generated tokens, and
    the log-probability of every top token both report, position by position.
    Empty when they agree."""
    problems = []
    ref_ids, got_ids = reference["token_ids"], candidate["token_ids"]
    if ref_ids != got_ids:
        problems.append(f"generated tokens differ: {ref_ids} vs {got_ids}")
    for pos, (ref, got) in enumerate(zip(reference["logprobs"], candidate["logprobs"])):
        ref_map, got_map = dict((t, lp) for t, lp in ref), dict((t, lp) for t, lp in got)
        common = set(ref_map) & set(got_map)
        if not common or len(common) < min(len(ref_map), len(got_map)) - 1:
            # near-ties may swap the last of the top-k, nothing more
            problems.append(f"position {pos}: top tokens differ: {sorted(ref_map)} vs {sorted(got_map)}")
        for token in sorted(common):
            diff = abs(ref_map[token] - got_map[token])
            if diff > tolerance:
                problems.append(f"position {pos}, token {token}: logprob {ref_map[token]:.4f} vs {got_map[token]:.4f}")
    return problems




def assert_same_outputs(reference_step: dict, candidate_step: dict, tolerance: float = LOGPROB_TOLERANCE) -> None:
    refs, gots = reference_step["outputs"], candidate_step["outputs"]
    assert len(refs) == len(gots)
    problems = []
    for i, (ref, got) in enumerate(zip(refs, gots)):
        problems += [f"prompt {i}: {p}" for p in logprob_mismatches(ref, got, tolerance)]
    assert not problems, f"outputs differ from the reference (tolerance {tolerance}):\n" + "\n".join(problems[:20])


def assert_identical_outputs(reference_step: dict, candidate_step: dict) -> None:
    assert_same_outputs(reference_step, candidate_step, EXACT_TOLERANCE)
