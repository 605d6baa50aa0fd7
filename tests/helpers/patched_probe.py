"""Runs upstream LMCache 0.4.2 with our patch applied, in its own process.

    python patched_probe.py --tree PATCHED_TREE [--ours REPO] [--emulate]

Both packages are named `lmcache`, so the patched tree is imported here, never in
the pytest process. With --emulate, our HPU emulation (lmcache.testing, from
--ours) is imported first; its modules are then set aside and put back in
sys.modules only while it is switched on or off, so that the name `lmcache` means
the patched tree everywhere else. The emulation backs `hpu` tensors with CPU
memory: it proves placement and sync counts, not Gaudi speed.

Prints one JSON object as the last line; each section either holds its results
or an "error" with the traceback, so one broken part does not hide the others.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import traceback
from typing import Callable

# 0.4.2 reports usage to a server unless told not to.
os.environ["LMCACHE_TRACK_USAGE"] = "false"

NUM_LAYERS, NUM_HEADS, HEAD_SIZE = 3, 2, 8
BLOCK_SIZE, NUM_BLOCKS, CHUNK_SIZE = 4, 32, 8
WORKER_PATH = (
    "lmcache.utils",
    "lmcache.v1.gpu_connector",
    "lmcache.v1.gpu_connector.hpu_connector",
    "lmcache.v1.cache_engine",
    "lmcache.integration.vllm.vllm_v1_adapter",
)


_WORKER = os.path.join(os.path.dirname(__file__), "..", "..", "patches", "hpu_transfer_worker.py")
_spec = importlib.util.spec_from_file_location("lmcache_hpu_transfer_worker", _WORKER)
_transfer_worker = importlib.util.module_from_spec(_spec)  # it imports no `lmcache` at module level
_spec.loader.exec_module(_transfer_worker)
OurPackage = _transfer_worker.OurPackage  # our lmcache (its HPU emulation), set aside
ShapeRecorder = _transfer_worker.ShapeRecorder


def section(results: dict, name: str, fn: Callable[[], dict]) -> None:
    try:
        results[name] = fn()
    except BaseException:  # noqa: BLE001 - reported, not swallowed
        results[name] = {"error": traceback.format_exc()}


class COpsTripwire:
    """A meta path finder that records every attempt to import lmcache.c_ops."""

    def __init__(self):
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name == "lmcache.c_ops":
            self.attempts.append(name)
        return None


@contextlib.contextmanager
def record_cuda_calls(calls: list[str]):
    """Record uses of torch.cuda's device API (is_available aside). Classes are
    replaced by recording subclasses, so that `torch.cuda.Stream | None` works."""
    import torch

    names = ["synchronize", "current_device", "set_device", "device_count", "Stream",
             "Event", "stream", "current_stream", "get_device_properties", "device"]  # fmt: skip
    saved = {n: getattr(torch.cuda, n) for n in names if hasattr(torch.cuda, n)}

    def recording(name, obj):
        if isinstance(obj, type):
            return type(name, (obj,), {"__new__": lambda cls, *a, **k: (calls.append(name), obj.__new__(cls))[1]})

        def wrapper(*args, **kwargs):
            calls.append(name)
            return obj(*args, **kwargs)

        return wrapper

    for name, obj in saved.items():
        setattr(torch.cuda, name, recording(name, obj))
    try:
        yield
    finally:
        for name, obj in saved.items():
            setattr(torch.cuda, name, obj)


def detection() -> dict:
    import lmcache
    from lmcache.utils import get_device_type, is_cuda_available, is_hpu_available

    return {
        "lmcache_file": lmcache.__file__,
        "device_type": get_device_type(),
        "is_hpu_available": is_hpu_available(),
        "is_cuda_available": is_cuda_available(),
    }


def make_config(**overrides):
    from lmcache.v1.config import LMCacheEngineConfig

    settings = dict(chunk_size=CHUNK_SIZE, local_cpu=True, max_local_cpu_size=0.02,
                    save_unfull_chunk=True)  # fmt: skip
    settings.update(overrides)
    return LMCacheEngineConfig.from_defaults(**settings)


def make_metadata(use_mla: bool = False):
    import torch
    from lmcache.v1.metadata import LMCacheMetadata

    kv_shape = (NUM_LAYERS, 1 if use_mla else 2, CHUNK_SIZE,
                1 if use_mla else NUM_HEADS, HEAD_SIZE)  # fmt: skip
    return LMCacheMetadata(
        model_name="probe-model", world_size=1, local_world_size=1, worker_id=0,
        local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=kv_shape,
        use_mla=use_mla, role="worker", chunk_size=CHUNK_SIZE,
    )  # fmt: skip


def paged_kv(fill: str, use_mla: bool = False):
    """Per layer a (K, V) tuple of hpu tensors [blocks, block_size, heads, head_size]
    (MLA: one [blocks, block_size, head_size] tensor), as vllm-gaudi registers them:
    normal tensors made outside inference mode, which the 0.4.2 engine works in.
    """
    import torch

    shape = (NUM_BLOCKS, BLOCK_SIZE, HEAD_SIZE) if use_mla else (NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_SIZE)
    make = torch.randn if fill == "random" else torch.zeros
    layers = []
    for _ in range(NUM_LAYERS):
        planes = [make(*shape, dtype=torch.bfloat16).to("hpu") for _ in range(1 if use_mla else 2)]
        layers.append(planes[0] if use_mla else tuple(planes))
    return layers


def hpu_slots(num_tokens: int, seed: int):
    """Distinct random slots (block_id * block_size + offset), on the hpu."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:num_tokens].to("hpu")


def rows(emu, kv_layers, slots) -> list:
    """The cache rows at `slots`, per layer and plane, as CPU tensors."""
    import torch

    cpu_slots = emu.to_cpu(slots)
    out = []
    for layer in kv_layers:
        planes = [layer] if isinstance(layer, torch.Tensor) else list(layer)
        for plane in planes:
            flat = emu.to_cpu(plane)
            out.append(flat.reshape(flat.shape[0] * flat.shape[1], -1)[cpu_slots])
    return out


def all_equal(a: list, b: list) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def factory_section(emu) -> dict:
    from lmcache.utils import EngineType
    from lmcache.v1.gpu_connector import CreateGPUConnector

    calls: list[str] = []
    with record_cuda_calls(calls):
        connector = CreateGPUConnector(make_config(), make_metadata(), EngineType.VLLM)
        try:
            CreateGPUConnector(make_config(use_layerwise=True), make_metadata(), EngineType.VLLM)
            layerwise = {"raised": None}
        except Exception as exc:  # noqa: BLE001 - the refusal is what we record
            layerwise = {"raised": type(exc).__name__, "message": str(exc)}
    return {
        "class": type(connector).__name__,
        "module": type(connector).__module__,
        "device": str(connector.device),
        "layerwise": layerwise,
        "cuda_calls": calls,
    }


def engine_round_trip(emu) -> dict:
    """Store through 0.4.2's LMCacheEngine from one paged cache, retrieve into another."""
    import torch
    from lmcache.utils import EngineType, mock_up_broadcast_fn, mock_up_broadcast_object_fn
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.gpu_connector import CreateGPUConnector

    num_tokens = 2 * CHUNK_SIZE + 5  # two full chunks and a partial one
    calls: list[str] = []
    with record_cuda_calls(calls):
        config, metadata = make_config(), make_metadata()
        connector = CreateGPUConnector(config, metadata, EngineType.VLLM)
        engine = LMCacheEngineBuilder.get_or_create(
            "patched-probe", config, metadata, connector,
            mock_up_broadcast_fn, mock_up_broadcast_object_fn,
        )  # fmt: skip
        try:
            engine.post_init()  # what 0.4.2's manager does once vLLM registers its caches
            source, target = paged_kv("random"), paged_kv("zeros")
            slots = hpu_slots(num_tokens, seed=1)
            tokens = torch.arange(1000, 1000 + num_tokens)
            differs_before = not all_equal(rows(emu, source, slots), rows(emu, target, slots))
            emu.reset_counters()
            engine.store(tokens, kvcaches=source, slot_mapping=slots)
            store_counts = {"mark_steps": emu.counters.mark_steps, "synchronizes": emu.counters.synchronizes}
            emu.reset_counters()
            mask = engine.retrieve(tokens, kvcaches=target, slot_mapping=slots)
            retrieve_counts = {"mark_steps": emu.counters.mark_steps, "synchronizes": emu.counters.synchronizes}
            equal_after = all_equal(rows(emu, source, slots), rows(emu, target, slots))
        finally:
            LMCacheEngineBuilder.destroy("patched-probe")
    return {
        "num_tokens": num_tokens,
        "differs_before": differs_before,
        "retrieved_tokens": int(mask.sum()),
        "bit_exact": equal_after,
        "store_counts": store_counts,
        "retrieve_counts": retrieve_counts,
        "cuda_calls": calls,
    }


class OpCounter:
    """Counts aten gathers/scatters (index_select, index_copy_) by dispatch mode."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {"gathers": 0, "scatters": 0}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name == "index_select":
                    counts["gathers"] += 1
                elif name in ("index_copy_", "index_copy"):
                    counts["scatters"] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


def allocate_objects(metadata, lengths, use_mla=False):
    """Memory objects from 0.4.2's own host allocator, one per chunk length."""
    from lmcache.v1.memory_management import MemoryFormat, MixedMemoryAllocator

    allocator = MixedMemoryAllocator(1 << 22)
    fmt = MemoryFormat.KV_MLA_FMT if use_mla else MemoryFormat.KV_2LTD
    objs = [allocator.allocate(metadata.get_shapes(n), metadata.get_dtypes(), fmt=fmt) for n in lengths]
    assert all(o is not None for o in objs)
    return allocator, objs


def batch_discipline(emu, lazy: bool, use_mla: bool = False) -> dict:
    """One batched store and one batched load of three chunks straight through the
    connector, as 0.4.2's engine calls it; counts syncs and gathers/scatters."""
    from lmcache.utils import EngineType
    from lmcache.v1.gpu_connector import CreateGPUConnector

    emu.set_lazy(lazy)
    metadata = make_metadata(use_mla)
    connector = CreateGPUConnector(make_config(), metadata, EngineType.VLLM)
    lengths = [CHUNK_SIZE, CHUNK_SIZE, 3]
    starts = [0, CHUNK_SIZE, 2 * CHUNK_SIZE]
    ends = [s + n for s, n in zip(starts, lengths)]
    num_tokens = ends[-1]
    source, target = paged_kv("random", use_mla), paged_kv("zeros", use_mla)
    slots = hpu_slots(num_tokens, seed=2)
    allocator, objs = allocate_objects(metadata, lengths, use_mla)
    calls: list[str] = []
    result: dict = {"lazy": lazy, "chunks": len(lengths), "layers": NUM_LAYERS}
    with record_cuda_calls(calls):
        counter = OpCounter()
        emu.reset_counters()
        with counter.mode:
            connector.batched_from_gpu(objs, starts, ends, kvcaches=source, slot_mapping=slots, offset=0)
        result["store"] = {"mark_steps": emu.counters.mark_steps, "synchronizes": emu.counters.synchronizes,
                           **counter.counts}  # fmt: skip
        counter = OpCounter()
        emu.reset_counters()
        with counter.mode:
            connector.batched_to_gpu(objs, starts, ends, kvcaches=target, slot_mapping=slots)
        result["load"] = {"mark_steps": emu.counters.mark_steps, "synchronizes": emu.counters.synchronizes,
                          **counter.counts}  # fmt: skip
    result["bit_exact"] = all_equal(rows(emu, source, slots), rows(emu, target, slots))
    result["objects_hold_source"] = all_equal(
        [o.tensor.clone() for o in objs],
        [t for t in _expected_objects(emu, source, slots, starts, ends, use_mla)],
    )
    result["cuda_calls"] = calls
    allocator.close()
    return result


def _expected_objects(emu, kv_layers, slots, starts, ends, use_mla):
    """What each memory object must hold: [planes, layers, tokens, hidden]."""
    import torch

    per = rows(emu, kv_layers, slots)  # (layer, plane) order
    planes = 1 if use_mla else 2
    stacked = torch.stack([torch.stack([per[layer * planes + p] for layer in range(NUM_LAYERS)]) for p in range(planes)])
    return [stacked[:, :, s:e] for s, e in zip(starts, ends)]


def keeps_vllm_cached(emu) -> dict:
    """A load with vllm_cached_tokens leaves the tokens vLLM already holds alone."""
    import torch
    from lmcache.utils import EngineType
    from lmcache.v1.gpu_connector import CreateGPUConnector

    metadata = make_metadata()
    connector = CreateGPUConnector(make_config(), metadata, EngineType.VLLM)
    lengths = [CHUNK_SIZE, CHUNK_SIZE]
    starts, ends = [0, CHUNK_SIZE], [CHUNK_SIZE, 2 * CHUNK_SIZE]
    source, target = paged_kv("random"), paged_kv("zeros")
    slots = hpu_slots(2 * CHUNK_SIZE, seed=3)
    allocator, objs = allocate_objects(metadata, lengths)
    connector.batched_from_gpu(objs, starts, ends, kvcaches=source, slot_mapping=slots)
    cached = CHUNK_SIZE + 3
    connector.batched_to_gpu(objs, starts, ends, kvcaches=target, slot_mapping=slots, vllm_cached_tokens=cached)
    got, want = rows(emu, target, slots), rows(emu, source, slots)
    allocator.close()
    return {
        "cached_prefix_untouched": all(bool((g[:cached] == 0).all()) for g in got),
        "rest_loaded": all(torch.equal(g[cached:], w[cached:]) for g, w in zip(got, want)),
    }


def imports_under_gpu_migration() -> dict:
    tripwire = COpsTripwire()
    sys.meta_path.insert(0, tripwire)
    imported, failed = [], {}
    try:
        for name in WORKER_PATH:
            try:
                importlib.import_module(name)
                imported.append(name)
            except Exception:  # noqa: BLE001 - reported
                failed[name] = traceback.format_exc(limit=-3)
    finally:
        sys.meta_path.remove(tripwire)
    return {"imported": imported, "failed": failed, "c_ops_attempts": tripwire.attempts}


def run_emulated(ours: OurPackage) -> dict:
    results: dict = {}
    emu = ours.emulate(lazy=True, gpu_migration=True)
    try:
        section(results, "imports_migration", imports_under_gpu_migration)
        section(results, "detection_migration", detection)
        section(results, "factory", lambda: factory_section(emu))
        section(results, "engine_round_trip", lambda: engine_round_trip(emu))
        section(results, "batch_lazy", lambda: batch_discipline(emu, lazy=True))
        section(results, "batch_eager", lambda: batch_discipline(emu, lazy=False))
        section(results, "batch_mla", lambda: batch_discipline(emu, lazy=True, use_mla=True))
        section(results, "vllm_cached", lambda: keeps_vllm_cached(emu))
    finally:
        ours.stop(emu)
    detection_after_lazy_migration(ours, results, section)
    return results


def detection_after_lazy_migration(ours: OurPackage, results: dict, section: Callable = section) -> None:
    """Device detection again on an eager HPU without GPU migration, then with no HPU at all."""
    emu = ours.emulate(lazy=False, gpu_migration=False)
    try:
        section(results, "detection_plain_hpu", detection)
    finally:
        ours.stop(emu)
    section(results, "detection_after_emulation", detection)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", required=True, help="the patched lmcache-0.4.2 tree")
    parser.add_argument("--ours", help="this repository's root (for the HPU emulation)")
    parser.add_argument("--emulate", action="store_true")
    args = parser.parse_args()
    ours = OurPackage(args.ours) if args.emulate else None
    sys.path.insert(0, args.tree)
    if ours is not None:
        results = run_emulated(ours)
    else:
        results = {}
        section(results, "detection", detection)
    print(json.dumps(results))
    sys.stdout.flush()
    # 0.4.2's engine leaves non-daemon threads behind; do not wait for them.
    os._exit(0)


if __name__ == "__main__":
    main()
