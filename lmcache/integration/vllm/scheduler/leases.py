"""Which lookup lease each request holds, seen from the scheduler.

Every lookup the scheduler sends names a fresh lease id (lookup_channel.lease_id_of),
so a release that reaches a worker late (async scheduling runs a step ahead) can never
end a newer lease of the same request. A lease ends at the worker when the load that
names it is planned; every other way out (the request needed no load, was looked up
again, finished, was aborted or preempted) is a release carried by the next step's
metadata (`LMCacheConnectorMetadata.released_lease_ids`).
"""

from __future__ import annotations

from lmcache.integration.vllm.lookup_channel import lease_id_of


class SchedulerLeases:
    def __init__(self):
        self._generation = 0
        self._current: dict[str, str] = {}  # request id -> its lease id not yet used by a load
        self._released: set[str] = set()

    def new(self, req_id: str) -> str:
        """The lease id for a new lookup of `req_id` (an older unused one is released)."""
        self.release(req_id)
        self._generation += 1
        lease_id = lease_id_of(req_id, self._generation)
        self._current[req_id] = lease_id
        return lease_id

    def for_load(self, req_id: str) -> str | None:
        """The lease a planned load uses (the worker ends it after planning the load)."""
        return self._current.pop(req_id, None)

    def release(self, req_id: str) -> None:
        lease_id = self._current.pop(req_id, None)
        if lease_id is not None:
            self._released.add(lease_id)

    def take_released(self) -> set[str]:
        released, self._released = self._released, set()
        return released

    def __len__(self) -> int:
        return len(self._current)
