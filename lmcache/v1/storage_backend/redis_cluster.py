"""redis-cluster://[user:password@]h1:p1,h2:p2,... (rediss-cluster:// for TLS; valkey-cluster://
the same): a Redis or Valkey cluster through redis-py's RedisCluster.

One chunk is one key, so a chunk lives on exactly one shard and moves with its
slot. The commands go straight to the node that serves the key's slot (from
redis-py's slot map), one pipelined round trip per node for a lookup, the nodes
asked in parallel (remote.py). A MOVED or ASK reply (a slot migrating, a
failover the map has not seen) is followed through RedisCluster's own command,
which also updates the map.

A shard is a slot range, named by its first slot: it stays the same shard when
its replica is promoted. While it has no reachable master its chunks are misses
and its writes are dropped and counted, with one log line per outage (outage.py);
every half second the topology is asked again (in a background thread), and once
a replica was promoted the new master is used at once. The other shards keep working throughout (with
`cluster-require-full-coverage no` on the servers; otherwise Redis refuses every
key while one shard is down, CLUSTERDOWN, which is the same miss).
"""

from __future__ import annotations

import logging
import threading
import time

from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from lmcache.v1.remote_urls import parse_redis_seeds, redact_url
from lmcache.v1.storage_backend.outage import Outage
from lmcache.v1.storage_backend.remote import Route, Shard
from lmcache.v1.storage_backend.stats import EngineStats

logger = logging.getLogger(__name__)
REFRESH_INTERVAL = 0.5  # seconds between topology refreshes while a shard is down


class ClusterRouter:
    parallel = True

    def __init__(self, url: str, timeout: float, connect_timeout: float, retry_interval: float,
                 stats: EngineStats, tier: str):
        seeds = parse_redis_seeds(url)
        self.url = redact_url(url)
        self.read_from_replicas = seeds.read_from_replicas
        self._kwargs = dict(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds.seeds],
            username=seeds.username, password=seeds.password, ssl=seeds.tls,
            socket_timeout=timeout, socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),  # our shards' back-off decides when to try again
            require_full_coverage=False, read_from_replicas=seeds.read_from_replicas,
        )
        if seeds.tls and seeds.ssl_ca_certs:
            self._kwargs["ssl_ca_certs"] = seeds.ssl_ca_certs
        self._stats, self._tier, self._retry_interval = stats, tier, retry_interval
        self._rc: RedisCluster | None = None
        self._seeds = Shard(self._outage(f"{self.url} (no seed answered)", retry_interval))
        self._seeds_route = Route(self._seeds, None, "seeds")
        self._shards: dict[int, Shard] = {}
        self._first_slot: dict[str, int] = {}
        self._refreshed = 0.0
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()

    def _outage(self, what: str, retry_interval: float) -> Outage:
        return Outage(what, logger, self._stats, retry_interval, first_retry=0.25, tier=self._tier)

    def client(self) -> RedisCluster | None:
        """The cluster client; None while no seed answers (the seeds' outage is counted)."""
        if self._rc is not None:
            return self._rc
        with self._lock:
            if self._rc is None and self._seeds.outage.usable():
                try:
                    self._rc = RedisCluster(**self._kwargs)
                except Exception as exc:  # noqa: BLE001 - RedisClusterException is no RedisError
                    self._seeds.outage.failed(exc)
                    return None
                self._seeds.outage.worked()
            return self._rc

    def _shard(self, rc: RedisCluster, node: ClusterNode) -> Shard:
        first = self._first_slot.get(node.name)
        if first is None:
            with rc.nodes_manager._lock:
                cache = dict(rc.nodes_manager.slots_cache)
            served = [slot for slot, nodes in cache.items() if nodes and nodes[0].name == node.name]
            first = min(served) if served else -1
            self._first_slot[node.name] = first
        shard = self._shards.get(first)
        if shard is None:
            shard = self._shards.setdefault(first, Shard(self._outage(
                f"{self.url} shard from slot {first}", self._retry_interval)))
        return shard

    def route(self, name: str, write: bool) -> Route:
        rc = self.client()
        if rc is None:
            return self._seeds_route
        slot = rc.keyslot(name)
        node = rc.nodes_manager.get_node_from_slot(slot)  # the primary
        shard = self._shard(rc, node)
        if shard.outage.is_down:
            self.refresh()  # a promoted replica shows up here once the refresh is done
        elif self.read_from_replicas and not write:
            node = rc.nodes_manager.get_node_from_slot(slot, read_from_replicas=True)
        conn = node.redis_connection or rc.get_redis_connection(node)
        return Route(shard, conn.connection_pool, node.name)

    def refresh(self) -> None:
        """Ask the cluster for its topology again, in the background (a dead node's
        connect timeout never stalls a request), at most every REFRESH_INTERVAL."""
        rc = self._rc
        if rc is None or time.monotonic() - self._refreshed < REFRESH_INTERVAL:
            return
        if not self._refresh_lock.acquire(blocking=False):
            return  # one is running
        self._refreshed = time.monotonic()
        threading.Thread(target=self._refresh, args=(rc,), name="lmcache-cluster-topology", daemon=True).start()

    def _refresh(self, rc: RedisCluster) -> None:
        try:
            rc.nodes_manager.initialize()
            self._first_slot.clear()
        except Exception:  # noqa: BLE001 - the next failure tries again
            pass
        finally:
            self._refresh_lock.release()

    def failed(self, route: Route, exc: BaseException) -> None:
        if route is not self._seeds_route:
            self.refresh()

    def redirect(self, name: str, exc: Exception, op: str, value=None):
        """MOVED/ASK on our direct path: the same command through RedisCluster, which
        follows the redirection and updates its slot map."""
        rc = self._rc
        if op == "EXISTS":
            return rc.exists(name)
        if op == "GET":
            return rc.get(name)
        if op == "SET":
            rc.set(name, b"".join(value))  # (header, payload) as the tier sends them
            return True
        if op == "DEL":
            return rc.delete(name)
        raise exc

    def nodes(self) -> list[ClusterNode]:
        rc = self.client()
        return [] if rc is None else rc.get_nodes()

    def close(self) -> None:
        if self._rc is not None:
            self._rc.close()
