"""A C++ device guard for the emulated HPU device type (emulation only).

ATen's C++ wrappers open a device guard for every op that names a device; on a
build without the Habana bridge the HPU slot is empty and they fail with
"PyTorch is not linked with support for hpu devices". This fills the slot with
c10::impl::NoOpDeviceGuardImpl<HPU>, except that it remembers the current device
index (so `t.to("hpu")` resolves to `hpu:<current>` and aliases, as on a real
device); the stand-in `torch.hpu.set_device` writes that index through ctypes.

The few lines are compiled once with torch.utils.cpp_extension.load_inline
against the c10 headers only (about 2 s; cached in TORCH_EXTENSIONS_DIR, by
default ~/.cache/torch_extensions) and cannot be unloaded: the guard is harmless
once the emulation is off, since nothing can then make hpu tensors.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time

logger = logging.getLogger(__name__)

_EXTENSION_NAME = "lmcache_emulated_hpu_device_guard"
_SOURCE = r"""
#include <atomic>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {
std::atomic<int> current_index{0};
std::atomic<int> device_count{1};

struct EmulatedHpuGuardImpl final
    : public c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::HPU> {
  c10::Device getDevice() const override {
    return c10::Device(c10::DeviceType::HPU, current_index.load());
  }
  void setDevice(c10::Device d) const override {
    if (d.has_index()) current_index.store(d.index());
  }
  void uncheckedSetDevice(c10::Device d) const noexcept override {
    if (d.has_index()) current_index.store(d.index());
  }
  c10::Device exchangeDevice(c10::Device d) const override {
    c10::Device old = getDevice();
    setDevice(d);
    return old;
  }
  c10::DeviceIndex deviceCount() const noexcept override {
    return static_cast<c10::DeviceIndex>(device_count.load());
  }
};

C10_REGISTER_GUARD_IMPL(HPU, EmulatedHpuGuardImpl);
}  // namespace

extern "C" int lmcache_emulated_hpu_get_device() { return current_index.load(); }
extern "C" void lmcache_emulated_hpu_set_device(int index) { current_index.store(index); }
extern "C" void lmcache_emulated_hpu_set_device_count(int count) { device_count.store(count); }
"""


class GuardHandle:
    """The loaded guard library: reads and sets the C++ current device index."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        self._get = lib.lmcache_emulated_hpu_get_device
        self._get.restype = ctypes.c_int
        self._get.argtypes = []
        self._set = lib.lmcache_emulated_hpu_set_device
        self._set.argtypes = [ctypes.c_int]
        self._set_count = lib.lmcache_emulated_hpu_set_device_count
        self._set_count.argtypes = [ctypes.c_int]

    def get_device(self) -> int:
        return self._get()

    def set_device(self, index: int) -> None:
        self._set(index)

    def set_device_count(self, count: int) -> None:
        self._set_count(count)


_lock = threading.Lock()
_handle: GuardHandle | None = None


def ensure_hpu_device_guard() -> tuple[GuardHandle, float]:
    """Compile (first time) and load the guard; returns it and the seconds this took."""
    global _handle
    with _lock:
        if _handle is not None:
            return _handle, 0.0
        from torch.utils.cpp_extension import load_inline

        started = time.perf_counter()
        try:
            path = load_inline(
                _EXTENSION_NAME,
                cpp_sources=[_SOURCE],
                is_python_module=False,
                no_implicit_headers=True,
            )
        except Exception as exc:
            raise RuntimeError(
                "the HPU emulation could not build its HPU device guard with "
                "torch.utils.cpp_extension.load_inline (it needs g++ and ninja: "
                f"`pip install ninja`): {exc}"
            ) from exc
        _handle = GuardHandle(path)
        elapsed = time.perf_counter() - started
        logger.debug("emulated HPU device guard loaded in %.2f s", elapsed)
        return _handle, elapsed
