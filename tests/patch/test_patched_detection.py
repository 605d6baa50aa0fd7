"""Each patched upstream release on this machine's real hardware (no emulation)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.devices import cuda_present
from tests.helpers.probe_runner import run_probe, section

pytestmark = pytest.mark.network


def test_patched_detection_matches_this_machine(patched_tree, tmp_path):
    found = section(run_probe(patched_tree, emulate=False, cwd=tmp_path), "detection")
    assert found["lmcache_file"].startswith(str(patched_tree))
    expected = "cuda" if cuda_present() else "cpu"
    assert (found["device_type"], found["is_hpu_available"]) == (expected, False)
    assert found["is_cuda_available"] == (expected == "cuda")


_CUDA_FACTORY = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
from lmcache.utils import EngineType
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector import CreateGPUConnector
from lmcache.v1.metadata import LMCacheMetadata
config = LMCacheEngineConfig.from_defaults(chunk_size=256)
metadata = LMCacheMetadata(model_name="m", world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=(2, 2, 256, 8, 128),
                           role="worker", chunk_size=256)
print(type(CreateGPUConnector(config, metadata, EngineType.VLLM)).__name__)
"""


# The CUDA extension each release's CUDA connectors need.
CUDA_EXTENSION = {"0.4.2": "c_ops", "0.5.6": "cuda_ops"}


@pytest.mark.cuda
def test_patched_factory_still_returns_the_cuda_connector(patched_tree, base_version, tmp_path):
    # The scratch tree has no CUDA extension; a patched tree built with it on the
    # GPU host can be named instead (LMCACHE_PATCHED_TREE_0_4_2 / _0_5_6).
    env_name = "LMCACHE_PATCHED_TREE_" + base_version.replace(".", "_")
    tree = Path(os.environ.get(env_name, patched_tree))
    ext = CUDA_EXTENSION[base_version]
    if not any((tree / "lmcache").glob(f"{ext}*.so")):
        pytest.skip(
            f"{tree} has no compiled lmcache.{ext} ({base_version}'s CUDA extension), which "
            "CUDA's connectors need: on the GPU host run `pip install --no-build-isolation -e .` "
            f"in a patched tree and set {env_name} to it"
        )
    env = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _CUDA_FACTORY, str(tree)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "VLLMPagedMemGPUConnectorV2"
