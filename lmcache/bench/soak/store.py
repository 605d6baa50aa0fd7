"""The shared tier of `bench soak` (--store) and the fault it suffers during the run.

  redis          one redis-server, SIGKILLed (all it held is lost) and restarted empty
  redis-cluster  3 masters + 1 replica each; a master is SIGKILLed, its replica is
                 promoted (the fault is over only once every slot has a master again),
                 then the old master is started again and rejoins as a replica
  server         an `lmcache server` owns the host tier (the same budget, in shared memory)
                 and the disk tier (an fs L2 adapter); vLLM keeps no tier of its own. The
                 server is SIGKILLed (host memory lost) and restarted (the disk re-indexed)

`tier_keys` are the LMCache keys of the vLLM server that uses the store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

STORES = ("redis", "redis-cluster", "server")


class SoakStore:
    def __init__(self, kind: str, workdir: Path):
        if kind not in STORES:
            raise SystemExit(f"--store {kind!r}: accepted: {', '.join(STORES)}")
        self.kind = kind
        self._evicted_before = 0  # the lmcache server's evictions in its earlier lifetimes
        if kind == "redis":
            from lmcache.testing.redis_servers import RedisServer

            self._server = RedisServer(str(workdir / "redis"))
        elif kind == "server":
            self._workdir = workdir
        else:
            from lmcache.testing.redis_servers import RedisClusterGroup

            self._cluster = RedisClusterGroup(str(workdir / "redis-cluster"), masters=3, replicas=1)

    def tier_keys(self, host_gb: float, disk_dir: Path, disk_gb: float) -> dict:
        if self.kind == "server":
            return {"mp.host": "127.0.0.1", "mp.port": self._server.port}
        url = self._server.url if self.kind == "redis" else self._cluster.url
        return {"local_cpu": True, "max_local_cpu_size": host_gb, "local_disk": str(disk_dir),
                "max_local_disk_size": disk_gb, "remote_url": url}

    def start(self, host_gb: float = 0.0, disk_dir: Path | None = None, disk_gb: float = 0.0) -> "SoakStore":
        if self.kind == "server":
            from lmcache.testing.cache_server import CacheServerProcess

            disk = {"type": "fs", "base_path": str(disk_dir), "max_capacity_gb": disk_gb}
            self._server = CacheServerProcess(l1_gb=host_gb, chunk_size=256, extra_args=("--l2-adapter", json.dumps(disk)),
                                              log_path=self._workdir / "lmcache-server.log")
        (self._server if self.kind in ("redis", "server") else self._cluster).start()
        return self

    def evicted(self) -> int:
        """Host-tier evictions in the lmcache server, over its lifetimes (0 for the Redis stores:
        there the host tier is vLLM's own and its worker counts them)."""
        if self.kind != "server":
            return 0
        try:
            return self._evicted_before + int(self._server.status()["stats"]["misses_evicted"])
        except OSError:
            return self._evicted_before

    def _kill_server(self) -> None:
        self._evicted_before = self.evicted()
        self._server.kill()

    def fault(self, pause_s: float, say) -> str:
        """Inflict the fault and recover from it; returns what happened, in words."""
        if self.kind == "server":
            self._kill_server()
            say("fault: lmcache server SIGKILLed")
            time.sleep(pause_s)
            self._server.start()
            say("lmcache server restarted (host memory empty, disk tier re-indexed)")
            return "lmcache server killed and restarted"
        if self.kind == "redis":
            self._server.kill()
            say("fault: redis-server killed")
            time.sleep(pause_s)
            self._server.start()
            say("redis-server restarted (empty)")
            return "redis killed and restarted"
        victim = self._cluster.running_masters()[0]
        victim.kill()
        began = time.monotonic()
        say(f"fault: cluster master 127.0.0.1:{victim.port} SIGKILLed")
        deadline = began + 60
        while len(self._cluster.running_masters()) < self._cluster.masters and time.monotonic() < deadline:
            time.sleep(0.1)
        say(f"its replica promoted after {time.monotonic() - began:.1f}s")
        victim.start()
        self._cluster.wait_healthy(60)
        say("the old master rejoined as a replica")
        return "cluster master killed and failed over"

    def empty(self) -> None:
        """Lose everything the store holds but its disk tier (before the vLLM restart)."""
        if self.kind == "server":
            self._kill_server()
            self._server.start()
        elif self.kind == "redis":
            self._server.kill()
            self._server.start()
        else:
            self._cluster.flushall()

    def stop(self) -> None:
        if self.kind == "server":
            self._server.stop()
        elif self.kind == "redis":
            self._server.kill()
        else:
            self._cluster.stop()
