"""The layouts vllm-gaudi really registers, on the emulated Gaudi (lmcache.testing.vllm_gaudi).

EMULATION: proves layout decisions and bytes moved, not Gaudi speed.
"""

import pickle

import pytest
import torch

from lmcache.testing.vllm_gaudi import TensorTuple, gaudi_kv_caches
from lmcache.v1.gpu_connector import LayoutError, create_gpu_connector
from lmcache.v1.gpu_connector.layouts import LayoutKind
from lmcache.v1.memory import MemoryFormat, MemoryObj
from tests.helpers.kv_layouts import raw

N = 128


def test_tensor_tuple_double_reports_the_pair_first(hpu_emu):
    caches = gaudi_kv_caches(2, 5, N, 4, 32, torch.bfloat16)
    pair = caches.kv_caches["model.layers.0.self_attn.attn"]
    assert isinstance(pair, TensorTuple) and pair.shape == (2, 5, N, 4, 32)
    assert pair.device.type == "hpu" and pair.dtype == torch.bfloat16
    conn = create_gpu_connector(caches.kv_caches, attn_backend="CUSTOM", use_mla=False)
    assert conn.layout.kind is LayoutKind.HPU_KV and conn.layout.num_blocks == 5
    assert conn.layout_fingerprint == "hpu_kv_L2_2xBx128x4x32_bfloat16"


@pytest.mark.parametrize("pad_block_dropped", [True, False], ids=["v0.19+", "v0.17.1"])
def test_pad_block_dropped_or_kept(hpu_emu, pad_block_dropped):
    caches = gaudi_kv_caches(1, 4, N, 2, 16, torch.bfloat16, pad_block_dropped=pad_block_dropped)
    conn = create_gpu_connector(caches.kv_caches, attn_backend="CUSTOM", use_mla=False)
    assert conn.layout.num_blocks == (4 if pad_block_dropped else 5)
    # same keys either way: num_blocks is not in the fingerprint
    assert conn.layout_fingerprint == "hpu_kv_L1_2xBx128x2x16_bfloat16"


@pytest.mark.parametrize("use_mla", [True, None], ids=["use_mla", "unknown"])
def test_mla_3d_roundtrip(hpu_emu, use_mla):
    gen = torch.Generator().manual_seed(3)
    src = gaudi_kv_caches(2, 6, N, 1, 576, torch.bfloat16, kind="mla", gen=gen)
    dst = gaudi_kv_caches(2, 6, N, 1, 576, torch.bfloat16, kind="mla", gen=gen)
    saver = create_gpu_connector(src.kv_caches, attn_backend="CUSTOM", use_mla=use_mla)
    loader = create_gpu_connector(dst.kv_caches, attn_backend="CUSTOM", use_mla=use_mla)
    assert saver.layout.kind is LayoutKind.HPU_MLA and saver.memory_format is MemoryFormat.KV_MLA_FMT
    slots = torch.cat([torch.arange(2 * N, 3 * N), torch.arange(5 * N, 5 * N + 40)])
    obj = MemoryObj(torch.zeros(tuple(saver.get_shape(slots.numel())), dtype=torch.bfloat16), saver.memory_format)
    saver.batched_from_gpu([obj], [0], [slots.numel()], slot_mapping=slots)
    before = [raw(b).to("cpu") for b in dst.buffers]
    loader.batched_to_gpu([obj], [0], [slots.numel()], slot_mapping=slots)
    for got, old, want in zip((raw(b).to("cpu") for b in dst.buffers), before, (raw(b).to("cpu") for b in src.buffers)):
        expected = old.clone()
        expected[slots] = want[slots]
        assert torch.equal(got, expected)


@pytest.mark.parametrize("heads", [1, 8])
@pytest.mark.parametrize("use_mla", [False, None], ids=["not-mla", "unknown"])
def test_k_only_fp8_dynamic_scales_are_refused(hpu_emu, heads, use_mla):
    """vllm-gaudi with dynamic fp8 KV scales registers only K. With one KV head per rank (a 70B
    model at TP=8) that looks like 4-D MLA: it must be refused, naming the setting, not moved
    without V."""
    caches = gaudi_kv_caches(2, 4, N, heads, 128, torch.float8_e4m3fn, kind="fp8_dynamic")
    with pytest.raises(LayoutError, match="VLLM_DYNAMIC_KV_QUANT") as err:
        create_gpu_connector(caches.kv_caches, attn_backend="CUSTOM", use_mla=use_mla)
    assert "QUANT_CONFIG" in str(err.value)


def test_k_only_one_head_would_pass_as_mla_if_the_model_said_so(hpu_emu):
    """The same tensor IS addressable as MLA: only use_mla tells the two apart (the refusal
    above is the decision, not a shape failure)."""
    caches = gaudi_kv_caches(2, 4, N, 1, 128, torch.float8_e4m3fn, kind="fp8_dynamic")
    conn = create_gpu_connector(caches.kv_caches, attn_backend="CUSTOM", use_mla=True)
    assert conn.layout.kind is LayoutKind.HPU_MLA


def test_use_mla_with_pairs_is_refused(hpu_emu):
    caches = gaudi_kv_caches(1, 4, N, 2, 16, torch.bfloat16)
    with pytest.raises(LayoutError, match="use_mla"):
        create_gpu_connector(caches.kv_caches, attn_backend="CUSTOM", use_mla=True)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_moves_as_bytes_on_hpu(hpu_emu, dtype):
    """Static fp8 scales: (K, V) pairs of fp8. The device ops see uint8 (the bridge's index kernels
    need not know fp8) and every byte arrives."""
    gen = torch.Generator().manual_seed(9)
    src = gaudi_kv_caches(2, 4, N, 2, 16, dtype, gen=gen)
    dst = gaudi_kv_caches(2, 4, N, 2, 16, dtype, gen=gen)
    saver = create_gpu_connector(src.kv_caches, attn_backend="CUSTOM", use_mla=False)
    loader = create_gpu_connector(dst.kv_caches, attn_backend="CUSTOM", use_mla=False)
    slots = torch.cat([torch.arange(3 * N, 4 * N), torch.arange(0, 77)])
    obj = MemoryObj(torch.zeros(tuple(saver.get_shape(slots.numel()))).to(dtype), saver.memory_format)
    hpu_emu.reset_counters()
    saver.batched_from_gpu([obj], [0], [slots.numel()], slot_mapping=slots)
    loader.batched_to_gpu([obj], [0], [slots.numel()], slot_mapping=slots)
    moved = [sig for sig in hpu_emu.counters.signatures if sig[0] in ("index_select", "index_copy_")]
    assert {sig[0] for sig in moved} == {"index_select", "index_copy_"}
    assert all(torch.uint8 in _dtypes(sig) and dtype not in _dtypes(sig) for sig in moved)
    for got, want in zip(dst.buffers, src.buffers):
        assert torch.equal(raw(got).to("cpu")[slots], raw(want).to("cpu")[slots])


def _dtypes(value):
    if isinstance(value, torch.dtype):
        return {value}
    if isinstance(value, tuple):
        return set().union(*(_dtypes(v) for v in value)) if value else set()
    return set()


def test_connector_metadata_contract_vllm_gaudi_reads():
    """vllm-gaudi, every step: isinstance(meta, lmcache.integration.vllm.vllm_v1_adapter.
    LMCacheConnectorMetadata) (that module path and class name), then iterates meta.requests and
    compares each element with request-id strings (`request == req_id`); a match would index a dict
    it leaves empty for LMCache (KeyError), so no element may equal a string."""
    from lmcache.integration.vllm import vllm_v1_adapter
    from lmcache.integration.vllm.metadata import ReqMeta

    cls = vllm_v1_adapter.LMCacheConnectorMetadata
    assert cls.__name__ == "LMCacheConnectorMetadata"
    meta = pickle.loads(pickle.dumps(cls(requests=[ReqMeta(req_id="req-1"), ReqMeta(req_id="req-2")])))
    assert isinstance(meta, cls) and isinstance(meta.requests, list) and len(meta.requests) == 2
    assert not any(request == rid for request in meta.requests for rid in ("req-1", "req-2"))
    assert cls().requests == []
