"""Runs tests/helpers/patched_probe.py in a subprocess and returns its JSON results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.upstream_lmcache import REPO_ROOT

PROBE = Path(__file__).resolve().with_name("patched_probe.py")


def run_probe(tree: Path, *, emulate: bool, cwd: Path, timeout: float = 600) -> dict:
    cmd = [sys.executable, str(PROBE), "--tree", str(tree)]
    if emulate:
        cmd += ["--ours", str(REPO_ROOT), "--emulate"]
    # A cwd outside the repo, so the name `lmcache` resolves to the patched tree.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("LMCACHE_DEVICE", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"probe exited {proc.returncode}\nstdout tail: {proc.stdout[-2000:]}\n"
            f"stderr tail: {proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1])


def section(results: dict, name: str) -> dict:
    """One section of the probe's results; its traceback fails the test."""
    value = results[name]
    if "error" in value:
        raise AssertionError(f"probe section {name!r} failed in the patched tree:\n{value['error']}")
    return value


def run_probes(jobs: dict[str, tuple[Path, list[str]]], *, script: str, cwd: Path, timeout: float = 600) -> dict:
    """Several trees at once, each in its own process under the HPU emulation:
    name -> (tree, extra args) in, name -> that probe's JSON results out."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("LMCACHE_DEVICE", None)
    procs = {}
    for name, (tree, extra) in jobs.items():
        cmd = [sys.executable, str(PROBE.with_name(script)), "--tree", str(tree), "--ours", str(REPO_ROOT), *extra]
        procs[name] = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise AssertionError(f"probe {name} exited {proc.returncode}\nstdout tail: {out[-2000:]}\n"
                                 f"stderr tail: {err[-4000:]}")  # fmt: skip
        results[name] = json.loads(lines[-1])
    return results
