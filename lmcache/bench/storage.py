"""`python -m lmcache bench storage`: put/get throughput of each tier for 256-token
chunks at a Llama-3.1-8B KV shape, next to a raw baseline of the same medium
measured in the same run (alternating rounds):

  cpu    put = take a buffer from the pool, copy the chunk in, insert in the LRU;
         get = find, hold, copy out, release.          baseline: memcpy of the same bytes
  disk   the disk tier's put/get: temp file (fallocate, header + payload written
         in blocks, each hashed right after the write), rename; get reads in
         blocks, hashing each, and verifies. Every put hashes its payload (no
         checksum carried over from an earlier round or tier).
                                                       baseline: plain file write / read
         (open, one write of the payload, close; open, one readinto, close)
  redis  the remote tier's put/get (blob build, checksum, verify, copy to host buffer)
                                                       baseline: redis-py SET / GET of the same blob
  redis-cluster, sentinel, s3: the same against a 3-master cluster, a sentinel group,
         SeaweedFS; baseline: the store's raw client (bench/storage_remote.py)
  server the host tier through a real `lmcache server` (bench/server_tier.py)
                                                       baseline: the in-process host tier
  lm     the lm:// tier's put/get against our server (a separate process)
                                                       baseline: raw TCP send / recv of the same
                                                       bytes on loopback (see bench/lm_tier.py)

Disk figures go through the page cache (no fsync on either side; the same number
of files, each side deletes its files before its write round). The machine is
shared and noisy: a figure is the best of --repeat interleaved rounds, so both
sides of a ratio get the same chances of a quiet round. Without --redis-url a
redis-server is started on a free port for the run (the other stores always are).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Callable

import torch

from lmcache.bench.common import gbps, machine_name
from lmcache.console import print_table
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory import HostMemoryPool, MemoryFormat
from lmcache.v1.storage_backend import serde
from lmcache.v1.storage_backend.local_disk import LocalDiskBackend
from lmcache.v1.storage_backend.storage_manager import StorageManager
from lmcache.v1.token_database import CacheEngineKey

TARGETS = {"cpu": 0.8, "server": 0.8, "disk": 0.7, "redis": 0.7, "lm": 0.7, "redis-cluster": 0.7, "sentinel": 0.7,
           "s3": 0.7}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=8, help="chunks per measured round (default 8)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per chunk (default 256)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeat", type=int, default=15, help="rounds; the best of each is reported (default 15)")
    parser.add_argument("--tiers", default="cpu,server,disk,redis,lm",
                        help="comma-separated subset of " + ",".join(TARGETS) + " (default cpu,server,disk,redis,lm)")
    parser.add_argument("--disk-dir", default=None, help="directory for the disk tier (default: a temp dir)")
    parser.add_argument("--redis-url", default=None, help="use this server instead of starting one")
    parser.add_argument("--chunk-secret", default=None,
                        help="seal and verify disk and remote chunks with this secret (what chunk_secret costs)")


def interleaved_best_with_setup(cases: dict[str, tuple[Callable[[], object], Callable[[], object]]],
                                repeat: int) -> dict[str, float]:
    """Like bench.common.interleaved_best, with an untimed setup before each timed call."""
    best = {name: float("inf") for name in cases}
    for round_ in range(repeat + 1):  # round 0 warms up
        for name, (setup, fn) in cases.items():
            setup()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_:
                best[name] = min(best[name], elapsed)
    return best


def _key(i: int, tag: str) -> CacheEngineKey:
    return CacheEngineKey("bench/llama-3.1-8b", 1, 0, f"{i:032x}", tag, "kv.L32.H8.D128")


def _nothing() -> None:
    pass


def bench_cpu(sources, shape, dtype, repeat):
    nbytes = sources[0].nbytes
    config = LMCacheEngineConfig.from_defaults(max_local_cpu_size=(len(sources) + 1) * nbytes / 1024**3)
    manager = StorageManager(config)
    # Distinct destinations, like the pool's buffers: one reused buffer would stay in the
    # CPU cache and flatter the baseline.
    dsts = [torch.empty_like(src) for src in sources]
    keys = [_key(i, "cpu") for i in range(len(sources))]

    def memcpy():
        for dst, src in zip(dsts, sources):
            dst.copy_(src)

    def put():
        for key, src in zip(keys, sources):
            obj = manager.allocate(shape, dtype, MemoryFormat.KV_2LTD)
            obj.tensor.copy_(src)
            manager.put(key, obj)

    def get():
        for key, dst in zip(keys, dsts):
            obj = manager.get(key)
            dst.copy_(obj.tensor)
            manager.release(obj)

    put()
    best = interleaved_best_with_setup(
        {"memcpy": (_nothing, memcpy), "put": (manager.cpu.clear, put), "get": (_nothing, get)}, repeat
    )
    manager.close()
    return best


def bench_disk(objs, directory, repeat, integrity=serde.NO_SECRET):
    nbytes = objs[0].nbytes
    tier = LocalDiskBackend(os.path.join(directory, "tier"), (len(objs) + 1) * (nbytes + serde.HEADER_SIZE),
                            integrity=integrity)
    pool = HostMemoryPool(2 * nbytes)
    raw_dir = os.path.join(directory, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    keys = [_key(i, "disk") for i in range(len(objs))]
    raw_paths = [os.path.join(raw_dir, f"{i}.bin") for i in range(len(objs))]
    payloads = [serde.payload_view(o.tensor) for o in objs]
    dst = bytearray(nbytes)

    def clear_tier():
        for key in keys:
            tier.remove(key)

    def put():
        for key, obj in zip(keys, objs):
            assert tier.put(key, obj)

    def get():
        for key in keys:
            obj = tier.get(key, pool.allocate)
            assert obj is not None, "disk tier lost a chunk during the benchmark"
            obj.free()

    def clear_raw():
        for path in raw_paths:
            if os.path.exists(path):
                os.unlink(path)

    def raw_write():
        for path, payload in zip(raw_paths, payloads):
            with open(path, "wb", buffering=0) as f:
                f.write(payload)

    def raw_read():
        view = memoryview(dst)
        for path in raw_paths:
            with open(path, "rb", buffering=0) as f:
                f.readinto(view)

    put()
    raw_write()
    return interleaved_best_with_setup(
        {
            "raw_write": (clear_raw, raw_write),
            "put": (clear_tier, put),
            "raw_read": (_nothing, raw_read),
            "get": (_nothing, get),
        },
        repeat,
    )


def run(args: argparse.Namespace) -> dict:
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    unknown = set(tiers) - set(TARGETS)
    if unknown:
        raise SystemExit(f"--tiers: unknown {sorted(unknown)}; accepted: {', '.join(TARGETS)}")
    if args.chunks <= 0 or args.repeat <= 0:
        raise SystemExit("--chunks and --repeat must be positive")
    dtype = DTYPES[args.dtype]
    shape = torch.Size((2, args.layers, args.tokens, args.kv_heads * args.head_size))
    chunk_bytes = shape.numel() * dtype.itemsize
    total = chunk_bytes * args.chunks
    print(f"machine: {machine_name()}")
    print(f"chunk: {args.tokens} tokens, KV_2LTD {tuple(shape)} {args.dtype}"
          f" = {chunk_bytes / 2**20:.1f} MiB; {args.chunks} chunks per round, best of {args.repeat} rounds")

    pool = HostMemoryPool(total + chunk_bytes)
    objs = []
    for i in range(args.chunks):
        obj = pool.allocate(shape, dtype, MemoryFormat.KV_2LTD)
        obj.tensor.view(torch.int16).random_()  # bf16/fp16 bit patterns; values don't matter
        objs.append(obj)
    sources = [o.tensor for o in objs]
    integrity = serde.Integrity(args.chunk_secret)
    if integrity.has_secret:
        print("chunk_secret set: disk and remote chunks are sealed (HMAC) and verified")

    result: dict = {"bench": "storage", "machine": machine_name(), "chunk_mib": round(chunk_bytes / 2**20, 2),
                    "chunks": args.chunks, "chunk_secret": integrity.has_secret}
    rows = []
    met = True

    def record(tier, op, best, baseline_name, ours, base):
        nonlocal met
        ours_gbps, base_gbps = gbps(total, best[ours]), gbps(total, best[base])
        ratio = ours_gbps / base_gbps
        target = TARGETS[tier]
        ok = ratio >= target
        met = met and ok
        tier_id, base_id = tier.replace("-", "_"), baseline_name.replace("-", "_")
        result[f"{tier_id}_{op}_gbps"] = round(ours_gbps, 3)
        result[f"{base_id}_gbps"] = round(base_gbps, 3)
        result[f"{tier_id}_{op}_vs_{base_id}"] = round(ratio, 3)
        rows.append([tier, op, ours_gbps, baseline_name, base_gbps, ratio, f">= {target}", "yes" if ok else "NO"])

    if "cpu" in tiers:
        best = bench_cpu(sources, shape, dtype, args.repeat)
        record("cpu", "put", best, "memcpy", "put", "memcpy")
        record("cpu", "get", best, "memcpy", "get", "memcpy")
    if "server" in tiers:
        from lmcache.bench.server_tier import bench_server

        best = bench_server(sources, shape, dtype, args.repeat, interleaved_best_with_setup)
        record("server", "put", best, "in_process_put", "server_put", "in_process_put")
        record("server", "get", best, "in_process_get", "server_get", "in_process_get")
    if "disk" in tiers:
        base_dir = args.disk_dir or tempfile.gettempdir()
        os.makedirs(base_dir, exist_ok=True)
        directory = tempfile.mkdtemp(prefix="lmcache-bench-", dir=base_dir)
        try:
            best = bench_disk(objs, directory, args.repeat, integrity)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        record("disk", "put", best, "raw_write", "put", "raw_write")
        record("disk", "get", best, "raw_read", "get", "raw_read")
        result["disk_dir"] = base_dir
    from lmcache.bench.storage_remote import REMOTE_TIERS, bench_remote

    for tier in [t for t in REMOTE_TIERS if t in tiers]:
        best = bench_remote(tier, objs, args.repeat, args.redis_url if tier == "redis" else None,
                            interleaved_best_with_setup, integrity)
        raw = "raw" if tier == "redis" else f"{tier}_raw"  # redis keeps its figure names
        record(tier, "put", best, f"{raw}_set", "put", "raw_set")
        record(tier, "get", best, f"{raw}_get", "get", "raw_get")
    if "redis" in tiers and "redis-cluster" in tiers:  # what sharding costs per chunk, same run
        for op in ("put", "get"):
            result[f"redis_cluster_{op}_vs_redis"] = round(result[f"redis_cluster_{op}_gbps"] /
                                                           result[f"redis_{op}_gbps"], 3)
    if "lm" in tiers:
        from lmcache.bench.lm_tier import bench_lm

        best = bench_lm(objs, [_key(i, "bfloat16") for i in range(len(objs))], args.repeat,
                        interleaved_best_with_setup)
        record("lm", "put", best, "socket_send", "put", "raw_send")
        record("lm", "get", best, "socket_recv", "get", "raw_recv")

    print_table(["tier", "op", "GB/s", "baseline", "baseline GB/s", "ratio", "target", "met"], rows)
    if "disk" in tiers:
        print("disk: both sides through the page cache (no fsync)")
    result["targets_met"] = met
    return result
