"""The doctor's checks of the distributed remote tiers, each reached for real.

redis-cluster://: every node the seeds lead to (and every seed) is asked on its
own: reachable, cluster_state ok, all 16384 slots assigned and none failing, its
eviction policy; a node with cluster-require-full-coverage yes is a warning (one
shard down then makes every key a miss); then a probe value goes through the
cluster. redis-sentinel://: each sentinel names the master (they must agree),
then the master is probed like a single server. s3://: the bucket is reachable
with the credentials found (never printed), and a probe object is written, read
back and deleted.
"""

from __future__ import annotations

import urllib.parse
import uuid

from lmcache.doctor.report import FAIL, OK, WARN, Finding
from lmcache.v1 import remote_urls
from lmcache.v1.config import GB, LMCacheEngineConfig
from lmcache.v1.remote_urls import parse_redis_seeds, redact_url

CHECK = "tiers.remote"
SLOTS = 16384


def _eviction(info: dict) -> str | None:
    """A warning about the eviction setting, or None."""
    maxmemory, policy = int(info.get("maxmemory", 0) or 0), info.get("maxmemory_policy", "")
    if maxmemory and policy == "noeviction":
        return f"maxmemory {maxmemory / GB:.1f} GB with noeviction: stores fail once it is full"
    return None


def _cluster_info(client) -> dict:
    reply = client.execute_command("CLUSTER INFO")
    if isinstance(reply, dict):
        return reply
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def cluster(url: str, timeout: float) -> list[Finding]:
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    seeds = parse_redis_seeds(url)
    shown = redact_url(url)
    auth = dict(username=seeds.username, password=seeds.password, ssl=seeds.tls, socket_timeout=timeout,
                socket_connect_timeout=timeout)
    out: list[Finding] = []
    nodes = {f"{h}:{p}" for h, p in seeds.seeds}
    rc = None
    try:
        rc = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds.seeds], require_full_coverage=False,
                          **auth)
        nodes |= {n.name for n in rc.get_nodes()}  # the masters
        nodes |= {name.split("@", 1)[0] for name in rc.cluster_nodes()}  # and their replicas
    except Exception as exc:  # noqa: BLE001 - RedisClusterException is no RedisError
        out.append(Finding(CHECK, FAIL, f"{shown}: no seed answered as a cluster node: {exc}",
                           "start the cluster or fix the seeds in remote_url (h1:p1,h2:p2,...)"))
    for name in sorted(nodes):
        host, _, port = name.rpartition(":")
        client = redis.Redis(host=host, port=int(port), **auth)
        try:
            state, info = _cluster_info(client), client.info()
            coverage = client.config_get("cluster-require-full-coverage").get("cluster-require-full-coverage")
        except (redis.RedisError, OSError) as exc:
            out.append(Finding(f"{CHECK}.{name}", FAIL, f"{name}: unreachable or not a cluster node: {exc}",
                               "start it, or remove it from the seeds; while a master is down its shard is misses"))
            continue
        finally:
            client.close()
        role = info.get("role", "?")
        fact = (f"{name} ({role}): cluster_state {state.get('cluster_state')}, slots assigned "
                f"{state.get('cluster_slots_assigned')}, failing {state.get('cluster_slots_fail')}")
        problems = []
        if state.get("cluster_state") != "ok":
            problems.append((FAIL, "the cluster is not ok", "check `redis-cli --cluster check`; fix failed nodes"))
        if int(state.get("cluster_slots_assigned", 0)) != SLOTS or int(state.get("cluster_slots_fail", 0)):
            problems.append((FAIL, "not every slot is served", "`redis-cli --cluster fix`, then add replicas"))
        eviction = _eviction(info)
        if eviction and role == "master":
            problems.append((WARN, eviction, "set maxmemory-policy allkeys-lru on every master"))
        if coverage == "yes":
            problems.append((WARN, "cluster-require-full-coverage yes: one shard down makes every key a miss",
                             "set cluster-require-full-coverage no on every node"))
        if not problems:
            out.append(Finding(f"{CHECK}.{name}", OK, fact))
        for status, what, fix in problems:
            out.append(Finding(f"{CHECK}.{name}", status, f"{fact}: {what}", fix))
    if rc is not None:
        out.append(_probe(shown, rc, redis))
        rc.close()
    return out


def _probe(shown: str, client, redis) -> Finding:
    from lmcache.doctor.tiers import _probe_obj, _round_trips
    from lmcache.v1.storage_backend import serde

    key = f"lmcache-doctor/{uuid.uuid4().hex}"
    try:
        client.set(key, serde.to_bytes(_probe_obj()), px=60_000)
        back = client.get(key)
        client.delete(key)
    except (redis.RedisError, OSError) as exc:
        return Finding(CHECK, FAIL, f"{shown}: a probe value could not be written and read: {exc}",
                       "check the nodes above and the ACLs (lmcache needs GET, SET, EXISTS, DEL)")
    if back is None or not _round_trips(back):
        return Finding(CHECK, FAIL, f"{shown}: a probe value read back differs from what was written",
                       "another client may rewrite keys, or a node is misbehaving")
    return Finding(CHECK, OK, f"{shown}: probe set+get+delete through the cluster")


def sentinel(url: str, timeout: float) -> list[Finding]:
    import redis

    from lmcache.doctor.tiers import redis_tier

    seeds = parse_redis_seeds(url)
    shown = redact_url(url)
    out, masters = [], set()
    for host, port in seeds.seeds:
        client = redis.Redis(host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            state = client.sentinel_master(seeds.service)
            masters.add(f"{state['ip']}:{state['port']}")
            out.append(Finding(f"{CHECK}.{host}:{port}", OK, f"sentinel {host}:{port}: master of {seeds.service!r} "
                                                           f"is {state['ip']}:{state['port']}"))
        except (redis.RedisError, OSError) as exc:
            out.append(Finding(f"{CHECK}.{host}:{port}", WARN, f"sentinel {host}:{port}: no answer for "
                                                             f"{seeds.service!r}: {exc}",
                               "start it, or check the service name (URL path or REDIS_SERVICE_NAME)"))
        finally:
            client.close()
    if not masters:
        out.append(Finding(CHECK, FAIL, f"{shown}: no sentinel knows a master named {seeds.service!r}",
                           "start the sentinels, or fix the seeds / service name"))
        return out
    if len(masters) > 1:
        out.append(Finding(CHECK, WARN, f"{shown}: the sentinels disagree on the master: {sorted(masters)}",
                           "wait for the failover to finish; check the sentinels' quorum"))
    host, _, port = sorted(masters)[0].rpartition(":")
    creds = ""
    if seeds.username or seeds.password:
        quote = urllib.parse.quote
        creds = f"{quote(seeds.username or '', safe='')}:{quote(seeds.password or '', safe='')}@"
    out.append(redis_tier(f"{'rediss' if seeds.tls else 'redis'}://{creds}{host}:{port}", timeout))
    return out


def s3(config: LMCacheEngineConfig, timeout: float) -> list[Finding]:
    from lmcache.doctor.tiers import _probe_obj, _round_trips
    from lmcache.v1.storage_backend import serde

    url, endpoint = config.remote_url, config.s3_endpoint_url
    where = f"{url}" + (f" at {endpoint}" if endpoint else "")
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return [Finding(CHECK, FAIL, f"{where}: boto3 is not installed", "pip install 'lmcache[s3]'")]
    loc = remote_urls.parse_s3(url)
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, config=Config(connect_timeout=timeout, read_timeout=timeout,
                                                   retries={"max_attempts": 1},
                                                   s3={"addressing_style": "path"} if endpoint else None))
    name = f"{loc.prefix}lmcache-doctor/{uuid.uuid4().hex}"
    try:
        client.head_bucket(Bucket=loc.bucket)
        client.put_object(Bucket=loc.bucket, Key=name, Body=serde.to_bytes(_probe_obj()))
        back = client.get_object(Bucket=loc.bucket, Key=name)["Body"].read()
        client.delete_object(Bucket=loc.bucket, Key=name)
    except Exception as exc:  # noqa: BLE001 - botocore's errors have many bases
        return [Finding(CHECK, FAIL, f"{where}: {type(exc).__name__}: {exc}",
                        "check s3_endpoint_url, that the bucket exists, and the AWS credentials (AWS_ACCESS_KEY_ID/"
                        "AWS_SECRET_ACCESS_KEY or ~/.aws); the tier needs HeadObject, GetObject, PutObject, "
                        "DeleteObject and multipart uploads")]
    finally:
        client.close()
    if not _round_trips(back):
        return [Finding(CHECK, FAIL, f"{where}: a probe object read back differs", "check the store")]
    return [Finding(CHECK, OK, f"{where}: bucket reachable, probe put+get+delete")]


def findings(config: LMCacheEngineConfig, timeout: float) -> list[Finding]:
    scheme = remote_urls.scheme_of(config.remote_url)
    if scheme in remote_urls.CLUSTER_SCHEMES:
        return cluster(config.remote_url, timeout)
    if scheme in remote_urls.SENTINEL_SCHEMES:
        return sentinel(config.remote_url, timeout)
    return s3(config, timeout)
