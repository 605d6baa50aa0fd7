"""The demo's and bench e2e's output helpers: vLLM's output (this process's and its child
processes', Python or not) goes to a log file while our lines reach the terminal."""

import os
import subprocess
import sys

import pytest

from lmcache import console

SCRIPT = r"""
import os, subprocess, sys
from lmcache.console import Console, Phase, quiet_vllm
fail = sys.argv[1] == "fail"
with quiet_vllm("t", verbose=sys.argv[1] == "verbose"):
    with Phase(1, 1, "a phase"):
        print("INFO from python in this process")
        sys.stderr.write("WARNING on stderr\n")
        subprocess.run(["sh", "-c", "echo INFO from a child process; echo child stderr >&2"])
        Console.say("our line")
        if fail:
            raise SystemExit(3)
print("after: stdout is back")
"""


def _run(mode, tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=120)


def _log(tmp_path):
    logs = list((tmp_path / "lmcache" / "logs").iterdir())
    assert len(logs) == 1
    return logs[0].read_text()


def test_quiet_sends_everything_else_to_the_log(tmp_path):
    proc = _run("quiet", tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "our line" in out and "[1/1] a phase ...\nour line\n      done (" in out and "after: stdout is back" in out
    assert "INFO" not in out and "child" not in out and proc.stderr == ""
    log = _log(tmp_path)
    for line in ("INFO from python in this process", "WARNING on stderr", "INFO from a child process",
                 "child stderr"):
        assert line in log


def test_a_failure_shows_the_logs_last_lines(tmp_path):
    proc = _run("fail", tmp_path)
    assert proc.returncode == 3
    assert "--- last 4 lines of" in proc.stdout and "child stderr" in proc.stdout


def test_verbose_redirects_nothing(tmp_path):
    proc = _run("verbose", tmp_path)
    assert "INFO from a child process" in proc.stdout and "WARNING on stderr" in proc.stderr
    assert not (tmp_path / "lmcache" / "logs").exists() or not list((tmp_path / "lmcache" / "logs").iterdir())


@pytest.mark.parametrize("elapsed,done,total,text", [
    (10, 0, 5, "10 s elapsed"),
    (10, 1, 5, "10 s elapsed, about 40 s left"),
    (10, 5, 5, "10 s elapsed"),
])
def test_eta_text(elapsed, done, total, text):
    assert console.eta_text(elapsed, done, total) == text


def test_phase_eta_comes_from_the_last_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(console.Console, "stream", sys.stdout)
    with console.Phase(1, 2, "first", eta_key="k"):
        pass
    with console.Phase(2, 2, "second", eta_key="k"):
        pass
    out = capsys.readouterr().out
    assert "[1/2] first ...\n" in out and "[2/2] second ... (about 0 s last time)" in out
