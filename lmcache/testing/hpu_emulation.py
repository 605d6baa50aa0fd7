"""HPU (Intel Gaudi) emulation on a CPU-only machine, for tests.

THIS IS AN EMULATION. It proves device placement, data movement and sync
discipline (where mark_step() graph breaks and synchronizes happen, that no op
mixes hpu and cpu tensors); it says NOTHING about Gaudi speed. Numbers measured
on it are CPU numbers.

While active:

- `torch.device("hpu", i)` tensors are real: factories (`torch.empty/zeros/randn/
  tensor(..., device="hpu")`), `.to("hpu")` / `.to("cpu")` / `copy_` (also with
  non_blocking=True) produce and consume `EmulatedHpuTensor`s backed by CPU
  memory; an op mixing hpu and cpu tensors raises "Expected all tensors to be on
  the same device" (see lmcache/testing/hpu_tensor.py).
- inside `torch.inference_mode()` and `torch.no_grad()` they behave as device
  tensors do: views of tensors made outside stay normal tensors (writable into,
  as vLLM writes its KV caches), `.to(same device)` is the tensor itself.
- `torch.hpu` is a stand-in module (is_available, device_count, current_device,
  set_device, synchronize [counted], Stream, Event, current_stream, stream).
- `habana_frameworks`, `habana_frameworks.torch`, `.torch.core` (mark_step()
  [counted]), `.torch.utils.internal` (is_lazy()) are stand-in modules, found by
  `importlib.util.find_spec`; `set_lazy()` switches the lazy mode they report.
- with gpu_migration=True, `torch.cuda.is_available()` returns True, as under
  Gaudi's PT_HPU_GPU_MIGRATION=1.
- `lmcache.platforms.current_platform()` re-probes, and finds HPU.

`deactivate()` puts back everything it changed. The emulation refuses to start
where a real Habana bridge is installed.

    with HpuEmulation(lazy=True) as emu:
        kv = torch.zeros(4, 16, device="hpu")
        ...
        assert emu.counters.mark_steps == 1
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from typing import Any

import torch

from lmcache.testing import hpu_tensor
from lmcache.testing.hpu_guard import ensure_hpu_device_guard
from lmcache.testing.hpu_modules import (
    EMULATION_MARK,
    DeviceState,
    HpuCounters,
    make_habana_modules,
    make_torch_hpu,
)
from lmcache.testing.hpu_tensor import EmulatedHpuTensor, HpuKernels

__all__ = ["EmulatedHpuTensor", "HpuCounters", "HpuEmulation", "real_bridge_present"]

_MIGRATION_ENV = "PT_HPU_GPU_MIGRATION"
_active_lock = threading.Lock()
_active: "HpuEmulation | None" = None


def _is_emulated(module: Any) -> bool:
    return bool(getattr(module, EMULATION_MARK, False))


def real_bridge_present() -> str | None:
    """Where a real (non-emulated) Habana bridge or torch.hpu is, else None."""
    loaded = sys.modules.get("habana_frameworks")
    if loaded is not None:
        return None if _is_emulated(loaded) else f"habana_frameworks already imported from {getattr(loaded, '__file__', loaded)}"
    try:
        spec = importlib.util.find_spec("habana_frameworks")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        where = spec.origin or list(spec.submodule_search_locations or []) or spec.name
        return f"habana_frameworks is installed at {where}"
    existing = getattr(torch, "hpu", None)
    if existing is not None and not _is_emulated(existing):
        return f"torch.hpu is already registered ({existing!r})"
    return None


class HpuEmulation:
    """Turns the HPU emulation on (`activate`) and off (`deactivate`); see module doc."""

    def __init__(self, lazy: bool = True, gpu_migration: bool = False, device_count: int = 1):
        if device_count < 1:
            raise ValueError(f"device_count must be >= 1, got {device_count}")
        self._state = DeviceState(device_count, lazy)
        self.gpu_migration = gpu_migration
        self._kernels = HpuKernels()
        self._saved: dict[str, Any] | None = None
        self.activation_seconds: float | None = None
        self.guard_build_seconds: float | None = None

    # -- public API -----------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._saved is not None

    @property
    def counters(self) -> HpuCounters:
        return self._state.counters

    def reset_counters(self) -> None:
        self._state.counters.reset()

    @property
    def lazy(self) -> bool:
        return self._state.lazy

    def set_lazy(self, flag: bool) -> None:
        """Switch what `habana_frameworks.torch.utils.internal.is_lazy()` reports."""
        self._state.lazy = bool(flag)
        self._state.counters.ops_since_mark_step = 0

    @property
    def device(self) -> torch.device:
        return torch.device("hpu", self._state.current_index)

    @staticmethod
    def to_cpu(t: torch.Tensor) -> torch.Tensor:
        """A plain CPU tensor with `t`'s data (a copy for emulated hpu tensors)."""
        if isinstance(t, EmulatedHpuTensor):
            return t.cpu_data.clone()
        return t

    def activate(self) -> "HpuEmulation":
        global _active
        started = time.perf_counter()
        with _active_lock:
            if self.active:
                raise RuntimeError("this HpuEmulation is already active")
            if _active is not None:
                raise RuntimeError(
                    "another HpuEmulation is active in this process; deactivate it first"
                )
            real = real_bridge_present()
            if real is not None:
                raise RuntimeError(
                    f"refusing to emulate HPU: a real Habana bridge is present ({real}). "
                    "Run these tests on the Gaudi itself, without lmcache.testing's emulation."
                )
            guard, self.guard_build_seconds = ensure_hpu_device_guard()
            self._state.attach_guard(guard)
            self._install()
            _active = self
        self.activation_seconds = time.perf_counter() - started
        return self

    def deactivate(self) -> None:
        global _active
        with _active_lock:
            if not self.active:
                return
            self._uninstall()
            if _active is self:
                _active = None

    def __enter__(self) -> "HpuEmulation":
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    # -- installing and restoring ---------------------------------------------
    def _install(self) -> None:
        from lmcache import platforms

        state = self._state
        torch_hpu = make_torch_hpu(state)
        habana = make_habana_modules(state, torch_hpu)
        saved: dict[str, Any] = {
            "modules": {name: sys.modules.get(name) for name in [*habana, "torch.hpu"]},
            "hooks": (hpu_tensor.hooks.on_op, hpu_tensor.hooks.resolve),
            "cuda_is_available": torch.cuda.is_available,
            "migration_env": os.environ.get(_MIGRATION_ENV),
        }
        self._saved = saved
        try:
            self._kernels.register()
            hpu_tensor.hooks.on_op = state.count_op
            hpu_tensor.hooks.resolve = lambda d: torch.device("hpu", state.index_of(d))
            torch._register_device_module("hpu", torch_hpu)
            sys.modules.update(habana)
            if self.gpu_migration:
                torch.cuda.is_available = _migrated_is_available
                os.environ[_MIGRATION_ENV] = "1"
            saved["platform"] = platforms.set_platform(None)
        except BaseException:
            self._uninstall()
            raise

    def _uninstall(self) -> None:
        from lmcache import platforms

        saved = self._saved
        assert saved is not None
        self._kernels.unregister()
        hpu_tensor.hooks.on_op, hpu_tensor.hooks.resolve = saved["hooks"]
        if _is_emulated(getattr(torch, "hpu", None)):
            delattr(torch, "hpu")
        for name, previous in saved["modules"].items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
        torch.cuda.is_available = saved["cuda_is_available"]
        if saved["migration_env"] is None:
            os.environ.pop(_MIGRATION_ENV, None)
        else:
            os.environ[_MIGRATION_ENV] = saved["migration_env"]
        if "platform" in saved:
            platforms.set_platform(saved["platform"])
        self._saved = None


def _migrated_is_available() -> bool:
    """torch.cuda.is_available() under emulated Gaudi GPU migration: it lies."""
    return True
