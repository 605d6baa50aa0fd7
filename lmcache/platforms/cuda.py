"""NVIDIA CUDA (and ROCm, which torch exposes through torch.cuda)."""

from __future__ import annotations

import logging
from typing import Any, ContextManager

import torch

from lmcache.platforms.base import Platform

logger = logging.getLogger("lmcache.platforms")


class CudaPlatform(Platform):
    device_type = "cuda"

    @staticmethod
    def is_present() -> bool:
        # Under Gaudi's GPU migration torch.cuda.is_available() lies; a real
        # CUDA/ROCm build of torch is what tells us CUDA can be here at all.
        built_for_gpu = bool(torch.version.cuda or getattr(torch.version, "hip", None))
        return built_for_gpu and torch.cuda.is_available()

    def set_device(self, index: int) -> None:
        super().set_device(index)
        torch.cuda.set_device(index)

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def stream(self) -> Any:
        return torch.cuda.Stream(device=self.device)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def use_stream(self, stream: Any) -> ContextManager:
        return torch.cuda.stream(stream)

    def event(self) -> Any:
        return torch.cuda.Event()

    @property
    def pin_available(self) -> bool:
        return True

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.is_pinned() else t.pin_memory()

    def register_host_memory(self, t: torch.Tensor) -> bool:
        cudart = getattr(torch.cuda, "cudart", None)
        if cudart is None or not torch.cuda.is_available():
            return False
        try:
            # flags 0 (cudaHostRegisterDefault); registering faults every page in
            err = int(cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
        except (AttributeError, RuntimeError) as exc:
            logger.warning("LMCache: cudaHostRegister unavailable (%s): shared host memory stays pageable", exc)
            return False
        if err != 0:
            logger.warning("LMCache: cudaHostRegister of %d bytes failed (cudaError %d): shared host memory stays "
                           "pageable", t.numel() * t.element_size(), err)
            return False
        return True

    def unregister_host_memory(self, data_ptr: int) -> None:
        try:
            torch.cuda.cudart().cudaHostUnregister(data_ptr)
        except (AttributeError, RuntimeError):
            pass
