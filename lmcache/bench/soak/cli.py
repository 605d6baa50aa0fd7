"""`python -m lmcache bench soak --minutes N`: the OpenAI server under load and faults.

One vLLM server with LMCache (our connector class "lmcache": background saves,
asynchronous loads from disk and Redis; host memory, disk, Redis tiers), on the small
random Llama, is
driven by concurrent clients for the whole run while: the host-memory tier evicts all the
time (its budget holds a fraction of the prompts), the disk tier fills to its budget,
redis-server is killed (SIGKILL: all it held is lost) and restarted twice (`--store
redis-cluster`: a cluster master is SIGKILLed and failed over twice; `--store server`: the
host and disk tiers are an `lmcache server`'s, SIGKILLed and restarted twice), and the vLLM
server is restarted once with the disk directory kept (clients paused meanwhile). Lone
probe requests check outputs exactly (load.py). Checked throughout and at the end: no
request failed, every output matched vLLM alone's, resident memory of the serving processes
stayed within the host budget plus a fixed overhead, the disk tier never held more bytes
than its budget, vLLM could empty its prefix cache at the end (no blocks held), a fresh
prompt could still be stored and loaded at the end, the worker then holds no pinned host
chunks and no chunks for lookup leases (its stats say so), and after
the restart (Redis emptied, host tier empty) the disk tier served hits.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from lmcache.bench.common import machine_name

CHUNK = 256
BLOCK = 128
PROMPT_TOKENS = 3 * CHUNK + 1  # vLLM's block-aligned hit and LMCache's chunk-aligned hit both end at 768
HOST_BUDGET_GB = 0.008  # 16 chunks of this model (512 KiB each): a fifth of the pool
DISK_BUDGET_GB = 0.012  # 24 chunks
FIXED_OVERHEAD_BYTES = 384 * 1024**2  # allowed RSS growth besides the host budget (allocator, buffers)
DEVICE_BLOCKS = 4 * PROMPT_TOKENS // BLOCK + 2  # vLLM's own KV cache: about four prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "a soak of the OpenAI server with LMCache under load, evictions and tier faults"
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the loaded run (default 3)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--documents", type=int, default=20, help="distinct 768-token prefixes (default 20)")
    parser.add_argument("--model", help="a local model directory (default: the small random Llama)")
    parser.add_argument("--workdir", help="logs, disk tier and Redis files (default: a temporary directory)")
    parser.add_argument("--store", default="redis", help="the shared tier and its fault: redis (killed and "
                        "restarted), redis-cluster (a master killed and failed over) or server (an lmcache "
                        "server holds the host and disk tiers; SIGKILLed and restarted); default redis")


def _say(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _prompts(model: str, documents: int) -> tuple[list[list[int]], list[list[int]]]:
    from lmcache.bench.workload.scenarios import TokenSource

    src = TokenSource(model)
    docs = [src.tokens(3 * CHUNK, "soak-doc", d) for d in range(documents)]
    pool = [doc + src.tokens(1, "soak-tail", d, k) for d, doc in enumerate(docs) for k in range(2)]
    probes = [src.tokens(PROMPT_TOKENS, "soak-probe", p) for p in range(4)]
    return pool, probes


def _servers(model: str, workdir: Path, tier_keys: dict):
    from lmcache.bench.workload.services import VllmServer

    common = dict(device_blocks=DEVICE_BLOCKS, block_size=BLOCK, max_model_len=2048, max_num_batched_tokens=2048)
    lmcache = {"chunk_size": CHUNK, **tier_keys, "remote_retry_interval": 1.0}
    # our connector class: background saves and asynchronous loads from disk and Redis, under the faults
    return (VllmServer(model, workdir, lmcache=None, name="soak-alone", **common),
            VllmServer(model, workdir, lmcache=lmcache, name="soak-lmcache", connector="lmcache", **common))


class Totals:
    """LMCache counters summed over the server's lifetimes (a restart starts them at zero)."""

    ADAPTER_KEYS = ("loaded_tokens", "load_failed_tokens", "async_loads")
    KEYS = ADAPTER_KEYS + ("stored_bytes", "misses_evicted", "misses_tier_down", "misses_dropped", "hit_tokens")

    def __init__(self):
        self.done = dict.fromkeys(self.KEYS, 0)

    @staticmethod
    def read(server) -> dict:
        s = server.worker_stats()
        engine = dict(s["engine"])
        engine.update({f"misses_{cause}": n for cause, n in (engine.pop("misses", None) or {}).items()})
        adapter = {k: s["adapter"][k] for k in Totals.ADAPTER_KEYS}
        return {**adapter, **{k: engine[k] for k in Totals.KEYS[len(Totals.ADAPTER_KEYS):]}}

    def close_lifetime(self, server) -> None:
        for k, v in self.read(server).items():
            self.done[k] += v

    def now(self, server) -> dict:
        return {k: self.done[k] + v for k, v in self.read(server).items()}


def run(args) -> dict:
    if args.minutes <= 0 or args.concurrency < 1 or args.documents < 2:
        raise SystemExit("--minutes must be > 0, --concurrency >= 1 and --documents >= 2")
    from lmcache.bench.soak.checks import Sampler
    from lmcache.bench.soak.load import Clients, Tally, probe, references
    from lmcache.bench.soak.store import SoakStore

    model = args.model
    if not model:
        from lmcache.testing.tiny_llama import DEMO_MODEL_DIR, build_tiny_llama, model_cache_dir

        model = str(build_tiny_llama(model_cache_dir(DEMO_MODEL_DIR)))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lmcache-soak-"))
    pool, probe_prompts = _prompts(model, args.documents)
    store = SoakStore(args.store, workdir).start(HOST_BUDGET_GB, workdir / "disk-tier", DISK_BUDGET_GB)
    alone, server = _servers(model, workdir, store.tier_keys(HOST_BUDGET_GB, workdir / "disk-tier", DISK_BUDGET_GB))
    tally, totals, faults = Tally(), Totals(), []
    disk_hits_after_restart = 0
    try:
        _say(f"machine: {machine_name()}; starting vLLM alone (the reference) ...")
        alone.start()
        _say(f"references from vLLM alone for {len(pool)} pool prompts and {len(probe_prompts)} probes ...")
        refs = references(alone, model, pool, 4)
        probe_refs = references(alone, model, probe_prompts, 4)
        alone.stop()  # one engine at a time on this machine
        _say(f"starting vLLM with LMCache (host memory, disk, {args.store}) ...")
        server.start()
        for i, p in enumerate(probe_prompts):  # lone cold runs: LMCache stores what a lone request computes
            probe(server, model, p, probe_refs[i], 3 * CHUNK, 4, tally, f"probe {i} (first)")
        rss_base = server.rss_bytes()
        rss_limit = rss_base + int(HOST_BUDGET_GB * 1024**3) + FIXED_OVERHEAD_BYTES
        sampler = Sampler(server.rss_bytes, workdir / "disk-tier", int(DISK_BUDGET_GB * 1024**3)).start()
        clients = Clients(lambda: server.base_url, model, pool, refs, args.concurrency, 4, tally).start()
        total_s = args.minutes * 60
        began = time.monotonic()
        schedule = [(0.15, "probe"), (0.25, "fault"), (0.35, "probe"), (0.5, "fault"), (0.6, "probe"),
                    (0.7, "restart"), (0.85, "probe"), (1.0, "end")]
        probe_round = 0
        for at, what in schedule:
            time.sleep(max(0.0, began + at * total_s - time.monotonic()))
            if what == "fault":
                _say(f"requests so far {tally.requests}")
                faults.append(store.fault(min(3.0, 0.03 * total_s), _say))
            elif what == "probe":
                clients.gate.pause()
                for i, p in enumerate(probe_prompts):
                    probe(server, model, p, probe_refs[i], 3 * CHUNK, 4, tally, f"probe {i} round {probe_round}")
                probe_round += 1
                clients.gate.resume()
            elif what == "restart":
                clients.gate.pause()
                totals.close_lifetime(server)
                server.stop()
                store.empty()  # after the restart, hits can only come from the disk tier
                _say(f"vLLM server stopped (disk tier kept, {args.store} emptied); starting it again ...")
                server.start()
                faults.append("vLLM server restarted with the disk tier kept")
                # the prompts the clients sent last are the likeliest on disk (its LRU keeps the newest)
                recent = list(dict.fromkeys(reversed(tally.recent)))
                disk_hits_after_restart = sum(
                    probe(server, model, pool[i], refs[i], 3 * CHUNK, 4, tally, f"pool prompt {i} after restart",
                          exact=False) for i in recent)
                _say(f"after the restart the disk tier served {disk_hits_after_restart} tokens "
                     f"to {len(recent)} lone requests")
                rss_base = max(rss_base, server.rss_bytes())
                rss_limit = rss_base + int(HOST_BUDGET_GB * 1024**3) + FIXED_OVERHEAD_BYTES
                clients.gate.resume()
        clients.stop()
        samples = sampler.stop()
        blocks_free = server.reset_prefix_cache()
        leak_probe = _fresh_prompt_round_trip(server, model, tally)
        leak_probe.update(_pins_left(server))
        final = totals.now(server)
        final["misses_evicted"] += store.evicted()  # the server's host tier evicts there, not in vLLM
    finally:
        for s in (alone, server):
            s.stop()
        store.stop()
    return _report(args, tally, faults, samples, final, rss_base, rss_limit, blocks_free, leak_probe,
                   disk_hits_after_restart, workdir, cleanup=not args.workdir)


def _fresh_prompt_round_trip(server, model: str, tally) -> dict:
    """A prompt never seen: stored, then loaded alone. Pinned chunks leaking would fill the
    small host budget and the store would be dropped."""
    from lmcache.bench.workload.clients import complete
    from lmcache.bench.workload.scenarios import TokenSource

    prompt = TokenSource(model).tokens(PROMPT_TOKENS, "soak-final")
    before = Totals.read(server)
    first = complete(server.base_url, model, prompt, 4, stream=False)
    server.flush(30)
    server.reset_prefix_cache()
    second = complete(server.base_url, model, prompt, 4, stream=False)
    after = Totals.read(server)
    tally.requests += 2
    for c in (first, second):
        if c.error:
            tally.failed.append(f"final fresh prompt: {c.error}")
    return {"stored_bytes": after["stored_bytes"] - before["stored_bytes"],
            "loaded_tokens": after["loaded_tokens"] - before["loaded_tokens"],
            "dropped": after["misses_dropped"] - before["misses_dropped"]}


def _pins_left(server) -> dict:
    """What the worker still holds once every request is done and every write flushed:
    chunks held by lookup leases and host chunks pinned by readers (both must be 0)."""
    server.flush(30)
    stats = server.worker_stats() or {}
    leases = stats.get("leases") or {}
    pins = stats.get("host_pins") or {}
    return {"lease_held_chunks": leases.get("held_chunks", -1), "leases_expired": leases.get("expired", -1),
            "pinned_chunks": sum(pins.values()) if pins else -1}


def _report(args, tally, faults, samples, final, rss_base, rss_limit, blocks_free, leak_probe,
            disk_hits_after_restart, workdir, cleanup) -> dict:
    disk_budget = int(DISK_BUDGET_GB * 1024**3)
    checks = {
        "no_request_failed": not tally.failed,
        "outputs_match_vllm_alone": not tally.wrong,
        "rss_within_budget": samples.peak_rss <= rss_limit,
        "disk_within_budget": not samples.disk_over_budget,
        "disk_filled_to_budget": samples.peak_disk >= disk_budget - 2 * 512 * 1024,
        "no_blocks_held_at_end": bool(blocks_free),
        "host_memory_not_leaked": leak_probe["loaded_tokens"] >= 3 * CHUNK and leak_probe["dropped"] == 0,
        "no_pins_or_leases_left": leak_probe["pinned_chunks"] == 0 and leak_probe["lease_held_chunks"] == 0,
        "disk_hits_after_restart": disk_hits_after_restart > 0,
        "host_tier_evicted": final["misses_evicted"] > 0,
        "faults_survived": len(faults) == 3,
        "async_loads_ran": final["async_loads"] > 0,
    }
    for line in (tally.failed + tally.wrong)[:20]:
        print("  problem:", line)
    print(f"requests served {tally.requests} ({tally.probes} lone probes, {tally.probes_exact} compared exactly), "
          f"failed {len(tally.failed)}, outputs differing {len(tally.wrong)}")
    print(f"LMCache: {final['loaded_tokens']} tokens loaded ({final['async_loads']} asynchronous loads from disk/"
          f"Redis; {final['load_failed_tokens']} tokens short, recomputed), {final['hit_tokens']} hit tokens at lookup, "
          f"{final['stored_bytes'] / 1e6:.0f} MB stored; misses: evicted {final['misses_evicted']}, "
          f"tier down {final['misses_tier_down']}, dropped {final['misses_dropped']}")
    print(f"faults survived: {len(faults)} ({'; '.join(faults)}); disk tier after restart served "
          f"{disk_hits_after_restart} probe tokens")
    print(f"peak RSS {samples.peak_rss / 1e6:.0f} MB vs limit {rss_limit / 1e6:.0f} MB (start {rss_base / 1e6:.0f} MB + "
          f"host budget {HOST_BUDGET_GB * 1024:.0f} MiB + fixed {FIXED_OVERHEAD_BYTES >> 20} MiB); peak disk "
          f"{samples.peak_disk / 1e6:.2f} MB vs budget {disk_budget / 1e6:.2f} MB ({samples.samples} samples)")
    print("checks: " + ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in checks.items()))
    print(f"left at the end: {leak_probe['pinned_chunks']} pinned host chunks, {leak_probe['lease_held_chunks']} "
          f"chunks held by leases ({leak_probe['leases_expired']} leases expired unused in the last lifetime)")
    print(f"machine: {machine_name()}")
    if cleanup:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "bench": "soak", "machine": machine_name(), "minutes": args.minutes, "concurrency": args.concurrency,
        "store": args.store,
        "requests": tally.requests, "failed": len(tally.failed), "outputs_differing": len(tally.wrong),
        "probes": tally.probes, "probes_exact": tally.probes_exact, "faults_survived": len(faults),
        "lmcache_loaded_tokens": final["loaded_tokens"], "async_loads": final["async_loads"],
        "load_failed_tokens": final["load_failed_tokens"], "misses_evicted": final["misses_evicted"],
        "misses_tier_down": final["misses_tier_down"], "disk_hit_tokens_after_restart": disk_hits_after_restart,
        "peak_rss_bytes": samples.peak_rss, "rss_limit_bytes": rss_limit, "peak_disk_bytes": samples.peak_disk,
        "disk_budget_bytes": disk_budget, "pinned_chunks_left": leak_probe["pinned_chunks"],
        "lease_held_chunks_left": leak_probe["lease_held_chunks"], "checks": checks, "targets_met": all(checks.values()),
    }
