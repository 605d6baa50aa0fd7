"""CPU: no streams, no graphs, no pinning (there is no device to pin for)."""

from __future__ import annotations

import torch

from lmcache.platforms.base import Platform


class CpuPlatform(Platform):
    device_type = "cpu"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def synchronize(self) -> None:
        pass

    @staticmethod
    def is_present() -> bool:
        return True
