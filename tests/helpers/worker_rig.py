"""A real worker half (LMCacheConnectorV1Impl.worker) over real paged caches (vLLM's CPU
layout, or vllm-gaudi's (K, V) tuples on the emulated HPU), driven step by step with
hand-made metadata. Chunk = block = 16 tokens; a prompt of 64 tokens is 4 chunks.
"""

from __future__ import annotations

import contextlib
import uuid
from types import SimpleNamespace

import torch

from lmcache.integration.vllm.metadata import LMCacheConnectorMetadata, ReqMeta
from lmcache.integration.vllm.scheduler.planner import slot_mapping
from lmcache.integration.vllm.utils import ENGINE_NAME
from lmcache.v1.cache_engine import LMCacheEngineBuilder, TransferSpec
from tests.helpers import kv_layouts as kl
from tests.helpers.hpu import emulated_hpu

L, H, D = 2, 2, 64
BLOCK = CHUNK = 16
NUM_BLOCKS = 24
PROMPT = 64  # tokens: 4 blocks, 4 chunks
TOKEN_BYTES = 2 * L * H * D * 2  # K and V, bf16
CHUNK_BYTES = CHUNK * TOKEN_BYTES


def vllm_config(*, cpu_chunks: int = 64, prefix_caching: bool = True, **extra):
    extra = {"lmcache.chunk_size": CHUNK, "lmcache.max_local_cpu_size": cpu_chunks * CHUNK_BYTES / 1024**3,
             **{f"lmcache.{k}": v for k, v in extra.items()}}
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(engine_id=f"rig-{uuid.uuid4()}", kv_connector_extra_config=extra),
        cache_config=SimpleNamespace(block_size=BLOCK, enable_prefix_caching=prefix_caching),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(model="rig/model", use_mla=False,
                                     get_num_kv_heads=lambda parallel: H, get_head_size=lambda: D),
    )


def paged_cache(device: str, seed: int) -> kl.PagedCache:
    gen = torch.Generator().manual_seed(seed)
    if device == "hpu":
        return kl.hpu_kv(L, NUM_BLOCKS, BLOCK, H, D, torch.bfloat16, gen, device="hpu")
    return kl.cpu_attn(L, NUM_BLOCKS, BLOCK, H, D, torch.bfloat16, gen)


@contextlib.contextmanager
def device_context(device: str):
    """The emulated HPU for "hpu" (EMULATION: proves data placement, not Gaudi speed)."""
    if device == "hpu":
        with emulated_hpu(lazy=True) as emu:
            yield emu
    else:
        yield None


def worker(config, **kw):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl

    return LMCacheConnectorV1Impl(config, KVConnectorRole.WORKER, None, **kw)


def close(impl) -> None:
    impl.shutdown()
    LMCacheEngineBuilder.destroy(ENGINE_NAME)


def tokens_of(p: int) -> torch.Tensor:
    return torch.arange(PROMPT, dtype=torch.long) + 100_000 * (p + 1)


def blocks_at(first: int) -> list[int]:
    return list(range(first, first + PROMPT // BLOCK))


def save(req_id: str, p: int, first_block: int, skip: int = 0, end: int = PROMPT) -> ReqMeta:
    """Save prompt p's tokens [skip, end) from the blocks from first_block on."""
    plan = TransferSpec(tokens_of(p)[:end], slot_mapping(blocks_at(first_block), BLOCK, skip, end, end), skip, end)
    return ReqMeta(req_id, save=plan)


def load(req_id: str, p: int, first_block: int, lease_id: str | None = None, hit: int = PROMPT,
         load_from: int = 0) -> ReqMeta:
    """Load prompt p's tokens [load_from, hit) (`hit`: the lookup's answer; before
    load_from vLLM holds the prefix itself) into the blocks from first_block on."""
    skip = load_from // CHUNK * CHUNK
    plan = TransferSpec(tokens_of(p)[:hit], slot_mapping(blocks_at(first_block), BLOCK, load_from, hit, hit), skip, hit,
                        lease_id=lease_id)
    return ReqMeta(req_id, load=plan, load_from=load_from, load_to=hit)


def run_step(impl, requests=(), released=()) -> None:
    """One vllm-gaudi-style step: bind, start_load_kv, wait_for_save."""
    impl.bind_connector_metadata(LMCacheConnectorMetadata(list(requests), released_lease_ids=set(released)))
    impl.start_load_kv(None)
    impl.wait_for_save()


def block_bytes(cache: kl.PagedCache, blocks: list[int]) -> list[torch.Tensor]:
    """Every byte of those blocks, per buffer (both layouts put the block first)."""
    return [kl.raw(b[blocks].to("cpu")).clone() for b in cache.buffers]


def same_blocks(cache: kl.PagedCache, a: list[int], b: list[int]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(block_bytes(cache, a), block_bytes(cache, b)))
