"""Device detection and the Platform operations (HPU through the emulation: placement, not speed)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from lmcache.platforms import (
    current_platform,
    detect_device_type,
    make_platform,
    reset_platform,
    set_platform,
)
from lmcache.platforms.cpu import CpuPlatform
from lmcache.platforms.cuda import CudaPlatform
from lmcache.platforms.hpu import HpuPlatform
from tests.helpers.hpu import emulated_hpu


@pytest.fixture
def fresh_platform(monkeypatch):
    """No override, no resolved platform; whatever was resolved is put back."""
    monkeypatch.delenv("LMCACHE_DEVICE", raising=False)
    previous = set_platform(None)
    yield
    set_platform(previous)


@pytest.fixture
def no_devices(fresh_platform, monkeypatch):
    """No GPU either, also on a machine that has one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda_build(monkeypatch):
    """A CUDA build of torch with a visible GPU, as far as detection can tell."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


# -- detection matrix -------------------------------------------------------------


def test_nothing_present_is_cpu(no_devices):
    assert detect_device_type() == "cpu"
    assert isinstance(current_platform(), CpuPlatform)
    assert current_platform().device == torch.device("cpu")


@pytest.mark.parametrize("value", ["cpu", "CPU", " cpu "])
def test_override_cpu(fresh_platform, monkeypatch, fake_cuda_build, value):
    monkeypatch.setenv("LMCACHE_DEVICE", value)
    assert detect_device_type() == "cpu"


@pytest.mark.parametrize("value", ["tpu", "gpu", "hpu0"])
def test_override_invalid_lists_accepted_values(fresh_platform, monkeypatch, value):
    monkeypatch.setenv("LMCACHE_DEVICE", value)
    with pytest.raises(ValueError) as err:
        detect_device_type()
    assert f"LMCACHE_DEVICE={value!r}" in str(err.value)
    assert "accepted values: cuda, hpu, cpu" in str(err.value)


def test_override_forced_hpu_absent_names_the_bridge(fresh_platform, monkeypatch):
    monkeypatch.setenv("LMCACHE_DEVICE", "hpu")
    with pytest.raises(RuntimeError, match=r"LMCACHE_DEVICE=hpu but hpu is not present.*habana_frameworks\.torch"):
        detect_device_type()


def test_override_forced_cuda_absent_names_the_runtime(fresh_platform, monkeypatch):
    monkeypatch.setenv("LMCACHE_DEVICE", "cuda")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="LMCACHE_DEVICE=cuda but cuda is not present.*CUDA or ROCm build"):
        detect_device_type()


def test_override_forced_hpu_present(fresh_platform, monkeypatch):
    with emulated_hpu():
        monkeypatch.setenv("LMCACHE_DEVICE", "hpu")
        assert detect_device_type() == "hpu"
        monkeypatch.setenv("LMCACHE_DEVICE", "cpu")
        assert detect_device_type() == "cpu"  # the override beats a present HPU


def test_hpu_present(hpu_emu):
    assert detect_device_type() == "hpu"
    platform = current_platform()
    assert isinstance(platform, HpuPlatform)
    assert platform.device == torch.device("hpu", 0)


def test_gpu_migration_picks_hpu(fresh_platform):
    with emulated_hpu(gpu_migration=True):
        assert torch.cuda.is_available() is True  # the lie migration tells
        assert detect_device_type() == "hpu"
        assert isinstance(current_platform(), HpuPlatform)


def test_gpu_migration_with_a_cuda_version_still_picks_hpu(fresh_platform, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with emulated_hpu(gpu_migration=True):
        assert detect_device_type() == "hpu"


def test_cuda_only(fresh_platform, fake_cuda_build):
    assert detect_device_type() == "cuda"
    assert isinstance(make_platform(detect_device_type()), CudaPlatform)


def test_rocm_only(fresh_platform, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert detect_device_type() == "cuda"


def test_cuda_available_without_a_gpu_build_is_not_cuda(fresh_platform, monkeypatch):
    """torch.cuda.is_available() alone (e.g. a migration shim) does not make CUDA."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert detect_device_type() == "cpu"


def test_cuda_build_without_a_gpu_is_cpu(fresh_platform, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect_device_type() == "cpu"


def test_platform_is_resolved_once(no_devices, monkeypatch):
    first = current_platform()
    monkeypatch.setenv("LMCACHE_DEVICE", "not-a-device")  # would raise if probed again
    assert current_platform() is first
    reset_platform()
    with pytest.raises(ValueError):
        current_platform()


def test_make_platform_rejects_unknown_types():
    with pytest.raises(ValueError, match="unknown device type 'xpu'; accepted values: cuda, hpu, cpu"):
        make_platform("xpu")


PROBE_AT_IMPORT = textwrap.dedent(
    """
    import importlib.abc, sys, torch
    imported, probed = [], []
    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "habana_frameworks":
                imported.append(name)
            return None
    sys.meta_path.insert(0, Watch())
    torch.cuda.is_available = lambda: probed.append("cuda") or False
    import lmcache, lmcache.utils, lmcache.platforms
    import lmcache.platforms.hpu, lmcache.platforms.cuda, lmcache.platforms.cpu
    import lmcache.testing.hpu_emulation
    print("IMPORT", imported, probed)
    lmcache.platforms.current_platform()
    print("PROBE", imported, probed)
    """
)


def test_no_probing_at_import_time():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE_AT_IMPORT],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env_without_override(),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "IMPORT [] []" in lines
    # The watch is able to see a probe: resolving the platform looks for the bridge
    # (and asks CUDA only on a CUDA/ROCm build of torch).
    assert any(line.startswith("PROBE ['habana_frameworks']") for line in lines), lines


def _env_without_override():
    import os

    env = dict(os.environ)
    env.pop("LMCACHE_DEVICE", None)
    return env


# -- HpuPlatform operations ----------------------------------------------------------


def test_flush_marks_a_step_only_in_lazy_mode(hpu_emu):
    platform = current_platform()
    assert platform.is_lazy
    platform.flush()
    platform.flush()
    assert hpu_emu.counters.mark_steps == 2
    hpu_emu.set_lazy(False)
    assert not platform.is_lazy
    platform.flush()
    assert hpu_emu.counters.mark_steps == 2


def test_synchronize_is_torch_hpu_synchronize(hpu_emu):
    platform = current_platform()
    platform.synchronize()
    assert hpu_emu.counters.synchronizes == 1
    assert hpu_emu.counters.mark_steps == 0  # a synchronize is not a graph break


def _refuse_pinning(monkeypatch):
    """Pinned host memory refused, as vllm-gaudi reports it (and as a CPU build does)."""
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("pinned memory refused (simulated)")
        return real_empty(*args, **kwargs)

    def pin_memory(self, *args, **kwargs):
        raise RuntimeError("pinned memory refused (simulated)")

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)


def test_pin_falls_back_to_unpinned_when_refused(hpu_emu, monkeypatch):
    _refuse_pinning(monkeypatch)
    platform = make_platform("hpu")
    host = torch.randn(4, 4)
    assert platform.pin_available is False
    assert platform.pin(host) is host
    assert platform.empty_host((2, 3), torch.float16).shape == (2, 3)


def test_pin_failure_after_a_positive_probe_still_falls_back(hpu_emu, monkeypatch):
    _refuse_pinning(monkeypatch)
    platform = make_platform("hpu")
    platform._pin_ok = True  # the probe said yes; the real pin then fails
    host = torch.randn(3)
    assert platform.pin(host) is host
    assert platform.pin_available is False


def test_to_device_and_streams(hpu_emu):
    platform = current_platform()
    src = torch.arange(6.0)
    dev = platform.to_device(src, non_blocking=True)
    assert dev.device == torch.device("hpu", 0)
    assert torch.equal(hpu_emu.to_cpu(dev), src)
    side = platform.stream()
    assert isinstance(side, torch.hpu.Stream)
    with platform.use_stream(side):
        assert platform.current_stream() is side
    assert platform.current_stream() is not side
    event = platform.event()
    event.record(side)
    assert event.query()
    event.synchronize()
    assert hpu_emu.counters.event_synchronizes == 1


def test_set_device_and_count():
    with emulated_hpu(device_count=2):
        platform = current_platform()
        assert platform.device_count() == 2
        platform.set_device(1)
        assert platform.device == torch.device("hpu", 1)
        assert torch.hpu.current_device() == 1
        assert platform.to_device(torch.ones(1)).device == torch.device("hpu", 1)


def test_cpu_platform_ops(cpu_platform):
    platform = current_platform()
    host = torch.ones(2)
    assert platform.to_device(host) is host
    assert platform.pin(host) is host and not platform.pin_available
    platform.synchronize()
    platform.flush()
    assert not platform.is_lazy


# -- CUDA (only with a GPU) --------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_detected_and_usable(fresh_platform):
    assert detect_device_type() == "cuda"
    platform = current_platform()
    src = torch.arange(8.0)
    dev = platform.to_device(platform.pin(src), non_blocking=True)
    platform.synchronize()
    assert dev.device.type == "cuda" and torch.equal(dev.cpu(), src)
    event = platform.event()
    event.record()
    event.synchronize()
