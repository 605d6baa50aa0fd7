"""Upstream import path: vLLM's lmcache_mp_connector imports its record types from here.

Only vLLM's built-in `LMCacheMPConnectorUpstream` (upstream's separate-server mode)
uses them; with this package vLLM picks our in-process
`lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestAllocationRecord:
    """Blocks newly allocated to a request, and the tokens they cover."""

    req_id: str
    new_block_ids: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)


BlockAllocationRecord = RequestAllocationRecord  # the older name
