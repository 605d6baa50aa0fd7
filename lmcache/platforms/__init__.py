"""Which device we run on, decided once, lazily, never at import time.

Order: the LMCACHE_DEVICE override, then Gaudi HPU, then CUDA, then CPU. HPU is
probed before CUDA because Gaudi's GPU-migration mode (PT_HPU_GPU_MIGRATION=1)
makes torch.cuda.is_available() return True on a machine with no NVIDIA GPU.
"""

from __future__ import annotations

import os
import threading

from lmcache.platforms.base import NullEvent, NullStream, Platform

__all__ = [
    "DEVICE_TYPES",
    "NullEvent",
    "NullStream",
    "Platform",
    "current_platform",
    "detect_device_type",
    "make_platform",
    "reset_platform",
    "set_platform",
]

DEVICE_TYPES = ("cuda", "hpu", "cpu")
OVERRIDE_ENV = "LMCACHE_DEVICE"

_lock = threading.Lock()
_current: Platform | None = None


def _platform_class(device_type: str) -> type[Platform]:
    if device_type == "hpu":
        from lmcache.platforms.hpu import HpuPlatform

        return HpuPlatform
    if device_type == "cuda":
        from lmcache.platforms.cuda import CudaPlatform

        return CudaPlatform
    from lmcache.platforms.cpu import CpuPlatform

    return CpuPlatform


_RUNTIME_NAMES = {
    "hpu": "the Habana bridge (habana_frameworks.torch) with a visible Gaudi card",
    "cuda": "a CUDA or ROCm build of torch with a visible GPU",
}


def detect_device_type() -> str:
    """Probe for the device type without starting any device runtime."""
    forced = os.environ.get(OVERRIDE_ENV, "").strip().lower()
    if forced:
        if forced not in DEVICE_TYPES:
            raise ValueError(
                f"{OVERRIDE_ENV}={os.environ[OVERRIDE_ENV]!r} is not a device type; "
                f"accepted values: {', '.join(DEVICE_TYPES)}"
            )
        if forced != "cpu" and not _platform_class(forced).is_present():
            raise RuntimeError(
                f"{OVERRIDE_ENV}={forced} but {forced} is not present: it needs "
                f"{_RUNTIME_NAMES[forced]}"
            )
        return forced
    for candidate in ("hpu", "cuda"):
        if _platform_class(candidate).is_present():
            return candidate
    return "cpu"


def make_platform(device_type: str, index: int = 0) -> Platform:
    if device_type not in DEVICE_TYPES:
        raise ValueError(
            f"unknown device type {device_type!r}; accepted values: {', '.join(DEVICE_TYPES)}"
        )
    return _platform_class(device_type)(index)


def current_platform() -> Platform:
    """The platform of this process, resolved on first use."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = make_platform(detect_device_type())
    return _current


def set_platform(platform: Platform | None) -> Platform | None:
    """Replace the current platform (tests); returns the previous one."""
    global _current
    with _lock:
        previous, _current = _current, platform
    return previous


def reset_platform() -> None:
    """Forget the resolved platform; the next current_platform() probes again."""
    set_platform(None)
