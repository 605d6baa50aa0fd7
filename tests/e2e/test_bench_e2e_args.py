"""`bench e2e` refuses settings it cannot measure before starting vLLM."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args", [["--hit-repeats", "0"], ["--rounds", "0"], ["--prompt-tokens", "100"]])
def test_bench_e2e_refuses_bad_settings(args):
    out = subprocess.run([sys.executable, "-m", "lmcache", "bench", "e2e", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--hit-repeats >= 1" in out.stderr + out.stdout
