"""`bench e2e` refuses settings it cannot measure before starting vLLM, and its server-vs-in-process mode runs."""

import subprocess
import sys

import pytest

from tests.helpers.bench_cli import run_bench


@pytest.mark.parametrize("args", [["--hit-repeats", "0"], ["--rounds", "0"], ["--prompt-tokens", "100"]])
def test_bench_e2e_refuses_bad_settings(args):
    out = subprocess.run([sys.executable, "-m", "lmcache", "bench", "e2e", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--hit-repeats >= 1" in out.stderr + out.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("mode", [[], ["--server-vs-in-process"]], ids=["in-process", "server-vs-in-process"])
def test_the_smallest_bench_e2e_runs_and_loads_the_hit(tiny_llama, mode):
    """The smallest real run of `bench e2e` (the small random Llama, a prompt shorter than
    the bench's 1,024-token warm-up): it finishes, prints its JSON line last, and every
    engine loaded the hit (in process, and through a real `lmcache server`). Its timings
    are the bench's to report, not checked here."""
    result, _ = run_bench("e2e", *mode, "--model", tiny_llama, "--prompt-tokens", "768", "--rounds", "1",
                          "--hit-repeats", "1", timeout=900)  # the JSON line comes last
    loaded = [v for k, v in result.items() if k.startswith("loaded_tokens")]
    assert loaded == [767] * (2 if mode else 1)  # all but the last token, which vLLM computes
