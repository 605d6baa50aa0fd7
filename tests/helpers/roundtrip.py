"""The round-trip check shared by the CPU, emulated-HPU and CUDA tests.

1. Known K/V go into a cache (filled with other random bytes) through the
   layout's reference writer, at the slots of a slot mapping.
2. The connector stores the batch into memory objects; each valid token's
   K/V must be exactly the known values at its position ([P, L, T, H*D]).
3. The connector loads the objects into a second cache (different random
   bytes); every byte of it must equal that cache with the known K/V written
   by the reference writer: used slots carry the values, every other slot
   (padding, unused blocks, other positions) is untouched.
"""

from __future__ import annotations

from typing import Callable

import torch

from lmcache.v1.gpu_connector import create_gpu_connector
from lmcache.v1.memory import MemoryObj
from tests.helpers.kv_layouts import PagedCache, chunk_bounds, raw, slot_mapping


class Mismatch(AssertionError):
    pass


def known_values(cache: PagedCache, num_tokens: int, gen: torch.Generator, device) -> list[torch.Tensor]:
    """Per layer [planes, T, heads, head_size] in the writer's input dtype."""
    shape = (cache.planes, num_tokens, cache.heads, cache.head_size)
    out = []
    for _ in range(len(cache.kv_caches)):
        values = torch.randn(*shape, generator=gen, dtype=torch.float32)
        out.append(values.to(cache.input_dtype).to(device))
    return out


def check_objects(cache: PagedCache, objs, starts, ends, slots, values) -> None:
    """Every valid token of every object holds exactly its known K/V."""
    num_tokens = len(slots)
    # [planes, layers, tokens, hidden], as the objects hold them
    want_all = torch.stack([v.to("cpu") for v in values], dim=1).reshape(cache.planes, len(values), num_tokens, -1)
    for i, (obj, start, end) in enumerate(zip(objs, starts, ends)):
        positions = (slots[start:end] >= 0).nonzero().squeeze(1)
        got = raw(obj.tensor[:, :, positions])
        want = raw(want_all[:, :, start + positions])
        if not torch.equal(got, want):
            plane, layer, j = (got != want).nonzero()[0, :3].tolist()
            raise Mismatch(f"object {i} token {int(positions[j])} (slot {int(slots[start + positions[j]])}) "
                           f"layer {layer} plane {plane} differs")


def check_caches(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for index, (g, w) in enumerate(zip(got, want)):
        if not torch.equal(g, w):
            differing = int((g != w).sum())
            raise Mismatch(f"buffer {index}: {differing} elements differ from the reference")


def plain_objects(connector, objs) -> list:
    """The objects as plain per-token K/V: native blocks (native_blocks.py) decoded, others as they are."""
    native = getattr(connector.transfers, "native", None)  # CpuTransfers only
    if native is None:
        return objs
    plain = []
    for obj in objs:
        tensor = raw(obj.tensor).clone()
        for j in range(tensor.shape[2] // native.block_size):
            rows = slice(j * native.block_size, (j + 1) * native.block_size)
            for layer in range(tensor.shape[1]):
                tensor[:, layer, rows] = native.to_plain(raw(obj.tensor)[:, layer, rows])
        plain.append(MemoryObj(tensor.view(obj.tensor.dtype), obj.fmt))
    return plain


def roundtrip(make: Callable[[int], PagedCache], pattern: str, num_tokens: int, chunk: int, device,
              seed: int = 0, check_object_values: bool = True, corrupt: str | None = None,
              native_blocks: bool = False) -> None:
    """Run the check; `corrupt` ("object" or "cache") damages one value to prove the check fails.
    native_blocks: the connectors keep whole cpu_attn blocks in vLLM's byte order (decoded for the check)."""
    gen = torch.Generator().manual_seed(seed)
    source = make(1)
    slots = slot_mapping(pattern, source.num_blocks, source.block_size, num_tokens, gen)
    values = known_values(source, num_tokens, gen, device)
    valid = (slots >= 0).nonzero().squeeze(1)
    for layer, per_layer in enumerate(values):
        source.write(layer, slots[valid], per_layer[:, valid.to(per_layer.device)])

    connector = create_gpu_connector(source.kv_caches, attn_backend=source.backend, use_mla=source.use_mla,
                                     native_blocks=native_blocks)
    assert (connector.host_format_tag != "") == native_blocks
    starts, ends = chunk_bounds(num_tokens, chunk)
    objs = [MemoryObj(torch.zeros(tuple(connector.get_shape(e - s)), dtype=connector.kv_dtype), connector.memory_format)
            for s, e in zip(starts, ends)]
    connector.batched_from_gpu(objs, starts, ends, slot_mapping=slots)
    if corrupt == "object":
        first_valid = int(valid[0])
        obj_index = next(i for i, (s, e) in enumerate(zip(starts, ends)) if s <= first_valid < e)
        target = raw(objs[obj_index].tensor)[0, 0, first_valid - starts[obj_index]]
        target[0] ^= 1
    if check_object_values:
        check_objects(source, plain_objects(connector, objs), starts, ends, slots, values)

    target_cache = make(2)
    reference = make(2)
    for layer, per_layer in enumerate(values):
        reference.write(layer, slots[valid], per_layer[:, valid.to(per_layer.device)])
    loader = create_gpu_connector(target_cache.kv_caches, attn_backend=target_cache.backend,
                                  use_mla=target_cache.use_mla, native_blocks=native_blocks)
    assert loader.layout_fingerprint == connector.layout_fingerprint
    assert loader.host_format_tag == connector.host_format_tag
    loader.batched_to_gpu(objs, starts, ends, slot_mapping=slots)
    got = target_cache.snapshot()
    if corrupt == "cache":
        got[0].view(-1)[0] ^= 1
    check_caches(got, reference.snapshot())
