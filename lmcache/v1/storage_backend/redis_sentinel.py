"""redis-sentinel://[user:password@]h1:p1,h2:p2,.../service_name: a master found
through its sentinels (redis-py's Sentinel), optionally read from its replicas
(`?read_from_replicas=true`; a replica a moment behind its master is a miss, never
wrong data).

A failover needs no restart: a connection that fails is closed, and every new
connection asks the sentinels where the master is now. While the master is down
its chunks are misses (one log line per outage, outage.py); every half second
the sentinels are asked whether another master was promoted, which is then used
at once instead of waiting out the back-off. The user:password of the URL is for
the data nodes; the sentinels are asked without one.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from lmcache.v1.remote_urls import parse_redis_seeds, redact_url
from lmcache.v1.storage_backend.outage import Outage
from lmcache.v1.storage_backend.remote import Route, Shard
from lmcache.v1.storage_backend.stats import EngineStats

logger = logging.getLogger(__name__)
REDISCOVER_INTERVAL = 0.5  # seconds between asking the sentinels while the master is down


class SentinelRouter:
    parallel = False

    def __init__(self, url: str, timeout: float, connect_timeout: float, retry_interval: float,
                 stats: EngineStats, tier: str):
        seeds = parse_redis_seeds(url)
        self.service = seeds.service
        data_kwargs = dict(socket_timeout=timeout, socket_connect_timeout=connect_timeout,
                           retry=Retry(NoBackoff(), 0), health_check_interval=0,
                           username=seeds.username, password=seeds.password)
        if seeds.tls:
            data_kwargs["ssl"] = True
            if seeds.ssl_ca_certs:
                data_kwargs["ssl_ca_certs"] = seeds.ssl_ca_certs
        sentinel_kwargs = dict(socket_timeout=connect_timeout, socket_connect_timeout=connect_timeout)
        self._sentinel = Sentinel(list(seeds.seeds), sentinel_kwargs=sentinel_kwargs, **data_kwargs)
        self._master = self._sentinel.master_for(self.service)
        what = f"{redact_url(url)} (service {self.service!r})"
        self._write = Shard(Outage(what + " master", logger, stats, retry_interval, first_retry=0.25, tier=tier))
        self._replica = None
        self._read = self._write
        if seeds.read_from_replicas:
            self._replica = self._sentinel.slave_for(self.service)
            self._read = Shard(Outage(what + " replicas", logger, stats, retry_interval, first_retry=0.25, tier=tier))
        self._address = "unknown"
        self._asked = 0.0
        self._lock = threading.Lock()

    def master_address(self) -> str:
        """Where the sentinels say the master is (asked at most every REDISCOVER_INTERVAL)."""
        now = time.monotonic()
        if now - self._asked >= REDISCOVER_INTERVAL and self._lock.acquire(blocking=False):
            try:
                self._asked = now
                host, port = self._sentinel.discover_master(self.service)
                self._address = f"{host}:{port}"
            except (redis.RedisError, OSError):
                pass  # no master known now: keep the last answer
            finally:
                self._lock.release()
        return self._address

    def route(self, name: str, write: bool) -> Route:
        if write or self._replica is None:
            address = self.master_address() if self._write.outage.is_down else self._address
            return Route(self._write, self._master.connection_pool, address)
        return Route(self._read, self._replica.connection_pool, "replicas")

    def failed(self, route: Route, exc: BaseException) -> None:
        if route.shard is self._write:
            self._asked = 0.0  # ask the sentinels on the next route()
            route.shard.failed_at = self.master_address()

    def redirect(self, name: str, exc: Exception, op: str, value=None):
        raise exc

    def close(self) -> None:
        for client in (self._master, self._replica):
            if client is not None:
                client.close()
        for sentinel in self._sentinel.sentinels:
            sentinel.close()
