"""What a load delivered, against what vLLM was promised.

A lookup holds what it counted for the request's load (lmcache.v1.leases), so a load
is short only on a fault: on CUDA/CPU the positions vLLM was promised but did not get
become load errors (vLLM recomputes them); where the runner never reads load errors
(vllm-gaudi, runner.py) a short load stops the step with LoadIncompleteError instead
of letting the request compute on KV that is not there (docs/gaudi.md).
"""

from __future__ import annotations

import logging

from lmcache.integration.vllm.metadata import ReqMeta

logger = logging.getLogger(__name__)


class LoadIncompleteError(RuntimeError):
    """A load came up short on a runner that never reads load errors (vllm-gaudi):
    going on would let the request compute on KV that is not in its blocks."""


class LoadAccounting:
    def __init__(self, handle, counters, hooks):
        self._handle = handle
        self._counters = counters
        self._hooks = hooks
        self._errors: set[int] = set()

    def new_step(self) -> None:
        # Load errors belong to the step that made them: the runner reads them after that
        # step's loads or never (vllm-gaudi); a later step must not report them against
        # blocks that may by then belong to other requests.
        self._errors = set()

    def take_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def account(self, loads: list[ReqMeta], loaded_ends: list[int]) -> None:
        """`loaded_ends[i]`: the end of the prefix of request i now valid in the paged
        cache. Positions vLLM was promised but did not get are reported as load errors
        (their blocks); where the runner never reads them, a short load raises."""
        counters, block_size = self._counters, self._handle.block_size
        short = []
        for r, end in zip(loads, loaded_ends):
            counters.load_requests += 1
            good_to = max(r.load_from, min(int(end), r.load_to))
            counters.loaded_tokens += good_to - r.load_from
            if good_to < r.load_to:
                bad = r.load.slot_mapping[good_to:r.load_to]
                bad = bad[bad >= 0]
                self._errors.update((bad // block_size).unique().tolist())
                counters.load_failed_tokens += r.load_to - good_to
                if not self._handle.runner.reads_load_errors:
                    short.append(f"{r.req_id} got {good_to - r.load_from} of {r.load_to - r.load_from} tokens")
                    continue
                logger.warning(
                    "LMCache: request %s loaded %d of %d tokens; vLLM recomputes the rest",
                    r.req_id, good_to - r.load_from, r.load_to - r.load_from,
                )
            elif self._hooks.corrupting():
                self._hooks.corrupt(self._handle.gpu_connector, r)
        if short:
            raise LoadIncompleteError(
                "LMCache: a KV load came up short on Gaudi (" + "; ".join(short) + "). vllm-gaudi never "
                "reads load errors, so these requests would compute on KV that is not in their blocks: "
                "stopping instead. The lookup held these chunks in host memory, so this means a device "
                "copy failed or the lease outlived lookup_lease_ttl (now "
                f"{self._handle.lease_ttl:g} s); see the log above and docs/gaudi.md."
            )
