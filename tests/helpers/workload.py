"""Deterministic prompts and KV for tests that span processes.

Prompt p's tokens and KV are pure functions of p, so a process can check
bit-exactly what another process stored. Run as a script (see child_main) to
store or verify prompts in a separate Python process.
"""

from __future__ import annotations

import functools
import json
import sys

import torch

from lmcache.v1.cache_engine import LMCacheEngine, LMCacheEngineMetadata
from lmcache.v1.config import LMCacheEngineConfig
from tests.helpers.host_connector import HostPagedConnector, bits, random_fill

SHAPE = dict(num_layers=2, num_heads=4, head_size=32)  # 256 values per token-layer-plane


def metadata(chunk_size: int, dtype=torch.float16, model="org/model-7B") -> LMCacheEngineMetadata:
    return LMCacheEngineMetadata(
        model, 1, 0, dtype, (SHAPE["num_layers"], 2, chunk_size, SHAPE["num_heads"], SHAPE["head_size"])
    )


def prompt_tokens(p: int, num_tokens: int) -> list[int]:
    gen = torch.Generator().manual_seed(10_000 + p)
    return torch.randint(0, 50_000, (num_tokens,), generator=gen).tolist()


@functools.lru_cache(maxsize=64)
def prompt_kv(p: int, num_tokens: int, dtype=torch.float16) -> torch.Tensor:
    """[num_tokens, 2, L, H*D]: the paged-cache rows of prompt p's tokens (cached: do not modify)."""
    rows = torch.empty(num_tokens, 2, SHAPE["num_layers"], SHAPE["num_heads"] * SHAPE["head_size"], dtype=dtype)
    return random_fill(rows, seed=p)


def make_engine(config: LMCacheEngineConfig, num_slots: int, dtype=torch.float16) -> tuple[LMCacheEngine, HostPagedConnector]:
    conn = HostPagedConnector(num_slots, SHAPE["num_layers"], SHAPE["num_heads"], SHAPE["head_size"], dtype)
    return LMCacheEngine(config, metadata(config.chunk_size, dtype), conn), conn


def store_prompt(engine: LMCacheEngine, conn: HostPagedConnector, p: int, num_tokens: int) -> int:
    slots = torch.arange(num_tokens)
    conn.cache[slots] = prompt_kv(p, num_tokens, conn.kv_dtype)
    return engine.store(prompt_tokens(p, num_tokens), slot_mapping=slots)


def check_prompt(engine: LMCacheEngine, conn: HostPagedConnector, p: int, num_tokens: int) -> tuple[int, bool]:
    """(tokens loaded, whether every loaded token's KV is exactly prompt p's)."""
    slots = torch.arange(num_tokens)
    conn.cache.zero_()
    loaded = int(engine.retrieve(prompt_tokens(p, num_tokens), slot_mapping=slots).sum())
    expected = prompt_kv(p, num_tokens, conn.kv_dtype)
    exact = torch.equal(bits(conn.cache[:loaded]), bits(expected[:loaded]))
    return loaded, exact


def chunk_kv(p: int, num_tokens: int, start: int, end: int, dtype=torch.float16) -> torch.Tensor:
    """Prompt p's KV for tokens start..end-1 as a KV_2LTD memory-object tensor."""
    return prompt_kv(p, num_tokens, dtype)[start:end].permute(1, 2, 0, 3).contiguous()


def rewrite_prompt(engine: LMCacheEngine, conn: HostPagedConnector, p: int, num_tokens: int) -> int:
    """Write every chunk of prompt p to the disk and remote tiers again, even if
    present (forces concurrent overwrites of the same files and keys)."""
    from lmcache.v1.storage_backend.local_disk import file_name

    written = 0
    for chunk in engine.token_db.chunks(prompt_tokens(p, num_tokens)):
        obj = engine.storage.allocate(conn.get_shape(chunk.end - chunk.start), conn.kv_dtype, conn.memory_format)
        obj.tensor.copy_(chunk_kv(p, num_tokens, chunk.start, chunk.end, conn.kv_dtype))
        if engine.storage.disk is not None:
            engine.storage.disk._forget(file_name(chunk.key))
            written += engine.storage.disk.put(chunk.key, obj)
        if engine.storage.remote is not None:
            written += engine.storage.remote.put(chunk.key, obj)
        obj.free()
    return written


def check_remote(engine: LMCacheEngine, p: int, num_tokens: int) -> tuple[int, int]:
    """(chunks found in the remote tier, chunks whose bytes are wrong)."""
    found = wrong = 0
    for chunk in engine.token_db.chunks(prompt_tokens(p, num_tokens)):
        obj = engine.storage.remote.get(chunk.key, engine.storage.allocate)
        if obj is None:
            continue
        found += 1
        expected = chunk_kv(p, num_tokens, chunk.start, chunk.end, obj.metadata.dtype)
        wrong += not torch.equal(bits(obj.tensor), bits(expected))
        obj.free()
    return found, wrong


def outage_then_recovery(url: str, stop, start, caplog, chunk_size: int, num_tokens: int) -> None:
    """A remote server stopped mid-run and started again: while it is down every store
    and load is a miss (never stuck, one log line); once back, new chunks are stored and
    loaded bit-exact again."""
    import logging
    import time

    config = LMCacheEngineConfig.from_defaults(
        chunk_size=chunk_size, max_local_cpu_size=0.02, local_cpu=False, remote_url=url,
        remote_retry_interval=0.3, remote_timeout=1.0,
    )
    n = num_tokens
    engine, conn = make_engine(config, n)
    store_prompt(engine, conn, 1, n)
    assert engine.flush(10) and check_prompt(engine, conn, 1, n) == (n, True)

    stop()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        for p in range(2, 6):  # the run goes on: stores and loads are misses
            assert store_prompt(engine, conn, p, n) == n
            assert engine.lookup(prompt_tokens(p, n)) == 0
            assert check_prompt(engine, conn, 1, n)[0] == 0
        assert engine.flush(10)
    assert time.monotonic() - started < 5  # never stuck on the dead server
    assert engine.stats.misses["tier_down"] > 0
    assert caplog.text.count("unreachable") == 1, caplog.text

    start()  # same port, empty (no persistence)
    time.sleep(0.4)  # past the back-off
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        store_prompt(engine, conn, 7, n)
        assert engine.flush(10)
    assert "reachable again" in caplog.text
    assert engine.lookup(prompt_tokens(7, n)) == n
    assert check_prompt(engine, conn, 7, n) == (n, True)
    engine.close()


def child_main(argv: list[str]) -> None:
    """python -m tests.helpers.workload '{"config": {...}, "mode": "store"|"rewrite"|"check",
    "prompts": [...], "tokens": N, "rounds": R}' -> prints one JSON line."""
    args = json.loads(argv[0])
    config = LMCacheEngineConfig.from_defaults(**args["config"])
    n = args["tokens"]
    engine, conn = make_engine(config, n)
    out = {"stored": 0, "checked": 0, "loaded": 0, "wrong": 0, "misses": 0, "remote_found": 0}
    try:
        for _ in range(args.get("rounds", 1)):
            for p in args["prompts"]:
                if args["mode"] == "store":
                    out["stored"] += store_prompt(engine, conn, p, n)
                elif args["mode"] == "rewrite":
                    out["stored"] += rewrite_prompt(engine, conn, p, n)
                else:
                    if engine.storage.cpu is not None:
                        engine.storage.cpu.clear()  # always read the shared tiers
                    loaded, exact = check_prompt(engine, conn, p, n)
                    out["checked"] += 1
                    out["loaded"] += loaded
                    out["wrong"] += 0 if exact else 1
                    out["misses"] += loaded < n
                    if engine.storage.remote is not None:
                        found, wrong = check_remote(engine, p, n)
                        out["remote_found"] += found
                        out["wrong"] += wrong
        engine.flush(60)
        out["stats"] = engine.stats.as_dict()
    finally:
        engine.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    child_main(sys.argv[1:])
