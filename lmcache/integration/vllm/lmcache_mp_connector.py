"""Upstream import path: vLLM's lmcache_mp_connector prefers `LMCacheMPConnector` from here.

It is what `vllm serve MODEL --kv-offloading-backend lmcache --kv-offloading-size N`
runs with this package installed.

vLLM maps that flag pair to kv_connector="LMCacheMPConnector" with kv_role "kv_both",
and its connector module prefers this class over its built-in one. It is our
`LMCacheConnectorV1Dynamic` (same engine, async saving, stats). Its host tier is the
node's shared `lmcache server` (docs/server.md) at `lmcache.mp.host`/`lmcache.mp.port`
when those are given, or when a server answers at 127.0.0.1:5555 (lmcache.mp.port);
otherwise it lives in vLLM's own processes, N GiB per worker (vLLM does not forward N
for this backend; it is read from vLLM's cache config, see
`lmcache.integration.vllm.utils.offloading_overrides`). The worker says which in one
start-up line. Every other setting comes from the usual sources (LMCACHE_CONFIG_FILE,
LMCACHE_* env vars, "lmcache.*" keys of kv_connector_extra_config).
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from lmcache.integration.vllm.config import offloading_overrides, prefer_recompute
from lmcache.integration.vllm.lmcache_connector_v1 import LMCacheConnectorV1Dynamic

__all__ = ["LMCacheMPConnector"]


class LMCacheMPConnector(LMCacheConnectorV1Dynamic):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        # The one-flag switch leaves no way to choose the load-failure policy, and
        # vLLM's default ("fail") fails a request whose cached chunk vanished between
        # lookup and load.
        if role == KVConnectorRole.SCHEDULER and offloading_overrides(vllm_config):
            prefer_recompute(vllm_config, "a cache miss never fails a request")
