"""The engine over a host-tensor connector: lookup, store, retrieve (single and
batched, one connector call per step), layerwise, stats, builder."""

import threading

import pytest
import torch

from lmcache.v1.cache_engine import LMCacheEngine, LMCacheEngineBuilder, TransferSpec
from lmcache.v1.config import LMCacheEngineConfig
from tests.helpers.host_connector import HostPagedConnector, bits
from tests.helpers.workload import make_engine, metadata, prompt_kv, prompt_tokens

CS = 16  # chunk size


def config(**kw):
    kw.setdefault("max_local_cpu_size", 0.05)
    return LMCacheEngineConfig.from_defaults(chunk_size=CS, **kw)


def fill(conn, p, slots):
    """Put prompt p's KV at `slots` (slots < 0 are padding)."""
    kv = prompt_kv(p, len(slots), conn.kv_dtype)
    valid = slots >= 0
    conn.cache[slots[valid]] = kv[valid]
    return kv


def loaded_rows_equal(conn, slots, kv, upto):
    valid = slots[:upto] >= 0
    return torch.equal(bits(conn.cache[slots[:upto][valid]]), bits(kv[:upto][valid]))


@pytest.fixture
def engine():
    eng, conn = make_engine(config(), 4096)
    yield eng, conn
    eng.close()


def test_store_lookup_retrieve_bit_exact_with_padding(engine):
    eng, conn = engine
    n = 100
    slots = torch.randperm(4096)[:n]
    slots[[3, 40, 77]] = -1  # padding: never read nor written
    kv = fill(conn, 1, slots)
    tokens = prompt_tokens(1, n)
    assert eng.store(tokens, slot_mapping=slots) == 96  # 6 full chunks; the partial one is not saved
    assert eng.lookup(tokens) == 96
    assert eng.lookup(tokens[:50]) == 48
    assert eng.lookup(prompt_tokens(2, n)) == 0
    sentinel = torch.full_like(conn.cache, 0)
    conn.cache.copy_(sentinel)
    mask = eng.retrieve(tokens, slot_mapping=slots)
    assert mask.dtype == torch.bool and int(mask.sum()) == 96 and bool(mask[:96].all())
    assert loaded_rows_equal(conn, slots, kv, 96)
    untouched = torch.ones(4096, dtype=torch.bool)
    untouched[slots[:96][slots[:96] >= 0]] = False
    assert not conn.cache[untouched].any()  # nothing else was written
    s = eng.stats
    assert (s.stored_chunks, s.stored_tokens, s.loaded_chunks, s.loaded_tokens) == (6, 96, 6, 96)
    assert s.lookups == 3 and s.hit_tokens == 96 + 48


def test_a_wrong_load_is_detected(engine):
    """The comparison used above fails when the loaded KV is wrong."""
    eng, conn = engine
    slots = torch.arange(32)
    kv = fill(conn, 1, slots)
    eng.store(prompt_tokens(1, 32), slot_mapping=slots)
    obj = eng.storage.cpu.get(eng.token_db.chunks(prompt_tokens(1, 32))[1].key)
    bits(obj.tensor)[0, 0, 3, 0] ^= 1  # one bit of a cached chunk
    obj.ref_count_down()
    conn.cache.zero_()
    eng.retrieve(prompt_tokens(1, 32), slot_mapping=slots)
    assert loaded_rows_equal(conn, slots, kv, 16)
    assert not loaded_rows_equal(conn, slots, kv, 32)


def test_batched_calls_move_everything_in_one_connector_call(engine):
    eng, conn = engine
    lengths = [64, 40, 80]
    specs, kvs = [], []
    base = 0
    for p, n in enumerate(lengths):
        slots = torch.arange(base, base + n)
        kvs.append(fill(conn, p, slots))
        specs.append(TransferSpec(prompt_tokens(p, n), slots))
        base += n
    stored = eng.batched_store(specs)
    assert stored == [64, 32, 80]
    assert conn.calls["batched_from_gpu"] == 1
    assert eng.batched_store(specs) == [0, 0, 0]  # already cached: nothing moved
    assert conn.calls["batched_from_gpu"] == 1

    conn.cache.zero_()
    specs[0].skip_tokens = 32  # vLLM holds the first two chunks of request 0
    specs[2].num_tokens = 48
    # tokens loaded after skip_tokens, per request (the unit batched_store answers in)
    assert eng.batched_retrieve(specs) == [32, 32, 48]
    assert conn.calls["batched_to_gpu"] == 1
    assert not conn.cache[0:32].any()  # the skipped prefix was not touched
    assert torch.equal(bits(conn.cache[32:64]), bits(kvs[0][32:64]))
    assert torch.equal(bits(conn.cache[64:96]), bits(kvs[1][:32]))
    assert torch.equal(bits(conn.cache[104:152]), bits(kvs[2][:48]))
    assert not conn.cache[152:184].any()


def test_retrieve_stops_at_a_missing_chunk(engine):
    eng, conn = engine
    slots = torch.arange(64)
    kv = fill(conn, 3, slots)
    tokens = prompt_tokens(3, 64)
    eng.store(tokens, slot_mapping=slots)
    eng.storage.cpu.remove(eng.token_db.chunks(tokens)[1].key)
    conn.cache.zero_()
    assert eng.lookup(tokens) == 16
    assert eng.batched_retrieve([TransferSpec(tokens, slots)]) == [16]
    assert loaded_rows_equal(conn, slots, kv, 16) and not conn.cache[16:64].any()
    assert eng.stats.misses["absent"] == 1


def test_store_and_retrieve_answer_tokens_moved_after_the_skip(engine):
    """One unit for both: a short load after a skipped prefix counts only what it moved."""
    eng, conn = engine
    slots = torch.arange(64)
    fill(conn, 4, slots)
    tokens = prompt_tokens(4, 64)
    assert eng.batched_store([TransferSpec(tokens, slots, skip_tokens=16)]) == [48]
    eng.storage.cpu.remove(eng.token_db.chunks(tokens)[3].key)  # tokens 48..63 gone
    # vLLM holds 16 tokens; chunks 16..48 load, the last one is missing: 32 moved, 48 valid
    assert eng.batched_retrieve([TransferSpec(tokens, slots, skip_tokens=16)]) == [32]
    assert eng.stats.loaded_tokens == 32


def test_unfull_chunk_is_saved_when_configured():
    eng, conn = make_engine(config(save_unfull_chunk=True), 256)
    slots = torch.arange(40)
    kv = fill(conn, 4, slots)
    tokens = prompt_tokens(4, 40)
    assert eng.store(tokens, slot_mapping=slots) == 40
    assert eng.lookup(tokens) == 40 and eng.lookup(tokens[:35]) == 32
    conn.cache.zero_()
    assert int(eng.retrieve(tokens, slot_mapping=slots).sum()) == 40
    assert loaded_rows_equal(conn, slots, kv, 40)
    eng.close()


def test_mask_skips_prefix_on_store_and_retrieve(engine):
    eng, conn = engine
    slots = torch.arange(64)
    kv = fill(conn, 5, slots)
    tokens = prompt_tokens(5, 64)
    mask = torch.ones(64, dtype=torch.bool)
    mask[:32] = False
    assert eng.store(tokens, mask, slot_mapping=slots) == 32
    assert eng.lookup(tokens) == 0  # the first chunks were never stored
    eng.store(tokens, slot_mapping=slots)
    conn.cache.zero_()
    got = eng.retrieve(tokens, mask, slot_mapping=slots)
    assert got[:32].sum() == 0 and bool(got[32:].all())
    assert not conn.cache[:32].any() and torch.equal(bits(conn.cache[32:64]), bits(kv[32:64]))


@pytest.mark.parametrize("use_mla", [False, True])
def test_layerwise_store_and_retrieve(use_mla):
    layers = 3
    conn = HostPagedConnector(512, layers, 2, 8, torch.bfloat16, use_mla=use_mla)
    meta = metadata(CS, torch.bfloat16)
    meta.kv_shape = (layers, 1 if use_mla else 2, CS, 2, 8)
    meta.use_mla = use_mla
    eng = LMCacheEngine(config(), meta, conn)
    slots = torch.randperm(512)[:48]
    rows = torch.randint(-1000, 1000, (48,) + tuple(conn.cache.shape[1:])).to(torch.bfloat16)
    conn.cache[slots] = rows
    tokens = prompt_tokens(6, 48)

    steps = eng.store_layer(tokens, slot_mapping=slots)
    for layer in range(layers):
        assert next(steps) is None
        assert conn.calls["from_layer"] == layer + 1
    assert eng.lookup(tokens) == 0  # not handed to the tiers before the last step
    assert next(steps) == 48
    assert conn.calls["from_layerwise_sync"] == 1 and eng.lookup(tokens) == 48

    conn.cache.zero_()
    steps = eng.retrieve_layer(tokens, slot_mapping=slots)
    next(steps)
    assert conn.cache[slots][:, :, 0].any() and not conn.cache[slots][:, :, 1:].any()  # layer 0 only
    for _ in range(layers - 1):
        next(steps)
    mask = next(steps)
    assert bool(mask.all()) and torch.equal(bits(conn.cache[slots]), bits(rows))
    assert conn.calls["to_layerwise"] == 1 and conn.calls["to_layerwise_sync"] == 1
    assert all(not o.in_use for o in eng.storage.cpu._objs.values())  # readers released
    eng.close()


def test_eviction_and_no_memory_are_misses_not_errors():
    chunk_bytes = 2 * 2 * CS * 128 * 2  # [2, L=2, 16, 128] fp16
    eng, conn = make_engine(config(max_local_cpu_size=4 * chunk_bytes / 1024**3), 1024)
    slots = torch.arange(96)
    for p in range(3):
        fill(conn, p, slots)
        eng.store(prompt_tokens(p, 96), slot_mapping=slots)
    assert eng.storage.cpu.used_bytes <= 4 * chunk_bytes
    assert eng.stats.misses["evicted"] > 0
    assert eng.lookup(prompt_tokens(2, 96)) > 0 and eng.lookup(prompt_tokens(0, 96)) == 0
    # hold every cached chunk as a reader would: nothing can be evicted, the store is skipped
    held = [eng.storage.cpu.get(k) for k in list(eng.storage.cpu._objs)]
    fill(conn, 9, slots)
    assert eng.store(prompt_tokens(9, 96), slot_mapping=slots) == 0
    assert eng.stats.misses["dropped"] >= 1
    for obj in held:
        obj.ref_count_down()
    assert eng.store(prompt_tokens(9, 96), slot_mapping=slots) > 0
    eng.close()


def test_connector_that_disagrees_with_metadata_is_refused():
    conn = HostPagedConnector(64, 3, 4, 32, torch.float16)  # 3 layers, metadata says 2
    with pytest.raises(ValueError, match="keys would not describe the data"):
        LMCacheEngine(config(), metadata(CS), conn)


def test_lookup_only_engine_has_no_connector(tmp_path):
    cfg = config(local_disk=str(tmp_path), max_local_disk_size=0.01)
    writer, conn = make_engine(cfg, 64)
    fill(conn, 7, torch.arange(64))
    writer.store(prompt_tokens(7, 64), slot_mapping=torch.arange(64))
    assert writer.flush(10)
    scheduler = LMCacheEngine(cfg, metadata(CS))
    assert scheduler.lookup(prompt_tokens(7, 64)) == 64
    with pytest.raises(RuntimeError, match="no GPU connector"):
        scheduler.retrieve(prompt_tokens(7, 64), slot_mapping=torch.arange(64))
    writer.close()
    scheduler.close()


def test_builder_shares_and_destroy_closes(tmp_path):
    cfg = config(local_disk=str(tmp_path), max_local_disk_size=0.01)
    a = LMCacheEngineBuilder.get_or_create("test-engine", cfg, metadata(CS))
    assert LMCacheEngineBuilder.get("test-engine") is a
    conn = HostPagedConnector(64, 2, 4, 32, torch.float16)
    assert LMCacheEngineBuilder.get_or_create("test-engine", cfg, metadata(CS), conn) is a
    assert a.gpu_connector is conn
    writer_thread = a.storage.writer._thread
    assert writer_thread.is_alive()
    LMCacheEngineBuilder.destroy("test-engine")
    assert LMCacheEngineBuilder.get("test-engine") is None
    assert not writer_thread.is_alive()
    assert "lmcache-writer" not in [t.name for t in threading.enumerate()]
    LMCacheEngineBuilder.destroy("test-engine")  # destroying twice is harmless


def test_stats_are_a_plain_dataclass(engine):
    import dataclasses

    eng, _ = engine
    d = dataclasses.asdict(eng.stats)
    assert set(d["misses"]) == {"absent", "corrupt", "refused", "tier_down", "evicted", "dropped"}
    assert eng.stats.as_dict()["misses_absent"] == 0
