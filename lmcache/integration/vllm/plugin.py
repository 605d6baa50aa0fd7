"""vLLM general plugin: registers our connector under the short name "lmcache".

vLLM calls `register()` in every process it starts (entry point group
`vllm.general_plugins`). Registration is lazy (module path + class name), so
nothing of ours is imported until a user asks for the "lmcache" connector.
vLLM's own "LMCacheConnectorV1" name is left alone; it imports our
`lmcache.integration.vllm.vllm_v1_adapter` by itself.
"""

from __future__ import annotations

CONNECTOR_NAME = "lmcache"
CONNECTOR_MODULE = "lmcache.integration.vllm.lmcache_connector_v1"
CONNECTOR_CLASS = "LMCacheConnectorV1Dynamic"


def register() -> None:
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except ImportError:  # vLLM without KV transfer support: nothing to register with
        return
    # register() runs once per vLLM process, but a process may load plugins twice.
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_CLASS)
