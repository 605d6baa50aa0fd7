"""Each configured tier, reached for real with a probe of its own: never a cached chunk.

disk: the directory is created as the engine would, a probe blob is written, read back
and deleted under a temporary name (`.lmcache-doctor-*.tmp`, which the disk tier never
reads and removes when stale); Redis/Valkey: ping, the server's eviction setting, and a
probe value under `lmcache-doctor/<random>` (a chunk key never holds '/'); lm://: HEALTH;
cluster, sentinel and s3: distributed.py (every node on its own).
"""

from __future__ import annotations

import errno
import os
import shutil
import statistics
import time
import urllib.parse
import uuid

import torch

from lmcache.doctor import lm_health
from lmcache.doctor.report import FAIL, OK, SKIP, WARN, Finding
from lmcache.v1 import remote_urls
from lmcache.v1.config import GB, LMCacheEngineConfig
from lmcache.v1.memory import MemoryFormat, MemoryObj
from lmcache.v1.storage_backend import serde
from lmcache.v1.storage_backend.local_disk import SUFFIX, TMP_SUFFIX
from lmcache.v1.remote_urls import redact_url
from lmcache.v1.storage_backend.remote import redis_py_url

_PATH_FIXES = {
    errno.ENOTDIR: "a part of the path is a regular file, not a directory: point local_disk at a directory",
    errno.EROFS: "the file system is mounted read-only: pick a writable one (or remount it)",
    errno.EACCES: "this user may not write there: pick a directory it owns, or change its permissions",
    errno.EPERM: "this user may not write there: pick a directory it owns",
    errno.ENOSPC: "the disk is full: free space or pick another disk",
    errno.EDQUOT: "this user's disk quota is used up",
}


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def _probe_obj() -> MemoryObj:
    tensor = torch.arange(2 * 1 * 16 * 8, dtype=torch.float32).to(torch.bfloat16).reshape(2, 1, 16, 8)
    return MemoryObj(tensor.contiguous(), MemoryFormat.KV_2LTD)


def _round_trips(blob: bytes) -> bool:
    back = serde.from_bytes(blob, lambda shape, dtype, fmt: MemoryObj(torch.empty(shape, dtype=dtype), fmt))
    return back is not None and torch.equal(back.tensor, _probe_obj().tensor)


def _os_error(what: str, path: str, exc: OSError) -> Finding:
    fix = _PATH_FIXES.get(exc.errno, "check the path and its permissions")
    return Finding("tiers.disk", FAIL, f"local_disk={path!r}: {what}: {exc.strerror} "
                                       f"[{errno.errorcode.get(exc.errno, exc.errno)}]", fix)


def disk(config: LMCacheEngineConfig) -> Finding:
    path = config.local_disk
    if not path:
        return Finding("tiers.disk", SKIP, "no disk tier (local_disk is not set)")
    existed = os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        return _os_error("cannot create the directory", path, exc)
    probe = os.path.join(path, f".lmcache-doctor-{uuid.uuid4().hex}{TMP_SUFFIX}")
    blob = serde.to_bytes(_probe_obj())
    try:
        start = time.perf_counter()
        with open(probe, "xb") as f:
            f.write(blob)
        with open(probe, "rb") as f:
            back = f.read()
        elapsed = time.perf_counter() - start
    except OSError as exc:
        return _os_error("cannot write a probe file", path, exc)
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    if not _round_trips(back):
        return Finding("tiers.disk", FAIL, f"local_disk={path!r}: a probe blob read back differs from what was "
                                           "written", "check the disk and file system for errors")
    usage = shutil.disk_usage(path)
    with os.scandir(path) as entries:
        cached = [e.stat().st_size for e in entries if e.name.endswith(SUFFIX) and e.is_file()]
    room = usage.free + sum(cached)  # what the tier can hold: free space plus its own files
    fact = (f"{path}: {'existing' if existed else 'created'} directory, probe written + read + deleted in "
            f"{elapsed * 1000:.1f} ms; budget {_gb(config.local_disk_bytes)}, free {_gb(usage.free)}, holds "
            f"{len(cached)} chunk files ({_gb(sum(cached))})")
    if config.local_disk_bytes > room:
        return Finding("tiers.disk", WARN, fact + ": the budget is larger than the disk can hold",
                       f"lower max_local_disk_size to at most {room / GB:.1f} (writes past the free space fail: "
                       "each one a miss and a log line)")
    return Finding("tiers.disk", OK, fact)


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                out[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def host_memory(config: LMCacheEngineConfig) -> Finding:
    if not config.local_cpu:
        return Finding("tiers.cpu", SKIP, "no host-memory tier (local_cpu is false)")
    info = _meminfo()
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    budget = config.local_cpu_bytes
    if total is None or available is None:
        return Finding("tiers.cpu", SKIP, f"budget {_gb(budget)}; free memory unknown (no /proc/meminfo)")
    fact = f"budget {_gb(budget)} (max_local_cpu_size); this machine: {_gb(available)} available of {_gb(total)}"
    if budget > total:
        return Finding("tiers.cpu", FAIL, fact + ": the budget is larger than the machine's memory",
                       f"lower max_local_cpu_size below {total / GB:.0f} (and leave room for vLLM and the model)")
    if budget > available:
        return Finding("tiers.cpu", WARN, fact + ": the budget is more than is available now",
                       f"lower max_local_cpu_size to at most {available / GB:.0f}, or the tier will push the "
                       "machine into swap or the OOM killer once it fills")
    return Finding("tiers.cpu", OK, fact)


def redis_tier(url: str, timeout: float) -> Finding:
    import redis

    shown = redact_url(url)
    client = redis.Redis.from_url(redis_py_url(url), socket_timeout=timeout, socket_connect_timeout=timeout)
    key = f"lmcache-doctor/{uuid.uuid4().hex}"
    try:
        pings = []
        for _ in range(5):
            start = time.perf_counter()
            client.ping()
            pings.append(time.perf_counter() - start)
        info = client.info()
        blob = serde.to_bytes(_probe_obj())
        start = time.perf_counter()
        client.set(key, blob, px=60_000)
        back = client.get(key)
        client.delete(key)
        round_trip = time.perf_counter() - start
    except redis.AuthenticationError as exc:
        return Finding("tiers.remote", FAIL, f"{shown}: the server refused the password: {exc}",
                       "put the right user:password in remote_url")
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        return Finding("tiers.remote", FAIL, f"{shown}: cannot reach the server: {exc}",
                       "start it (e.g. `redis-server --port PORT` or `valkey-server`), or fix remote_url; until "
                       "then every remote lookup is a miss (requests still work)")
    except redis.RedisError as exc:
        return Finding("tiers.remote", FAIL, f"{shown}: the server answered with an error: {exc}",
                       "check the server's logs and ACLs (lmcache needs GET, SET, EXISTS, DEL)")
    finally:
        client.close()
    if back is None or not _round_trips(back):
        return Finding("tiers.remote", FAIL, f"{shown}: a probe value read back differs from what was written",
                       "another client may rewrite keys, or the server is misbehaving")
    server = f"valkey {info['valkey_version']}" if "valkey_version" in info else f"redis {info.get('redis_version')}"
    fact = (f"{shown}: {server}, ping {statistics.median(pings) * 1000:.2f} ms (median of 5), probe set+get+delete "
            f"{round_trip * 1000:.2f} ms")
    maxmemory, policy = int(info.get("maxmemory", 0) or 0), info.get("maxmemory_policy", "")
    if maxmemory and policy == "noeviction":
        return Finding("tiers.remote", WARN, fact + f"; maxmemory {_gb(maxmemory)} with maxmemory-policy noeviction: "
                                                    "stores fail once it is full", "set maxmemory-policy allkeys-lru")
    return Finding("tiers.remote", OK, fact + (f"; maxmemory {_gb(maxmemory)}, {policy}" if maxmemory else
                                                "; no maxmemory set (the server grows until the machine runs out)"))


def lm_tier(url: str, timeout: float) -> Finding:
    try:
        latency = lm_health.probe(url, timeout)
    except (OSError, ConnectionError, ValueError) as exc:
        return Finding("tiers.remote", FAIL, f"{url}: HEALTH failed: {exc}",
                       "start the server (`python -m lmcache.v1.server HOST PORT`), or fix remote_url")
    return Finding("tiers.remote", OK, f"{url}: HEALTH answered 200 in {latency * 1000:.2f} ms (median of 3)")


def remote(config: LMCacheEngineConfig, timeout: float) -> Finding:
    url = config.remote_url
    if not url:
        return Finding("tiers.remote", SKIP, "no remote tier (remote_url is not set)")
    if urllib.parse.urlsplit(url).scheme == "lm":
        return lm_tier(url, timeout)
    return redis_tier(url, timeout)


def checks(config: LMCacheEngineConfig | None, timeout: float) -> list[Finding]:
    if config is None:
        return [Finding("tiers.all", SKIP, "the config did not load (see config.values): tiers not probed")]
    url = config.remote_url
    if url and remote_urls.scheme_of(url) in remote_urls.DISTRIBUTED_SCHEMES:
        from lmcache.doctor import distributed

        out = [host_memory(config), disk(config), *distributed.findings(config, timeout)]
    else:
        out = [host_memory(config), disk(config), remote(config, timeout)]
    if all(f.status == SKIP for f in out):
        out.append(Finding("tiers.all", WARN, "no tier is configured: nothing is cached",
                           "set local_cpu: true (the default), local_disk or remote_url"))
    return out
