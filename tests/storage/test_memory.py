"""The host memory pool: byte budget, clean 'cannot allocate', reuse of freed buffers."""

import torch

from lmcache.v1.memory import HostMemoryPool, MemoryFormat

KV = MemoryFormat.KV_2LTD


def test_budget_and_cannot_allocate():
    pool = HostMemoryPool(4096, pin=False)
    a = pool.allocate((2, 2, 16, 16), torch.float16, KV)  # 2048 bytes
    b = pool.allocate((2, 2, 16, 16), torch.float16, KV)
    assert pool.used_bytes == 4096
    assert pool.allocate((2, 1, 1, 1), torch.float16, KV) is None  # a clean "no", not an exception
    a.free()
    a.free()  # idempotent
    assert pool.used_bytes == 2048
    assert pool.allocate((2, 2, 16, 16), torch.float16, KV) is not None
    b.free()


def test_freed_buffers_are_reused_and_count_against_the_budget():
    pool = HostMemoryPool(8192, pin=False)
    a = pool.allocate((2, 2, 16, 16), torch.float16, KV)
    ptr = a.tensor.data_ptr()
    a.free()
    assert pool.used_bytes == 0 and pool.idle_bytes == 2048
    b = pool.allocate((2, 2, 32, 8), torch.bfloat16, KV)  # same byte size, other shape/dtype
    assert b.tensor.data_ptr() == ptr and b.tensor.shape == (2, 2, 32, 8) and b.tensor.dtype == torch.bfloat16
    assert pool.idle_bytes == 0
    b.free()
    c = pool.allocate((2, 2, 64, 16), torch.float16, KV)  # 8192 bytes: the idle buffer must go
    assert c is not None and pool.used_bytes + pool.idle_bytes <= pool.budget_bytes
    c.free()
    pool.clear_idle()
    assert pool.idle_bytes == 0


def test_mla_and_fp8_objects():
    pool = HostMemoryPool(1 << 20)
    obj = pool.allocate((1, 4, 16, 64), torch.float8_e4m3fn, MemoryFormat.KV_MLA_FMT)
    assert obj.num_tokens == 16 and obj.nbytes == 4 * 16 * 64 and obj.fmt is MemoryFormat.KV_MLA_FMT
    obj.free()
