"""Real vLLM scheduler objects (Request, SchedulerOutput) for the adapter's unit tests."""

from __future__ import annotations

import dataclasses

from vllm import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.request import Request


def make_request(req_id: str, prompt: list[int], *, kv_transfer_params: dict | None = None,
                 cache_salt: str | None = None, max_tokens: int = 16) -> Request:
    extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
    return Request(req_id, list(prompt), SamplingParams(max_tokens=max_tokens, extra_args=extra), None,
                   cache_salt=cache_salt)


def new_req(request: Request, block_ids: list[int], num_computed_tokens: int) -> NewRequestData:
    request.num_computed_tokens = num_computed_tokens
    return NewRequestData.from_request(request, (list(block_ids),))


def step(new=(), cached=(), *, scheduled: dict[str, int], finished=(), resumed=(), preempted=()) -> SchedulerOutput:
    """A SchedulerOutput. `cached` holds (req_id, new_block_ids or None, num_computed_tokens)."""
    cached_data = CachedRequestData(
        req_ids=[c[0] for c in cached],
        resumed_req_ids=set(resumed),
        new_token_ids=[[] for _ in cached],
        all_token_ids={},
        new_block_ids=[None if c[1] is None else (list(c[1]),) for c in cached],
        num_computed_tokens=[c[2] for c in cached],
        num_output_tokens=[0 for _ in cached],
    )
    fields = {f.name for f in dataclasses.fields(SchedulerOutput)}
    older = {"num_common_prefix_blocks": [0]} if "num_common_prefix_blocks" in fields else {}  # vLLM 0.26/0.27
    return SchedulerOutput(
        **older,
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=cached_data,
        num_scheduled_tokens=dict(scheduled),
        total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(finished),
        free_encoder_mm_hashes=[],
        preempted_req_ids=set(preempted),
    )
