"""Upstream import path: vLLM's lmcache_mp_connector imports its adapter names from here.

They are the names upstream's multi-process adapter has, so that vLLM's module imports
with this package installed.

vLLM then prefers our `lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector`,
which uses this package's own `lmcache server` (its own versioned protocol, docs/server.md).
Upstream's wire protocol (what vLLM's built-in `LMCacheMPConnectorUpstream` speaks, chosen
with LMCACHE_USE_UPSTREAM_MP=1) is not spoken here: its adapters refuse to start with a
message saying what to do instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

UNSUPPORTED = (
    "upstream LMCache's multi-process server mode (vLLM's LMCacheMPConnectorUpstream, "
    "selected by LMCACHE_USE_UPSTREAM_MP) is not provided by this lmcache package. "
    "Unset LMCACHE_USE_UPSTREAM_MP: vLLM then uses lmcache.integration.vllm.lmcache_mp_connector."
    "LMCacheMPConnector, whose host tier is this package's own `lmcache server` at lmcache.mp.host/"
    "lmcache.mp.port (docs/server.md), or vLLM's own processes when no server answers."
)


@dataclass
class ParallelStrategy:
    use_mla: bool
    kv_world_size: int
    kv_worker_id: int
    actual_world_size: int
    actual_worker_id: int
    tp_size: int
    pp_size: int


@dataclass
class LoadStoreOp:
    block_ids: list[int]
    token_ids: list[int] | None = None
    block_hashes: list[bytes] | None = None
    start: int = 0
    end: int = 0

    def __len__(self) -> int:
        return len(self.block_ids)


def why_not_ours() -> str | None:
    """Why vLLM could not import our LMCacheMPConnector (it then falls back to its
    built-in upstream class, which builds these adapters), or None if it imports."""
    try:
        from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the cause is the message
        return f"{type(exc).__name__}: {exc}"
    return None


class _Unsupported:
    def __init__(self, *args, **kwargs):
        if not os.environ.get("LMCACHE_USE_UPSTREAM_MP"):
            cause = why_not_ours()
            if cause is not None:
                raise RuntimeError(
                    "vLLM fell back to its built-in LMCacheMPConnectorUpstream because "
                    f"lmcache.integration.vllm.lmcache_mp_connector did not import ({cause}); "
                    "`python -m lmcache doctor` shows what the installed vLLM lacks.")
        raise RuntimeError(UNSUPPORTED)


class LMCacheMPSchedulerAdapter(_Unsupported):
    pass


class LMCacheMPWorkerAdapter(_Unsupported):
    pass
