"""The per-step message from the scheduler to the workers: `LMCacheConnectorMetadata`.

Each request's load and save travel as the engine's own `TransferSpec` (token ids,
slot mapping, skip_tokens, num_tokens, key material; a load also names its lookup
lease), so the workers hand them to `LMCacheEngine.batched_retrieve/batched_store` as
they are. vllm-gaudi isinstance-checks the message under its upstream name,
`lmcache.integration.vllm.vllm_v1_adapter.LMCacheConnectorMetadata` (re-exported
there), and reads its `.requests` every step, comparing the elements with request-id
strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from lmcache.v1.cache_engine import TransferSpec


@dataclass
class ReqMeta:
    req_id: str
    load: TransferSpec | None = None
    save: TransferSpec | None = None
    # The load writes positions [load_from, load_to): before load_from vLLM holds the
    # KV itself; from load_to on vLLM computes (at least the last prompt token). The
    # load's tokens cover whole stored chunks so that their keys match.
    load_from: int = 0
    load_to: int = 0
    # vLLM parked the request for this load (WAITING_FOR_REMOTE_KVS): the worker runs it
    # off the step and reports it through get_finished
    async_load: bool = False


class LMCacheConnectorMetadata(KVConnectorMetadata):
    """One step's plan, scheduler -> workers (picklable)."""

    def __init__(self, requests: list[ReqMeta] | None = None, preempted_req_ids: set[str] | None = None,
                 released_lease_ids: set[str] | None = None):
        self.requests: list[ReqMeta] = list(requests or [])
        self.preempted_req_ids: set[str] = set(preempted_req_ids or ())
        # lookup leases the workers may drop (scheduler/leases.py)
        self.released_lease_ids: set[str] = set(released_lease_ids or ())

    @property
    def loads(self) -> list[ReqMeta]:
        return [r for r in self.requests if r.load is not None]

    @property
    def saves(self) -> list[ReqMeta]:
        return [r for r in self.requests if r.save is not None]

    def __repr__(self) -> str:
        return f"LMCacheConnectorMetadata(loads={len(self.loads)}, saves={len(self.saves)})"
