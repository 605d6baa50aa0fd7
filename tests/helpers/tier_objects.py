"""Memory objects and keys for the tier tests: every dtype, KV and MLA layouts."""

import torch

from lmcache.v1.memory import MemoryFormat
from lmcache.v1.token_database import CacheEngineKey
from tests.helpers.host_connector import bits, random_fill

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)
CASES = [(d, mla) for d in DTYPES for mla in (False, True)]
IDS = [f"{str(d).removeprefix('torch.')}-{'mla' if mla else 'kv'}" for d, mla in CASES]
MB = 1024**2


def key(i: int, model="org/m") -> CacheEngineKey:
    return CacheEngineKey(model, 1, 0, f"{i:032x}", "x", "kv.L3.H4.D16")


def make_obj(pool, dtype, mla, tokens=16, seed=0):
    fmt = MemoryFormat.KV_MLA_FMT if mla else MemoryFormat.KV_2LTD
    shape = (1, 3, tokens, 64) if mla else (2, 3, tokens, 64)
    obj = pool.allocate(shape, dtype, fmt)
    random_fill(obj.tensor, seed)
    return obj


def same(a, b) -> bool:
    return a.metadata == b.metadata and torch.equal(bits(a.tensor), bits(b.tensor))
