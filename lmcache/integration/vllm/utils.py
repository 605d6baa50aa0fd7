"""Upstream import path: vLLM's lmcache_mp_connector imports `mla_enabled` from here.

Users (and vLLM's examples) import `ENGINE_NAME` from here too. The integration's
settings live in config.py; this module only re-exports.
"""

from __future__ import annotations

from lmcache.integration.vllm.config import (  # noqa: F401 - re-exported names
    ENGINE_NAME,
    lmcache_config_from_vllm,
    mla_enabled,
    truthy,
)

__all__ = ["ENGINE_NAME", "lmcache_config_from_vllm", "mla_enabled", "truthy"]
