"""The shared tier of `bench soak` (--store) and the fault it suffers during the run.

  redis          one redis-server, SIGKILLed (all it held is lost) and restarted empty
  redis-cluster  3 masters + 1 replica each; a master is SIGKILLed, its replica is
                 promoted (the fault is over only once every slot has a master again),
                 then the old master is started again and rejoins as a replica
"""

from __future__ import annotations

import time
from pathlib import Path

STORES = ("redis", "redis-cluster")


class SoakStore:
    def __init__(self, kind: str, workdir: Path):
        if kind not in STORES:
            raise SystemExit(f"--store {kind!r}: accepted: {', '.join(STORES)}")
        self.kind = kind
        if kind == "redis":
            from lmcache.bench.workload.services import RedisProcess

            self._server = RedisProcess(workdir / "redis")
        else:
            from lmcache.testing.redis_servers import RedisClusterGroup

            self._cluster = RedisClusterGroup(str(workdir / "redis-cluster"), masters=3, replicas=1)

    @property
    def url(self) -> str:
        return self._server.url if self.kind == "redis" else self._cluster.url

    def start(self) -> "SoakStore":
        (self._server if self.kind == "redis" else self._cluster).start()
        return self

    def fault(self, pause_s: float, say) -> str:
        """Inflict the fault and recover from it; returns what happened, in words."""
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
        """Lose everything the store holds (before the vLLM restart)."""
        if self.kind == "redis":
            self._server.kill()
            self._server.start()
        else:
            self._cluster.flushall()

    def stop(self) -> None:
        if self.kind == "redis":
            self._server.kill()
        else:
            self._cluster.stop()
