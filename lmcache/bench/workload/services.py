"""The vLLM server as the workload and soak benchmarks drive it: its arguments, LMCache's
stats and flush through the lookup socket, vLLM's own prefix-cache counters, resident
memory and waiting out its idle spin. The process itself is started by the one launcher
(lmcache/testing/vllm_server.py), as are the cache servers (lmcache/testing/).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from lmcache.testing.vllm_server import VllmApiProcess

# vLLM's own name for LMCache's connector: it imports lmcache.integration.vllm (this tree,
# through PYTHONPATH) and needs no installed entry point, unlike the short name "lmcache".
CONNECTOR = "LMCacheConnectorV1"
# Our own connector class, by module path (the one with async saving and loading).
DYNAMIC_CONNECTOR = {"kv_connector": "LMCacheConnectorV1Dynamic",
                     "kv_connector_module_path": "lmcache.integration.vllm.lmcache_connector_v1"}
# vLLM's CPU platform always runs the model in a worker process (the multiproc executor), and
# that worker busy-polls its shared-memory queue (sched_yield) for 1 s after every step, as
# does the engine core on its reply queue (SpinCondition's busy_loop_s in
# vllm/distributed/device_communicators/shm_broadcast.py). Side by side on two cores, a
# server measured right after another shares the CPU with that spin: a fresh 32-token prompt
# took ~0.6 s instead of ~0.09 s. Rounds wait it out (VllmServer.wait_idle).
VLLM_WORKER_SPIN_S = 1.0


def _cpu_seconds(procs: list) -> float:
    """User + system CPU time of these processes (those that have exited count nothing)."""
    import psutil

    total = 0.0
    for p in procs:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total




class VllmServer:
    """One OpenAI-compatible vLLM server; `lmcache` None runs vLLM alone (no connector)."""

    def __init__(self, model: str, workdir: Path, *, lmcache: dict | None, device_blocks: int,
                 block_size: int, max_model_len: int, max_num_batched_tokens: int, name: str,
                 connector: str = CONNECTOR, connector_extra: dict | None = None, prefix_caching: bool = True):
        """`connector`: the kv_connector name vLLM is given; `connector_extra` a dict: our
        LMCacheConnectorV1Dynamic class by module path, with these plain kv_connector_extra_config keys."""
        self.model = model
        self.connector = connector
        self.connector_extra = connector_extra
        self.prefix_caching = prefix_caching  # False: vLLM's own prefix cache off (--no-enable-prefix-caching)
        self.workdir = Path(workdir)
        self.lmcache = lmcache
        self.device_blocks = device_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.name = name
        self.engine_id = f"lmcache-bench-{name}-{uuid.uuid4().hex[:8]}"
        self.start_seconds = 0.0
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"vllm-{name}.log"
        # VLLM_SERVER_DEV_MODE: POST /reset_prefix_cache
        self.process = VllmApiProcess(self.arguments(), self.log_path, {"VLLM_SERVER_DEV_MODE": "1"}, self.workdir)

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.process.proc

    @proc.setter
    def proc(self, proc: subprocess.Popen | None) -> None:
        self.process.proc = proc

    @property
    def base_url(self) -> str:
        return self.process.url

    def arguments(self) -> list[str]:
        cmd = ["--model", self.model, "--seed", "0", "--dtype", "bfloat16",
               "--enforce-eager", "--block-size", str(self.block_size),
               "--num-gpu-blocks-override", str(self.device_blocks), "--max-model-len", str(self.max_model_len),
               "--max-num-batched-tokens", str(self.max_num_batched_tokens), "--max-num-seqs", "16",
               "--gpu-memory-utilization", "0.2", "--disable-uvicorn-access-log", "--max-logprobs", "5"]
        if not self.prefix_caching:
            cmd.append("--no-enable-prefix-caching")
        if self.lmcache is not None:
            extra = {f"lmcache.{k}": v for k, v in self.lmcache.items()}
            named = {"kv_connector": self.connector}
            if self.connector_extra is not None:
                named, extra = dict(DYNAMIC_CONNECTOR), {**extra, **self.connector_extra}
            cmd += ["--kv-transfer-config", json.dumps({
                **named, "kv_role": "kv_both", "engine_id": self.engine_id,
                "kv_connector_extra_config": extra, "kv_load_failure_policy": "recompute"})]
        return cmd

    def start(self, timeout: float = 600.0) -> "VllmServer":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "VllmServer":
        """Start the process and return at once (servers started side by side: launch all, then wait)."""
        self._launched = time.perf_counter()
        self.process.launch()
        return self

    def wait_ready(self, timeout: float = 600.0) -> "VllmServer":
        try:
            self.process.wait_ready(timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"vLLM server {self.name!r}: {exc}") from None
        self.start_seconds = time.perf_counter() - self._launched
        return self

    def stop(self) -> None:
        self.process.stop()

    def reset_prefix_cache(self, timeout: float = 15.0) -> bool:
        """vLLM refuses while blocks are in use (running requests, blocks held for saves)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                req = urllib.request.Request(self.base_url + "/reset_prefix_cache", method="POST", data=b"")
                with urllib.request.urlopen(req, timeout=10) as r:
                    if r.status == 200 and json.loads(r.read() or b"{}").get("success", True):
                        return True
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def worker_stats(self) -> dict | None:
        """LMCache's counters of rank 0 (its lookup socket answers any local process)."""
        if self.lmcache is None:
            return None
        from lmcache.integration.vllm.lookup_channel import LookupClient, socket_address

        client = LookupClient([socket_address(self.engine_id, 0)], 10000)
        try:
            return client.stats()[0]
        finally:
            client.close()

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for LMCache's queued disk/remote writes (a later request may look for them)."""
        if self.lmcache is None:
            return
        from lmcache.integration.vllm.lookup_channel import LookupClient, socket_address

        client = LookupClient([socket_address(self.engine_id, 0)], int(timeout * 2000))
        try:
            client.control({"flush": timeout})
        finally:
            client.close()

    def prefix_cache_counters(self) -> tuple[float, float]:
        """vLLM's own prefix cache: (queried tokens, hit tokens) from /metrics."""
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        found = {"queries": 0.0, "hits": 0.0}
        for line in text.splitlines():
            for what in found:
                if line.startswith(f"vllm:prefix_cache_{what}_total"):
                    found[what] += float(line.rsplit(" ", 1)[1])
        return found["queries"], found["hits"]

    def _processes(self) -> list:
        import psutil

        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def wait_idle(self, window_s: float = 0.1, busy_share: float = 0.1) -> float:
        """Wait until this server's processes use less than `busy_share` of one core over
        `window_s` (its worker and engine core stop spinning VLLM_WORKER_SPIN_S after their
        last step), at most that spin plus one second; returns the seconds waited."""
        start = time.perf_counter()
        deadline = start + VLLM_WORKER_SPIN_S + 1.0
        procs = self._processes()
        used = _cpu_seconds(procs)
        while time.perf_counter() < deadline:
            time.sleep(window_s)
            now = _cpu_seconds(procs)
            if now - used < busy_share * window_s:
                break
            used = now
        return time.perf_counter() - start

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its processes (engine core, workers)."""
        import psutil

        total = 0
        for p in self._processes():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total
