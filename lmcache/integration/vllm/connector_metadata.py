"""The per-step message from the scheduler to the workers: `LMCacheConnectorMetadata`.

vllm-gaudi isinstance-checks it under its upstream name,
`lmcache.integration.vllm.vllm_v1_adapter.LMCacheConnectorMetadata` (re-exported there),
and reads its `.requests` every step, comparing the elements with request-id strings.
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from lmcache.integration.vllm.request_tracker import ReqMeta


class LMCacheConnectorMetadata(KVConnectorMetadata):
    """One step's plan, scheduler -> workers (picklable)."""

    def __init__(self, requests: list[ReqMeta] | None = None, preempted_req_ids: set[str] | None = None,
                 released_lease_ids: set[str] | None = None):
        self.requests: list[ReqMeta] = list(requests or [])
        self.preempted_req_ids: set[str] = set(preempted_req_ids or ())
        # lookup leases the workers may drop (scheduler_leases.py)
        self.released_lease_ids: set[str] = set(released_lease_ids or ())

    @property
    def loads(self) -> list[ReqMeta]:
        return [r for r in self.requests if r.load is not None]

    @property
    def saves(self) -> list[ReqMeta]:
        return [r for r in self.requests if r.save is not None]

    def __repr__(self) -> str:
        return f"LMCacheConnectorMetadata(loads={len(self.loads)}, saves={len(self.saves)})"


def transfer_specs(transfers) -> list:
    """The engine's TransferSpecs for a step's planned loads or saves."""
    from lmcache.v1.cache_engine import TransferSpec

    return [
        TransferSpec(tokens=t.token_ids, slot_mapping=t.slot_mapping, skip_tokens=t.skip_tokens, num_tokens=t.num_tokens,
                     key_material=t.key_material)
        for t in transfers
    ]
