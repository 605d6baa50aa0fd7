"""`LMCacheMPConnector`: what `vllm serve MODEL --kv-offloading-backend lmcache
--kv-offloading-size N` runs with this package installed.

vLLM maps that flag pair to kv_connector="LMCacheMPConnector" with kv_role "kv_both",
and its connector module prefers this class over its built-in one. It is our
`LMCacheConnectorV1Dynamic` (same engine, async saving, stats) running inside vLLM's
own processes, NOT upstream's separate LMCache server: the host-memory tier is
N GiB per worker (vLLM does not forward N for this backend; it is read from vLLM's
cache config, see `lmcache.integration.vllm.utils.offloading_overrides`), and every
other setting comes from the usual sources (LMCACHE_CONFIG_FILE, LMCACHE_* env vars,
"lmcache.*" keys of kv_connector_extra_config). Upstream's `lmcache.mp.*` keys
(server host/port) have no meaning here and are ignored.
"""

from __future__ import annotations

from lmcache.integration.vllm.lmcache_connector_v1 import LMCacheConnectorV1Dynamic

__all__ = ["LMCacheMPConnector"]


class LMCacheMPConnector(LMCacheConnectorV1Dynamic):
    pass
