"""User-facing device helpers (HPU through the emulation: placement, not speed)."""

import os
import subprocess
import sys

import pytest
import torch

from lmcache.platforms import set_platform
from lmcache.utils import get_device, get_device_type, is_cuda_available, is_hpu_available
from tests.helpers.hpu import emulated_hpu

ONE_LINER = (
    "from lmcache.utils import get_device_type, is_hpu_available; "
    "print(get_device_type(), is_hpu_available())"
)
ACTIVATE_FIRST = (
    "from lmcache.testing.hpu_emulation import HpuEmulation; HpuEmulation().activate(); "
)


def _run(code: str) -> str:
    env = dict(os.environ)
    env.pop("LMCACHE_DEVICE", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_one_liner_prints_cpu_false_here():
    from tests.helpers.devices import cuda_present

    assert _run(ONE_LINER) == ("cuda False" if cuda_present() else "cpu False")


def test_one_liner_prints_hpu_true_inside_the_emulation():
    assert _run(ACTIVATE_FIRST + ONE_LINER) == "hpu True"


@pytest.fixture
def no_platform(monkeypatch):
    monkeypatch.delenv("LMCACHE_DEVICE", raising=False)
    previous = set_platform(None)
    yield
    set_platform(previous)


def test_helpers_on_cpu(no_platform, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (get_device_type(), is_hpu_available(), is_cuda_available()) == ("cpu", False, False)
    assert get_device() == torch.device("cpu")
    assert get_device(3) == torch.device("cpu")


def test_helpers_on_hpu(no_platform):
    with emulated_hpu(device_count=2):
        assert (get_device_type(), is_hpu_available(), is_cuda_available()) == ("hpu", True, False)
        assert get_device() == torch.device("hpu", 0)
        assert get_device(1) == torch.device("hpu", 1)


def test_cuda_is_not_available_under_gpu_migration(no_platform, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # even a CUDA-looking build
    with emulated_hpu(gpu_migration=True):
        assert torch.cuda.is_available() is True
        assert is_cuda_available() is False
        assert get_device_type() == "hpu"


def test_cuda_available_on_a_cuda_build(no_platform, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert is_cuda_available() is True and get_device_type() == "cuda"
    assert get_device(2) == torch.device("cuda", 2)


def test_get_device_type_follows_the_override(no_platform, monkeypatch):
    monkeypatch.setenv("LMCACHE_DEVICE", "cpu")
    with emulated_hpu():
        os.environ["LMCACHE_DEVICE"] = "cpu"  # emulated_hpu cleared it; set it inside
        assert get_device_type() == "cpu"
        assert is_hpu_available() is True
