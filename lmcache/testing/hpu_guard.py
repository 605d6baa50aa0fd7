"""A no-op C++ device guard for the HPU device type (emulation only).

ATen's C++ wrappers open a device guard for every op that names a device; on a
build without the Habana bridge the HPU slot is empty and they fail with
"PyTorch is not linked with support for hpu devices". Registering
c10::impl::NoOpDeviceGuardImpl<HPU> fills the slot. The few lines are compiled
once with torch.utils.cpp_extension.load_inline (cached in TORCH_EXTENSIONS_DIR,
by default ~/.cache/torch_extensions) and cannot be unloaded: a no-op guard is
harmless once the emulation is off, since nothing can then make hpu tensors.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)

_EXTENSION_NAME = "lmcache_hpu_noop_device_guard"
_SOURCE = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
namespace {
C10_REGISTER_GUARD_IMPL(HPU, c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::HPU>);
}
"""

_lock = threading.Lock()
_loaded = False


def ensure_hpu_device_guard() -> float:
    """Compile (first time) and load the guard; returns the seconds it took."""
    global _loaded
    with _lock:
        if _loaded:
            return 0.0
        from torch.utils.cpp_extension import load_inline

        started = time.perf_counter()
        try:
            load_inline(
                _EXTENSION_NAME,
                cpp_sources=[_SOURCE],
                is_python_module=False,
                no_implicit_headers=True,
            )
        except Exception as exc:
            raise RuntimeError(
                "the HPU emulation could not build its no-op HPU device guard with "
                "torch.utils.cpp_extension.load_inline (it needs g++ and ninja: "
                f"`pip install ninja`): {exc}"
            ) from exc
        _loaded = True
        elapsed = time.perf_counter() - started
        logger.debug("HPU no-op device guard loaded in %.2f s", elapsed)
        return elapsed
