"""User-facing device helpers, as users of vLLM on Gaudi call them.

    from lmcache.utils import get_device_type, is_hpu_available

`init_logger(name)` is the logger factory vLLM's LMCache modules import from here.
"""

from __future__ import annotations

import logging

import torch

from lmcache.platforms import current_platform, detect_device_type


def is_hpu_available() -> bool:
    """True when a Gaudi card is usable through the Habana bridge."""
    from lmcache.platforms.hpu import HpuPlatform

    return HpuPlatform.is_present()


def is_cuda_available() -> bool:
    """True only for a real NVIDIA/AMD GPU: False under Gaudi's GPU migration."""
    from lmcache.platforms.cuda import CudaPlatform

    return not is_hpu_available() and CudaPlatform.is_present()


def get_device_type() -> str:
    """"hpu", "cuda" or "cpu" (LMCACHE_DEVICE overrides the probe)."""
    return detect_device_type()


def get_device(local_rank: int | None = None) -> torch.device:
    """The torch.device of this process's platform, for `local_rank` if given."""
    platform = current_platform()
    if local_rank is None or platform.device_type == "cpu":
        return platform.device
    count = max(platform.device_count(), 1)
    return torch.device(platform.device_type, local_rank % count)


def init_logger(name: str) -> logging.Logger:
    """`logging.getLogger(name)`; also makes sure LMCache's own log lines are shown
    inside vLLM processes (level from LMCACHE_LOG_LEVEL, default INFO)."""
    from lmcache.logging import ensure_log_handler

    ensure_log_handler()
    return logging.getLogger(name)
