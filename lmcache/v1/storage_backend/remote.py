"""The shared tier on Redis or Valkey: one server (redis://, rediss://, valkey://,
valkeys://), a sentinel-managed master (redis-sentinel://, redis_sentinel.py) or a
cluster (redis-cluster://, redis_cluster.py).

One chunk is one key; its value is the serde blob (binary, never pickled), stored and
returned unchanged, so the header checks apply here as on every tier. Nothing is
remembered about which keys exist: a key the server evicted or lost is a miss.

A fault is never a failed request. Each place chunks live (the server, the
sentinel's master, a cluster shard) is a `Shard` with its own outage state: when
it is unreachable or times out, its chunks are misses, its writes are dropped and
counted, ONE warning is logged per outage and it is asked again only after a
back-off (outage.py). A router that sees the place move (a sentinel or cluster
failover) tries the new address at once. Any other exception (an error reply, a
peer that is not Redis) is a miss too, logged once per kind. Every operation has
a whole-operation deadline of remote_timeout (redis_ops.py).
"""

from __future__ import annotations

import logging
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis

from lmcache.v1 import remote_urls
from lmcache.v1.memory import MemoryObj
from lmcache.v1.remote_urls import redact_url
from lmcache.v1.storage_backend import redis_ops, serde
from lmcache.v1.storage_backend.outage import Outage
from lmcache.v1.storage_backend.remote_blob import chunk_or_miss
from lmcache.v1.storage_backend.serde import Allocator, ChecksumMemo
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger(__name__)

_SCHEME_FOR_REDIS_PY = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
# Errors that mean "this place is unreachable now": an outage, not a bad reply.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError, redis.exceptions.ClusterDownError,
               redis.exceptions.TryAgainError, redis.exceptions.MasterDownError)
REDIRECTS = (redis.exceptions.AskError,)  # MovedError is an AskError

# A node's SETs go in pipelines of at most this many bytes, each under remote_timeout: small
# chunks share a round trip, a large step is never one transfer that must beat one deadline.
WRITE_PIPELINE_BYTES = 64 * 2**20
NOT_READ = object()  # a reply that did not come (the fault is logged and counted where it was seen)

__all__ = ["RemoteBackend", "redis_py_url"]


def _pipelines(idx: list[int], pieces) -> list[list[int]]:
    """`idx` as one pipeline (reads), or (writes) cut so that a pipeline's blobs stay
    within WRITE_PIPELINE_BYTES (a larger blob goes alone)."""
    if pieces is None:
        return [idx]
    out: list[list[int]] = [[]]
    size = 0
    for i in idx:
        n = len(pieces[i][0]) + pieces[i][1].nbytes
        if out[-1] and size + n > WRITE_PIPELINE_BYTES:
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


def redis_py_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = _SCHEME_FOR_REDIS_PY.get(parts.scheme)
    if scheme is None:
        raise ValueError(
            f"remote_url {redact_url(url)!r}: unknown scheme {parts.scheme!r}; accepted: {', '.join(_SCHEME_FOR_REDIS_PY)}"
        )
    return urllib.parse.urlunsplit(parts._replace(scheme=scheme))


class Shard:
    """One place chunks live, with its outage state. `failed_at`: the address that
    last failed; a router that now names another address is tried at once."""

    def __init__(self, outage: Outage) -> None:
        self.outage = outage
        self.failed_at: str | None = None

    def usable(self, address: str) -> bool:
        if self.outage.is_down and self.failed_at is not None and address != self.failed_at:
            return True
        return self.outage.usable()


@dataclass(frozen=True)
class Route:
    shard: Shard
    pool: Any  # a redis-py connection pool
    address: str


class SingleServer:
    """redis:// and friends: one server, one shard, a fixed retry interval."""

    parallel = False

    def __init__(self, url: str, timeout: float, connect_timeout: float, retry_interval: float,
                 stats: EngineStats, tier: str):
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._client = redis.Redis.from_url(
            redis_py_url(url), socket_timeout=timeout, socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,  # our own back-off decides when to retry
        )
        # a fixed interval: the first retry waits as long as every later one
        outage = Outage(redact_url(url), logger, stats, retry_interval, first_retry=retry_interval, tier=tier)
        self._route = Route(Shard(outage), self._client.connection_pool, redact_url(url))

    def route(self, name: str, write: bool) -> Route:
        return self._route

    def failed(self, route: Route, exc: BaseException) -> None:
        pass

    def redirect(self, name: str, exc: Exception, op: str, value: Any = None) -> Any:
        raise exc

    def close(self) -> None:
        self._client.close()


def make_router(url: str, timeout: float, connect_timeout: float, retry_interval: float, stats: EngineStats,
                tier: str):
    scheme = remote_urls.scheme_of(url)
    if scheme in remote_urls.CLUSTER_SCHEMES:
        from lmcache.v1.storage_backend.redis_cluster import ClusterRouter

        return ClusterRouter(url, timeout, connect_timeout, retry_interval, stats, tier)
    if scheme in remote_urls.SENTINEL_SCHEMES:
        from lmcache.v1.storage_backend.redis_sentinel import SentinelRouter

        return SentinelRouter(url, timeout, connect_timeout, retry_interval, stats, tier)
    return SingleServer(url, timeout, connect_timeout, retry_interval, stats, tier)


class RemoteBackend:
    name = "remote"

    def __init__(self, url: str, *, timeout: float = 2.0, connect_timeout: float = 0.5,
                 retry_interval: float = 10.0, stats: EngineStats | None = None,
                 integrity: serde.Integrity = serde.NO_SECRET):
        self.url = url
        self._integrity = integrity  # every read checks the key digest (and MAC) in the header
        self.timeout = timeout
        self._stats = stats or EngineStats()
        self._logged_errors: set[str] = set()
        self.router = make_router(url, timeout, connect_timeout, retry_interval, self._stats, self.name)
        self._pool: ThreadPoolExecutor | None = None  # nodes in parallel (cluster)

    # -- health ---------------------------------------------------------------
    @property
    def is_down(self) -> bool:
        return self.router.route("", False).shard.outage.is_down if not self.router.parallel else False

    def _error(self, op: str, exc: BaseException) -> None:
        """Not an outage (an error reply, a peer that is not Redis): logged once per kind."""
        kind = f"{op}:{type(exc).__name__}:{str(exc).split(' ', 1)[0]}"
        if kind not in self._logged_errors:
            self._logged_errors.add(kind)
            logger.warning("remote tier %s: %s failed: %s: %s (treated as a miss; further such errors are not "
                           "logged)", redact_url(self.url), op, type(exc).__name__, exc)

    def _call(self, op: str, name: str, write: bool, work, redirect_value: Any = None):
        """(True, result) or (False, None) after a fault (already logged and counted)."""
        try:
            route = self.router.route(name, write)
        except Exception as exc:  # noqa: BLE001 - e.g. no cluster node reachable to learn the topology
            self._error(op, exc)
            return False, None
        if not route.shard.usable(route.address):
            return False, None
        try:
            result = redis_ops.on_connection(route.pool, self.timeout, work)
        except REDIRECTS as exc:
            try:
                return True, self.router.redirect(name, exc, op, redirect_value)
            except Exception as again:  # noqa: BLE001 - a fault in the tier is a miss
                return self._fault(op, route, again)
        except Exception as exc:  # noqa: BLE001 - a fault in the tier is a miss
            return self._fault(op, route, exc)
        self._worked(route)
        return True, result

    def _fault(self, op: str, route: Route, exc: BaseException):
        if isinstance(exc, UNREACHABLE):
            route.shard.failed_at = route.address
            route.shard.outage.failed(exc)
            self.router.failed(route, exc)
        else:
            self._error(op, exc)
        return False, None

    @staticmethod
    def _worked(route: Route) -> None:
        route.shard.failed_at = None
        route.shard.outage.worked()

    # -- the tier -------------------------------------------------------------
    def contains(self, key: CacheEngineKey) -> bool:
        return self.prefix_count([key]) == 1

    def prefix_count(self, keys: list[CacheEngineKey]) -> int:
        """How many of `keys`, from the first, the store holds: one pipelined round
        trip per node, the nodes asked in parallel."""
        if not keys:
            return 0
        found = self.exists_many([k.to_string() for k in keys])
        n = 0
        while n < len(found) and found[n]:
            n += 1
        return n

    def exists_many(self, names: list[str]) -> list[bool]:
        return [reply is not NOT_READ and bool(reply) for reply in
                self._per_node("EXISTS", names, redis_ops.exists_many, lambda reply: reply == 1)]

    def _per_node(self, op: str, names: list[str], send, value, write: bool = False, pieces=None) -> list:
        """`send(conn, batch)`'s replies for `names`, in order: one pipelined round trip
        per node, the nodes in parallel where the router has several. Each reply is
        `value(reply)`, a redirection's answer, or NOT_READ (a fault, logged and counted).
        Writes: `pieces[i]` is names[i]'s (header, payload); a node's SETs go in pipelines
        of at most WRITE_PIPELINE_BYTES (each under remote_timeout), one while the node works."""
        groups: dict[int, tuple[Route, list[int]]] = {}
        out: list = [NOT_READ] * len(names)
        for i, name in enumerate(names):
            try:
                route = self.router.route(name, write)
            except Exception as exc:  # noqa: BLE001 - a fault in the tier is a miss
                self._error(op, exc)
                return out
            groups.setdefault(id(route.pool), (route, []))[1].append(i)
        jobs = [(route, idx) for route, idx in groups.values() if route.shard.usable(route.address)]

        def ask(job) -> list:
            route, idx = job
            replies: list = []
            for batch in _pipelines(idx, pieces):
                if replies and not route.shard.usable(route.address):  # the node failed: the rest is dropped
                    return replies + [NOT_READ] * (len(idx) - len(replies))
                replies += self._on_node(op, names, send, value, route, batch, pieces)
            return replies

        results = list(self._executor().map(ask, jobs)) if len(jobs) > 1 and self.router.parallel else map(ask, jobs)
        for (_, idx), replies in zip(jobs, results):
            for i, reply in zip(idx, replies):
                out[i] = reply
        return out

    def _on_node(self, op: str, names: list[str], send, value, route: Route, idx: list[int], pieces=None) -> list:
        batch = [names[i] for i in idx]
        try:
            replies = redis_ops.on_connection(route.pool, self.timeout, lambda c: send(c, batch))
        except Exception as exc:  # noqa: BLE001 - a fault in the tier is a miss
            self._fault(op, route, exc)
            return [NOT_READ] * len(batch)
        self._worked(route)
        out = []
        for i, name, reply in zip(idx, batch, replies):
            if isinstance(reply, REDIRECTS):
                ok, reply = self._redirected(op, name, reply, pieces[i] if pieces else None)
                out.append(value(reply) if ok else NOT_READ)
            elif isinstance(reply, Exception):
                self._fault(op, route, reply)
                out.append(NOT_READ)
            else:
                out.append(value(reply))
        return out

    def _redirected(self, op: str, name: str, exc: Exception, value: Any = None):
        try:
            return True, self.router.redirect(name, exc, op, value)
        except Exception as again:  # noqa: BLE001 - a fault in the tier is a miss
            if not isinstance(again, UNREACHABLE):
                self._error(op, again)
            return False, None

    def get(self, key: CacheEngineKey, allocate: Allocator) -> MemoryObj | None:
        return self.get_many([key], allocate)[0]

    def get_many(self, keys: list[CacheEngineKey], allocate: Allocator) -> list[MemoryObj | None]:
        """The chunks of `keys`, in order, None from the first that is missing (its cause
        counted once; what the pipelines brought after it is dropped unread). The GETs
        go as one pipelined round trip per node, the nodes in parallel."""
        names = [k.to_string() for k in keys]
        blobs = self._per_node("GET", names, redis_ops.get_many, redis_ops.as_bytes_or_none)
        out: list[MemoryObj | None] = [None] * len(keys)
        for i, (key, name, blob) in enumerate(zip(keys, names, blobs)):
            if blob is NOT_READ:  # the outage (or the error) is counted where it was seen
                break
            out[i] = chunk_or_miss(blob, key, allocate, self._integrity, self._stats, self.name, f"value of {name}",
                                   lambda: self._call("DEL", name, True,
                                                      lambda c: redis_ops.delete_if_same(c, name, bytes(blob))))
            if out[i] is None:
                break
        return out

    def put(self, key: CacheEngineKey, obj: MemoryObj, checksum: ChecksumMemo | None = None) -> bool:
        """SET the chunk's blob; False (counted as dropped) if its place is down or
        refuses it. `checksum`: shared with the other tiers written in the same store."""
        return self.put_many([key], [obj], [checksum])[0]

    def put_many(self, keys: list[CacheEngineKey], objs: list[MemoryObj],
                 checksums: list[ChecksumMemo | None] | None = None) -> list[bool]:
        """SET each chunk's blob (a step's chunks): pipelined per node, the nodes in
        parallel. Per chunk True, or False (counted as dropped) if its place is down or
        refuses it."""
        names = [k.to_string() for k in keys]
        checksums = checksums or [None] * len(keys)
        pieces = [serde.blob_pieces(obj, key, self._integrity, memo) for key, obj, memo in zip(keys, objs, checksums)]
        by_name = dict(zip(names, pieces))
        replies = self._per_node("SET", names, lambda c, batch: redis_ops.set_many(c, [(n, *by_name[n]) for n in batch]),
                                 lambda reply: reply is True, write=True, pieces=pieces)
        out = []
        for key, reply in zip(keys, replies):
            ok = reply is True
            if ok:
                self._stats.chunk_event(self.name, True, key)
            else:
                self._stats.miss("dropped", tier=self.name)
            out.append(ok)
        return out

    def remove(self, key: CacheEngineKey) -> None:
        name = key.to_string()

        def delete(conn):
            conn.send_command("DEL", name, check_health=False)
            return conn.read_response()

        self._call("DEL", name, True, delete)
        self._stats.chunk_event(self.name, False, key)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="lmcache-redis-nodes")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        try:
            self.router.close()
        except Exception:  # noqa: BLE001 - closing a dead connection must not raise
            pass
