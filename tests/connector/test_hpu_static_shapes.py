"""Static shapes on the emulated Gaudi: slot lists padded to bucket sizes (gpu_connector/hpu/).

EMULATION: the emulation records every distinct (op, shapes, dtype, other arguments) run
on hpu tensors as a stand-in for Gaudi graph compiles; it proves the shapes the code
runs, not Gaudi speed.
"""

import pytest
import torch

from lmcache.testing.vllm_gaudi import gaudi_kv_caches, random_steps
from lmcache.v1.gpu_connector import create_gpu_connector
from lmcache.v1.gpu_connector.hpu import HpuTransfers, SlotBuckets, static_transfers
from lmcache.v1.gpu_connector.staged import StagedTransfers
from lmcache.v1.memory import MemoryObj
from tests.helpers.kv_layouts import raw
from tests.helpers.hpu import emulated_hpu

L, BLOCKS, N, H, D = 2, 48, 128, 2, 16


def _objects(conn, starts, ends, fill=0.0):
    return [MemoryObj(torch.full(tuple(conn.get_shape(e - s)), fill).to(conn.kv_dtype), conn.memory_format)
            for s, e in zip(starts, ends)]


def _run_steps(emu, buckets, steps=200, lazy=True):
    """`steps` random request mixes, each stored then loaded; the shapes each op ran with."""
    emu.set_lazy(lazy)
    caches = gaudi_kv_caches(L, BLOCKS, N, H, D, torch.bfloat16)
    conn = create_gpu_connector(caches.kv_caches, use_mla=False, slot_buckets=buckets)
    emu.reset_counters()
    totals = set()
    for slots, starts, ends in random_steps(steps, BLOCKS, N, torch.Generator().manual_seed(7), max_requests=5, max_tokens=700):
        objs = _objects(conn, starts, ends)
        conn.batched_from_gpu(objs, starts, ends, slot_mapping=slots)
        conn.batched_to_gpu(objs, starts, ends, slot_mapping=slots)
        totals.add(int((slots >= 0).sum()))
    return conn, emu.counters.shapes_per_call(), totals


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_compiles_bounded_by_buckets_over_200_steps(hpu_emu, lazy):
    conn, per_call, totals = _run_steps(hpu_emu, "auto", lazy=lazy)
    # the bound, worked out here: powers of two from 256 that cover the batches
    buckets = sorted({max(256, 1 << (t - 1).bit_length()) for t in totals if t})
    assert len(totals) > 50, "the steps must vary"
    assert conn.transfers.sizes_made == buckets
    worst = max(per_call.values())
    assert worst <= len(buckets), {k: v for k, v in per_call.items() if v > len(buckets)}


def test_signature_check_catches_an_unbucketed_path(hpu_emu):
    """The same run without padding ("off": the CUDA-style path) compiles per batch size: the
    bound above fails for it."""
    _, per_call, totals = _run_steps(hpu_emu, "off", steps=60)
    buckets = len({max(256, 1 << (t - 1).bit_length()) for t in totals if t})
    assert len(totals) > 30 and max(per_call.values()) >= len(totals) - 1 > 5 * buckets


def _known(caches, gen):
    """Overwrite every flat buffer with fresh known random bytes; return copies."""
    out = []
    for buf in caches.buffers:
        target = raw(buf).view(torch.uint8)
        target.copy_(torch.randint(0, 0x7E, tuple(target.shape), generator=gen, dtype=torch.uint8))
        out.append(raw(buf).to("cpu").clone())
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
@pytest.mark.parametrize("pad_block_dropped", [True, False], ids=["pad-dropped", "pad-kept"])
def test_padded_roundtrips_are_bit_exact(hpu_emu, dtype, pad_block_dropped):
    """Random steps: every valid token's bytes go source cache -> objects -> target cache; every
    other byte of the target (other blocks, the pad block) stays as it was."""
    gen = torch.Generator().manual_seed(5)
    src = gaudi_kv_caches(L, BLOCKS, N, H, D, dtype, pad_block_dropped=pad_block_dropped, gen=gen)
    dst = gaudi_kv_caches(L, BLOCKS, N, H, D, dtype, pad_block_dropped=pad_block_dropped, gen=gen)
    saver = create_gpu_connector(src.kv_caches, attn_backend="CUSTOM", use_mla=False)
    loader = create_gpu_connector(dst.kv_caches, attn_backend="CUSTOM", use_mla=False)
    assert saver.kv_dtype == dtype and isinstance(saver.transfers, HpuTransfers)
    for slots, starts, ends in random_steps(6, BLOCKS, N, gen, max_tokens=900):
        source, target = _known(src, gen), _known(dst, gen)
        objs = _objects(saver, starts, ends)
        saver.batched_from_gpu(objs, starts, ends, slot_mapping=slots)
        loader.batched_to_gpu(objs, starts, ends, slot_mapping=slots)
        valid = slots[slots >= 0]
        for got, before, want in zip((raw(b).to("cpu") for b in dst.buffers), target, source):
            expected = before.clone()
            expected[valid] = want[valid]
            assert torch.equal(got, expected)


def _neighbours(hpu_emu):
    """Request A (200 tokens: padded to a 256 bucket) and request B in the blocks around A's."""
    gen = torch.Generator().manual_seed(11)
    caches = gaudi_kv_caches(L, 8, N, H, D, torch.bfloat16, gen=gen)
    conn = create_gpu_connector(caches.kv_caches, use_mla=False)
    a_slots = torch.cat([torch.arange(3 * N, 4 * N), torch.arange(1 * N, 1 * N + 72)])  # 200 tokens
    b_slots = torch.cat([torch.arange(1 * N + 72, 2 * N), torch.arange(5 * N, 6 * N)])  # shares A's last block
    objs = _objects(conn, [0], [200], fill=3.0)
    return caches, conn, a_slots, b_slots, objs


def test_padded_scatter_leaves_a_neighbours_blocks_untouched(hpu_emu):
    caches, conn, a_slots, b_slots, objs = _neighbours(hpu_emu)
    before = [raw(b).to("cpu").clone() for b in caches.buffers]
    conn.batched_to_gpu(objs, [0], [200], slot_mapping=a_slots)
    assert conn.transfers.sizes_made == [256]
    for got, old in zip((raw(b).to("cpu") for b in caches.buffers), before):
        assert torch.equal(got[b_slots], old[b_slots]), "request B's KV changed"
        untouched = torch.ones(got.shape[0], dtype=torch.bool)
        untouched[a_slots] = False
        assert torch.equal(got[untouched], old[untouched])
        assert torch.all(got[a_slots].view(torch.bfloat16) == 3.0)


def test_neighbour_check_catches_a_wrong_pad(hpu_emu, monkeypatch):
    """Padding with another request's row (here B's first slot) would overwrite B: the check sees it."""
    caches, conn, a_slots, b_slots, objs = _neighbours(hpu_emu)

    def wrong_pad(rows, total):
        rows[total:] = int(b_slots[0])

    monkeypatch.setattr(static_transfers, "pad_rows", wrong_pad)
    before = [raw(b).to("cpu").clone() for b in caches.buffers]
    conn.batched_to_gpu(objs, [0], [200], slot_mapping=a_slots)
    changed = [not torch.equal(raw(b).to("cpu")[b_slots], old[b_slots]) for b, old in zip(caches.buffers, before)]
    assert any(changed)


def test_staging_is_made_once_per_bucket(hpu_emu):
    caches = gaudi_kv_caches(L, BLOCKS, N, H, D, torch.bfloat16)
    conn = create_gpu_connector(caches.kv_caches, use_mla=False, slot_buckets=[256, 1024, 4096])
    made = []
    original = conn.transfers._make_bucket
    conn.transfers._make_bucket = lambda size: made.append(size) or original(size)
    for slots, starts, ends in random_steps(30, BLOCKS, N, torch.Generator().manual_seed(2), max_tokens=700):
        objs = _objects(conn, starts, ends)
        conn.batched_from_gpu(objs, starts, ends, slot_mapping=slots)
    assert sorted(made) == conn.transfers.sizes_made and len(made) == len(set(made)) <= 3


def test_slot_buckets_setting():
    assert SlotBuckets().size_for(1) == 256 and SlotBuckets().size_for(257) == 512
    explicit = SlotBuckets((256, 1024))
    assert [explicit.size_for(n) for n in (5, 300, 1024, 1025, 3000)] == [256, 1024, 1024, 2048, 4096]
    with emulated_hpu():
        caches = gaudi_kv_caches(1, 4, N, H, D, torch.bfloat16)
        assert isinstance(create_gpu_connector(caches.kv_caches, use_mla=False, slot_buckets="off").transfers,
                          StagedTransfers)
        with pytest.raises(ValueError, match="hpu_slot_buckets"):
            create_gpu_connector(caches.kv_caches, use_mla=False, slot_buckets="1024,256")


def test_config_key_hpu_slot_buckets():
    from lmcache.v1.config import ConfigError, LMCacheEngineConfig, load_config

    assert LMCacheEngineConfig().hpu_slot_buckets == "auto"
    assert load_config(environ={"LMCACHE_HPU_SLOT_BUCKETS": "256, 1024"}).hpu_slot_buckets == (256, 1024)
    assert load_config(extra_config={"lmcache.hpu_slot_buckets": [512, 4096]}).hpu_slot_buckets == (512, 4096)
    assert load_config(environ={"LMCACHE_HPU_SLOT_BUCKETS": "off"}).hpu_slot_buckets == "off"
    for bad in ("4096,256", "many", "-256", "256,256", "1.5"):
        with pytest.raises(ConfigError, match="hpu_slot_buckets"):
            load_config(environ={"LMCACHE_HPU_SLOT_BUCKETS": bad})
