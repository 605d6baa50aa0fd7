"""`python -m lmcache bench ...` in a child process, as a user runs it: its JSON line
(printed last) and its whole stdout. A bench that fails fails the test with its own
stderr, so a CI log says why."""

import json
import os
import subprocess
import sys

from tests.helpers.children import REPO


def run_bench(*args: str, timeout: float) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-m", "lmcache", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, (f"bench {' '.join(args)} exited {proc.returncode}\n"
                                  f"stderr:\n{proc.stderr[-4000:]}\nstdout:\n{proc.stdout[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout
