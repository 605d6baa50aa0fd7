"""The shared tier: a Redis or Valkey server (redis://, rediss://, valkey://, valkeys://).

Values are serde blobs (binary, never pickled). The server being down or slow
is never a failed request: the operation is a miss, ONE warning is logged for
the outage, and the tier is not asked again until `retry_interval` seconds have
passed (so requests do not wait on a dead server; outage.py, at a fixed interval
here). Timeouts come from config.
"""

from __future__ import annotations

import logging
import urllib.parse

from lmcache.v1.memory import MemoryObj
from lmcache.v1.storage_backend import serde
from lmcache.v1.storage_backend.outage import Outage
from lmcache.v1.storage_backend.serde import Allocator, ChecksumMemo, SerdeError
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger(__name__)

_SCHEME_FOR_REDIS_PY = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}


def redacted(url: str) -> str:
    """The URL without its password (for logs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


def redis_py_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = _SCHEME_FOR_REDIS_PY.get(parts.scheme)
    if scheme is None:
        raise ValueError(
            f"remote_url {redacted(url)!r}: unknown scheme {parts.scheme!r}; accepted: {', '.join(_SCHEME_FOR_REDIS_PY)}"
        )
    return urllib.parse.urlunsplit(parts._replace(scheme=scheme))


class RemoteBackend:
    name = "remote"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        connect_timeout: float = 0.5,
        retry_interval: float = 10.0,
        stats: EngineStats | None = None,
        integrity: serde.Integrity = serde.NO_SECRET,
    ):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = redis
        self._integrity = integrity  # every read checks the key digest (and MAC) in the header
        self.url = url
        self.retry_interval = retry_interval
        self._stats = stats or EngineStats()
        self._client = redis.Redis.from_url(
            redis_py_url(url),
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),  # our own back-off decides when to try again
            health_check_interval=0,
        )
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        # a fixed interval: the first retry waits as long as every later one
        self._outage = Outage(redacted(url), logger, self._stats, retry_interval, first_retry=retry_interval,
                              tier=self.name)
        self._logged_errors: set[str] = set()

    # -- health ---------------------------------------------------------------
    @property
    def is_down(self) -> bool:
        return self._outage.is_down

    def _server_error(self, op: str, exc: Exception) -> None:
        """An error reply (not an outage), e.g. maxmemory reached: logged once per kind."""
        kind = f"{op}:{type(exc).__name__}:{str(exc).split(' ', 1)[0]}"
        if kind not in self._logged_errors:
            self._logged_errors.add(kind)
            logger.warning("remote tier %s: %s failed: %s (further such errors are not logged)",
                           redacted(self.url), op, exc)

    # -- the tier -------------------------------------------------------------
    def contains(self, key: CacheEngineKey) -> bool:
        return self.prefix_count([key]) == 1

    def prefix_count(self, keys: list[CacheEngineKey]) -> int:
        """How many of `keys`, from the first, the server holds (one round trip)."""
        if not keys or not self._outage.usable():
            return 0
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key.to_string())
            found = pipe.execute()
        except self._errors as exc:
            self._outage.failed(exc)
            return 0
        except self._redis.RedisError as exc:
            self._server_error("EXISTS", exc)
            return 0
        self._outage.worked()
        n = 0
        for hit in found:
            if not hit:
                break
            n += 1
        return n

    def get(self, key: CacheEngineKey, allocate: Allocator) -> MemoryObj | None:
        if not self._outage.usable():
            return None
        name = key.to_string()
        try:
            blob = self._client.get(name)
        except self._errors as exc:
            self._outage.failed(exc)
            return None
        except self._redis.RedisError as exc:
            self._server_error("GET", exc)
            return None
        self._outage.worked()
        if blob is None:
            self._stats.miss("absent")
            return None
        try:
            obj = serde.from_bytes(blob, allocate, key, self._integrity)
        except SerdeError as exc:
            logger.warning("remote tier: value of %s is not a valid chunk (%s): treated as a miss and deleted", name, exc)
            self._stats.miss(serde.miss_cause(exc), tier=self.name)
            self._stats.chunk_event(self.name, False, key)
            self._delete_if_same(name, blob)
            return None
        if obj is None:
            self._stats.miss("dropped", tier=self.name)
        return obj

    def _delete_if_same(self, name: str, blob: bytes) -> None:
        """Delete a bad value unless another writer replaced it meanwhile."""
        try:
            if self._client.get(name) == blob:
                self._client.delete(name)
        except self._redis.RedisError:
            pass

    def put(self, key: CacheEngineKey, obj: MemoryObj, checksum: ChecksumMemo | None = None) -> bool:
        """SET the chunk's blob; False (counted as dropped) if the server is down or
        refuses it. `checksum`: shared with the other tiers written in the same store."""
        if not self._outage.usable():
            self._stats.miss("dropped", tier=self.name)
            return False
        try:
            self._set_blob(key, obj, checksum)
        except self._errors as exc:
            self._outage.failed(exc)
            self._stats.miss("dropped", tier=self.name)
            return False
        except self._redis.RedisError as exc:  # e.g. the server's maxmemory is reached
            self._server_error("SET", exc)
            self._stats.miss("dropped", tier=self.name)
            return False
        self._outage.worked()
        self._stats.chunk_event(self.name, True, key)
        return True

    def _set_blob(self, cache_key: CacheEngineKey, obj: MemoryObj, checksum: ChecksumMemo | None) -> None:
        """SET name <header + payload> without first joining them into one bytes
        object (a 32 MiB copy): the RESP command is sent as pieces, the payload
        straight from the memory object."""
        payload = serde.payload_view(obj.tensor)
        if checksum is None:
            checksum = ChecksumMemo()
        if checksum.value is None:
            checksum.value = serde.checksum(payload)
        header = self._integrity.header(cache_key, obj, payload, checksum.value, checksum)
        key = cache_key.to_string().encode()
        command = [
            b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s" % (len(key), key, len(header) + payload.nbytes, header),
            memoryview(payload),
            b"\r\n",
        ]
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(command, check_health=False)
            conn.read_response()  # +OK, or raises the server's error
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def remove(self, key: CacheEngineKey) -> None:
        try:
            self._client.delete(key.to_string())
        except self._redis.RedisError:
            pass
        self._stats.chunk_event(self.name, False, key)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a dead connection must not raise
            pass
