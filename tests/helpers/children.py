"""Test workloads in other processes: `python -m tests.helpers.workload ARGS` children."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spawn_child(args: dict, env: dict | None = None) -> subprocess.Popen:
    """Start `python -m tests.helpers.workload ARGS` (another process, fresh interpreter)."""
    # One thread each: several children share few cores, and OpenMP spinning slows them all.
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.workload", json.dumps(args)],
        cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def child_result(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])
