"""Runs upstream LMCache 0.5.6 (patched, or as published) under our HPU emulation.

    python probe_056.py --tree TREE --ours REPO [--unpatched]

As patched_probe.py (whose helpers it uses): the tree is imported in this process
only, after our emulation (CPU memory behind `hpu` tensors: it proves placement,
data and sync counts, not Gaudi speed) is switched on with GPU migration. Prints
one JSON object as the last line, one entry per section.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from patched_probe import OurPackage, ShapeRecorder, detection, detection_after_lazy_migration  # noqa: E402
from patched_probe import record_cuda_calls  # noqa: E402
from patched_probe import _transfer_worker  # noqa: E402
from patched_probe import section as _section  # noqa: E402

os.environ["LMCACHE_TRACK_USAGE"] = "false"
HostObj = _transfer_worker._HostObj  # what the connector reads of a memory object


class NoVllm:
    """Keeps vLLM out of the probe (about 15 s to import here, and not under
    test): 0.5.6's token database then hashes with Python's own hash, as on a
    host without vLLM."""

    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError(f"{name} is kept out of this probe")
        return None

NUM_LAYERS, NUM_HEADS, HEAD_SIZE = 3, 2, 8
BLOCK_SIZE, NUM_BLOCKS, CHUNK_SIZE = 16, 160, 256
_engines = 0


def make_config(**overrides):
    from lmcache.v1.config import LMCacheEngineConfig

    # One rank: MLA's default save_only_first_rank would broadcast to none.
    settings = dict(chunk_size=CHUNK_SIZE, local_cpu=True, max_local_cpu_size=0.5, save_unfull_chunk=True,
                    extra_config={"save_only_first_rank": False})  # fmt: skip
    settings.update(overrides)
    return LMCacheEngineConfig.from_defaults(**settings)


def make_metadata(dtype, use_mla):
    from lmcache.v1.metadata import LMCacheMetadata

    kv_shape = (NUM_LAYERS, 1 if use_mla else 2, CHUNK_SIZE, 1 if use_mla else NUM_HEADS, HEAD_SIZE)
    return LMCacheMetadata(
        model_name="probe-model", world_size=1, local_world_size=1, worker_id=0,
        local_worker_id=0, kv_dtype=dtype, kv_shape=kv_shape, use_mla=use_mla,
        role="worker", chunk_size=CHUNK_SIZE,
    )  # fmt: skip


def paged_kv(fill: str, dtype, use_mla: bool):
    """Per layer vllm-gaudi's (K, V) tuple of [blocks, block_size, heads, head_size]
    hpu tensors (MLA: one [blocks, block_size, head_size] tensor)."""
    import torch

    shape = (NUM_BLOCKS, BLOCK_SIZE, HEAD_SIZE) if use_mla else (NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_SIZE)
    make = torch.randn if fill == "random" else torch.zeros
    layers = []
    for _ in range(NUM_LAYERS):
        planes = [make(*shape).to(dtype).to("hpu") for _ in range(1 if use_mla else 2)]
        layers.append(planes[0] if use_mla else tuple(planes))
    return layers


def cache_rows(emu, kv_layers, slots) -> list:
    """The cache bytes at `slots`, per layer and plane, as CPU uint8 tensors."""
    import torch

    cpu_slots = emu.to_cpu(slots)
    out = []
    for layer in kv_layers:
        for plane in [layer] if isinstance(layer, torch.Tensor) else list(layer):
            flat = emu.to_cpu(plane).view(torch.uint8)
            out.append(flat.reshape(flat.shape[0] * flat.shape[1], -1)[cpu_slots])
    return out


def same(a, b) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class Engine:
    """0.5.6's own LMCacheEngine, built by its builder and factory."""

    def __init__(self, dtype, use_mla):
        global _engines
        from lmcache.utils import EngineType, mock_up_broadcast_fn, mock_up_broadcast_object_fn
        from lmcache.v1.cache_engine import LMCacheEngineBuilder
        from lmcache.v1.gpu_connector import CreateGPUConnector

        _engines += 1
        self.name, self.dtype, self.use_mla = f"probe-{_engines}", dtype, use_mla
        config, metadata = make_config(), make_metadata(dtype, use_mla)
        self.connector = CreateGPUConnector(config, metadata, EngineType.VLLM)
        self.engine = LMCacheEngineBuilder.get_or_create(
            self.name, config, metadata, self.connector, mock_up_broadcast_fn, mock_up_broadcast_object_fn
        )
        self.engine.post_init()

    def close(self):
        from lmcache.v1.cache_engine import LMCacheEngineBuilder

        LMCacheEngineBuilder.destroy(self.name)


def hpu_slots(num_tokens, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:num_tokens].to("hpu")


def round_trip(emu, dtype_name: str, use_mla: bool) -> dict:
    """Store from one paged cache, retrieve into another: bytes, counts per batch."""
    import torch

    dtype = getattr(torch, dtype_name)
    num_tokens = 2 * CHUNK_SIZE + 37  # two full chunks and a partial one
    calls: list[str] = []
    with record_cuda_calls(calls):
        eng = Engine(dtype, use_mla)
        try:
            source, target = paged_kv("random", dtype, use_mla), paged_kv("zeros", dtype, use_mla)
            slots, tokens = hpu_slots(num_tokens, seed=1), torch.arange(1000, 1000 + num_tokens)
            differs_before = not same(cache_rows(emu, source, slots), cache_rows(emu, target, slots))
            counts = {}
            for lazy in (True, False):
                emu.set_lazy(lazy)
                mode = "lazy" if lazy else "eager"
                emu.reset_counters()
                eng.engine.store(tokens + (0 if lazy else 7), kvcaches=source, slot_mapping=slots)
                counts[f"store_{mode}"] = [emu.counters.mark_steps, emu.counters.synchronizes]
                emu.reset_counters()
                mask = eng.engine.retrieve(tokens + (0 if lazy else 7), kvcaches=target, slot_mapping=slots)
                counts[f"retrieve_{mode}"] = [emu.counters.mark_steps, emu.counters.synchronizes]
                counts[f"retrieved_{mode}"] = int(mask.sum())
            emu.set_lazy(True)
            equal_after = same(cache_rows(emu, source, slots), cache_rows(emu, target, slots))
            # The check can fail: one corrupted byte in the target is seen.
            plane = target[0] if use_mla else target[0][0]
            flat = plane.cpu_data.view(torch.uint8).reshape(NUM_BLOCKS * BLOCK_SIZE, -1)
            flat[int(emu.to_cpu(slots)[0]), 0] ^= 0xFF
            sees_corruption = not same(cache_rows(emu, source, slots), cache_rows(emu, target, slots))
        finally:
            eng.close()
    return {"num_tokens": num_tokens, "chunks": 3, "layers": NUM_LAYERS, "differs_before": differs_before,
            "bit_exact": equal_after, "sees_corruption": sees_corruption, "counts": counts,
            "cuda_calls": calls}  # fmt: skip


def varied_shapes(emu, steps: int = 200) -> dict:
    """Distinct (op, shapes, dtype) signatures on hpu tensors over `steps` batched
    stores and loads of varied lengths (1 .. 4 chunks), straight through the
    connector as 0.5.6's engine calls it (one batched call per request)."""
    import torch
    from lmcache.utils import EngineType
    from lmcache.v1.gpu_connector import CreateGPUConnector
    from lmcache.v1.memory_management import MemoryFormat

    connector = CreateGPUConnector(make_config(), make_metadata(torch.bfloat16, False), EngineType.VLLM)
    gen = torch.Generator().manual_seed(5)
    source, target = paged_kv("random", torch.bfloat16, False), paged_kv("zeros", torch.bfloat16, False)
    recorder, seen_after = ShapeRecorder(), []
    for step in range(steps):
        n = int(torch.randint(1, 4 * CHUNK_SIZE + 1, (1,), generator=gen))
        starts = list(range(0, n, CHUNK_SIZE))
        ends = [min(s + CHUNK_SIZE, n) for s in starts]
        objs = [HostObj(torch.empty(2, NUM_LAYERS, e - s, NUM_HEADS * HEAD_SIZE, dtype=torch.bfloat16),
                        MemoryFormat.KV_2LTD) for s, e in zip(starts, ends)]  # fmt: skip
        slots = hpu_slots(n, seed=100 + step)
        with recorder:
            connector.batched_from_gpu(objs, starts, ends, kvcaches=source, slot_mapping=slots)
            connector.batched_to_gpu(objs, starts, ends, kvcaches=target, slot_mapping=slots)
        seen_after.append(len(recorder.signatures))
    return {"steps": steps, "distinct": len(recorder.signatures), "after_50": seen_after[49],
            "after_100": seen_after[99], "bit_exact_last": same(cache_rows(emu, source, slots),
                                                                 cache_rows(emu, target, slots))}  # fmt: skip


def factory_section() -> dict:
    import torch
    from lmcache.utils import EngineType
    from lmcache.v1.gpu_connector import CreateGPUConnector

    calls: list[str] = []
    with record_cuda_calls(calls):
        connector = CreateGPUConnector(make_config(), make_metadata(torch.bfloat16, False), EngineType.VLLM)
        try:
            CreateGPUConnector(make_config(use_layerwise=True), make_metadata(torch.bfloat16, False), EngineType.VLLM)
            layerwise = {"raised": None}
        except Exception as exc:  # noqa: BLE001 - the refusal is what we record
            layerwise = {"raised": type(exc).__name__, "message": str(exc)}
    import lmcache

    return {"class": type(connector).__name__, "module": type(connector).__module__,
            "batched_in_one_pass": hasattr(type(connector), "_staging_shape"),  # the patch's own method
            "torch_device_type": lmcache.torch_device_type, "layerwise": layerwise, "cuda_calls": calls}  # fmt: skip


def _outcome(fn) -> dict:
    try:
        fn()
        return {"raised": None}
    except Exception as exc:  # noqa: BLE001 - recorded
        return {"raised": type(exc).__name__, "message": str(exc)[:600]}


def refusals() -> dict:
    """vllm-gaudi's K-only single tensor (fp8, dynamic scales) and its defragmenter."""
    import torch
    from lmcache.utils import EngineType
    from lmcache.v1.gpu_connector import CreateGPUConnector

    metadata = make_metadata(torch.bfloat16, False)
    connector = CreateGPUConnector(make_config(), metadata, EngineType.VLLM)
    k_only = [torch.zeros(NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_SIZE, dtype=torch.bfloat16).to("hpu")
              for _ in range(NUM_LAYERS)]  # fmt: skip
    memory_obj = types.SimpleNamespace(tensor=torch.zeros(2, NUM_LAYERS, 8, NUM_HEADS * HEAD_SIZE), metadata=None)
    single = _outcome(lambda: connector.batched_from_gpu(
        [memory_obj], [0], [8], kvcaches=k_only, slot_mapping=hpu_slots(8, seed=3)))  # fmt: skip

    names = ["vllm_gaudi", "vllm_gaudi.extension", "vllm_gaudi.extension.runtime"]
    results = {"single_tensor": single}
    for defrag in (True, False):
        fake = {n: types.ModuleType(n) for n in names}
        fake["vllm_gaudi.extension.runtime"].get_config = lambda d=defrag: types.SimpleNamespace(defrag=d)
        sys.modules.update(fake)
        try:
            results[f"defrag_{str(defrag).lower()}"] = _outcome(
                lambda: CreateGPUConnector(make_config(), metadata, EngineType.VLLM))
        finally:
            for n in names:
                sys.modules.pop(n, None)
    return results


def host_memory() -> dict:
    from lmcache.v1.platform.torch_ops import mem_alloc

    return {"use_pinned": mem_alloc._use_pinned}


def timed(section):
    def run_section(results, name, fn):
        begin = time.perf_counter()
        section(results, name, fn)
        results.setdefault("seconds", {})[name] = round(time.perf_counter() - begin, 2)

    return run_section


def run(ours: OurPackage, patched: bool) -> dict:
    results: dict = {}
    section = timed(_section)
    emu = ours.emulate(lazy=True, gpu_migration=True)
    try:
        # Imported before record_cuda_calls wraps torch.cuda: transformers (via
        # the token database) evaluates `torch.cuda.Stream | None` at import.
        importlib.import_module("lmcache.v1.cache_engine")
        if patched:
            section(results, "detection_migration", detection)
        section(results, "factory", factory_section)
        for dtype in ("bfloat16", "float8_e4m3fn") if patched else ("bfloat16",):
            for use_mla in (False, True):
                name = f"round_trip_{dtype}_{'mla' if use_mla else 'mha'}"
                section(results, name, lambda d=dtype, m=use_mla: round_trip(emu, d, m))
        section(results, "host_memory", host_memory)
        section(results, "shapes", lambda: varied_shapes(emu))
        section(results, "refusals", refusals)
    finally:
        ours.stop(emu)
    if patched:
        detection_after_lazy_migration(ours, results, section)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", required=True)
    parser.add_argument("--ours", required=True, help="this repository's root (for the HPU emulation)")
    parser.add_argument("--unpatched", action="store_true", help="the tree is 0.5.6 as published")
    args = parser.parse_args()
    ours = OurPackage(args.ours)
    sys.meta_path.insert(0, NoVllm())
    sys.path.insert(0, args.tree)
    results = run(ours, patched=not args.unpatched)
    print(json.dumps(results))
    sys.stdout.flush()
    os._exit(0)  # the engine leaves non-daemon threads behind


if __name__ == "__main__":
    main()
