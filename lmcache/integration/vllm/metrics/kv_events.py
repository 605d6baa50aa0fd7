"""vLLM KV cache events for what LMCache holds, so a KV-aware router sees prefixes
that live in LMCache after vLLM dropped them from the device.

The tiers know chunks by LMCache's key (a hash chain over token ids, one key per
`chunk_size` tokens); a router knows vLLM's block hashes. So when the scheduler plans
a save it notes, per chunk, the vLLM block hashes, parent hash and token ids the
request carries (`Request.block_hashes`: vLLM's own hashes, made with its configured
`--prefix-caching-hash-algo`). When a worker's tier reports that it stored or lost
that chunk (metrics/worker.py, collected by the scheduler), the note becomes a
`BlockStored` or `BlockRemoved`, published by vLLM with its own events
(`take_events`). Everything happens in the scheduler process, on every device. With
the host tier in an `lmcache server`, the server's tiers are the ones that report
(lmcache/v1/mp/server_events.py), under the same tier names.

A vLLM block belongs to the chunk holding its last token: once that chunk (and the
prefix before it) is stored, the whole block is. With tensor parallelism every rank
stores its own shard: a chunk is announced when every rank holds it and removed
when the first rank loses it, so a router never sees one chunk twice.

Media as vLLM names them: the CPU tier is "CPU"; the disk and remote tiers are
"STORAGE" (vLLM 0.26: "FS" and "OBJ"), with locality "LOCAL" and "REMOTE". A block of a LoRA, media or salted
request carries what vLLM's own events carry: `lora_name` (and `lora_id`) and its
per-block `extra_keys` (request_keys.py; `extra_keys` only where vLLM's BlockStored
has the field).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from lmcache.integration.vllm.request_keys import Uncacheable, kv_event_extra_keys_supported, request_keys
from lmcache.integration.vllm.vllm_compat import MEDIA
from lmcache.v1.token_database import chunk_hashes

logger = logging.getLogger(__name__)

TIER_MEDIA = MEDIA  # (medium, locality) per tier, in this vLLM's names (vllm_compat)
MAX_TRACKED_CHUNKS = 65536


@dataclass(slots=True)
class _Chunk:
    block_hashes: list
    parent: object
    token_ids: list[int]
    lora_name: str | None = None
    lora_id: int | None = None
    extra_keys: list | None = None  # per block, vLLM's event format; None: none in any block
    holders: dict[str, set[int]] = field(default_factory=dict)  # tier -> ranks holding it
    announced: set[str] = field(default_factory=set)  # tiers a BlockStored went out for


def kv_events_enabled(vllm_config) -> bool:
    """vLLM publishes KV cache events (--kv-events-config with enable_kv_cache_events)."""
    config = getattr(vllm_config, "kv_events_config", None)
    return bool(getattr(config, "enable_kv_cache_events", False))


class KVEventTracker:
    def __init__(self, chunk_size: int, block_size: int, world_size: int, max_chunks: int = MAX_TRACKED_CHUNKS):
        self.chunk_size = int(chunk_size)
        self.block_size = int(block_size)
        self.world_size = int(world_size)
        self.max_chunks = int(max_chunks)
        self._chunks: OrderedDict[str, _Chunk] = OrderedDict()
        self._events: list = []
        self._with_extra_keys = kv_event_extra_keys_supported()

    # -- scheduler: what a save will store -----------------------------------------
    def record_save(self, request, plan) -> None:
        """Note the vLLM blocks of every chunk `plan` (the save's TransferSpec) may store."""
        block_hashes = getattr(request, "block_hashes", None) or []
        if not block_hashes or plan.num_tokens <= plan.skip_tokens:
            return
        tokens = plan.tokens
        # the chunk hashes the workers' tier events name (with the plan's key material)
        hashes = chunk_hashes(tokens, self.chunk_size, plan.num_tokens, plan.key_material)
        try:
            keys = request_keys(request)
        except Uncacheable:
            return
        lora = getattr(request, "lora_request", None)
        lora_id = getattr(lora, "adapter_id", getattr(lora, "lora_int_id", None)) if lora is not None else None
        C, B = self.chunk_size, self.block_size
        for i, chunk_hash in enumerate(hashes):
            start, end = i * C, min((i + 1) * C, plan.num_tokens)
            if end <= plan.skip_tokens:
                continue
            if chunk_hash in self._chunks:
                self._chunks.move_to_end(chunk_hash)
                continue
            first, stop = (start + B) // B - 1, min(end // B, len(block_hashes))
            if stop <= first:
                continue  # no vLLM block ends in this chunk
            extra = [keys.event_extra_keys(b * B, (b + 1) * B) for b in range(first, stop)]
            self._chunks[chunk_hash] = _Chunk(
                lora_name=keys.lora_name, lora_id=lora_id,
                extra_keys=extra if any(k is not None for k in extra) else None,
                block_hashes=[maybe_convert_block_hash(h) for h in block_hashes[first:stop]],
                parent=maybe_convert_block_hash(block_hashes[first - 1]) if first > 0 else None,
                token_ids=[int(t) for t in tokens[first * B:stop * B].tolist()] if hasattr(tokens, "tolist")
                else [int(t) for t in tokens[first * B:stop * B]],
            )
        while len(self._chunks) > self.max_chunks:
            self._chunks.popitem(last=False)

    # -- workers: what the tiers did ------------------------------------------------
    def on_worker_events(self, events) -> None:
        """[tier, stored, chunk_hash or None, rank] items from the workers."""
        for tier, stored, chunk_hash, rank in events:
            if tier not in TIER_MEDIA:
                continue
            if chunk_hash is None:
                if not stored:
                    self._tier_lost(tier, rank)
                continue
            chunk = self._chunks.get(chunk_hash)
            if chunk is None:
                continue  # not stored through this scheduler (an earlier run, another instance)
            holders = chunk.holders.setdefault(tier, set())
            if stored:
                holders.add(rank)
                if len(holders) >= self.world_size and tier not in chunk.announced:
                    chunk.announced.add(tier)
                    self._events.append(self._stored(chunk, tier))
            else:
                holders.discard(rank)
                self._removed(chunk, tier)

    def _tier_lost(self, tier: str, rank: int) -> None:
        for chunk in self._chunks.values():
            holders = chunk.holders.get(tier)
            if holders:
                holders.discard(rank)
            self._removed(chunk, tier)

    def _removed(self, chunk: _Chunk, tier: str) -> None:
        if tier in chunk.announced:
            chunk.announced.discard(tier)
            medium, locality = TIER_MEDIA[tier]
            self._events.append(BlockRemoved(block_hashes=list(chunk.block_hashes), medium=medium,
                                             group_idx=0, locality=locality))

    def _stored(self, chunk: _Chunk, tier: str) -> BlockStored:
        medium, locality = TIER_MEDIA[tier]
        extra = {"extra_keys": list(chunk.extra_keys)} if chunk.extra_keys and self._with_extra_keys else {}
        return BlockStored(
            block_hashes=list(chunk.block_hashes), parent_block_hash=chunk.parent, token_ids=list(chunk.token_ids),
            block_size=self.block_size, lora_id=chunk.lora_id, medium=medium, lora_name=chunk.lora_name, group_idx=0,
            locality=locality, **extra,
        )

    def take(self) -> list:
        events, self._events = self._events, []
        return events
