"""The Platform interface: the named device operations generic code may ask for.

Generic code never asks "which device is this?"; it asks the platform to do a
named thing. Device-specific calls live only in this package.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, ContextManager

import torch


class NullStream:
    """Stand-in for devices without streams: work is ordered by program order."""

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class NullEvent:
    """Stand-in for devices without events."""

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class Platform(ABC):
    """One device family. Subclasses implement the operations for their runtime."""

    device_type: str = "cpu"

    def __init__(self, index: int = 0):
        self._index = index

    # -- identity ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type, self._index)

    def set_device(self, index: int) -> None:
        """Make device `index` (a local rank) the current one."""
        self._index = index

    def device_count(self) -> int:
        return 1

    # -- ordering ---------------------------------------------------------
    @abstractmethod
    def synchronize(self) -> None:
        """Wait until all queued device work has finished."""

    def flush(self) -> None:
        """End the current lazy graph (a graph break). No-op on eager devices."""

    @property
    def is_lazy(self) -> bool:
        return False

    def stream(self) -> Any:
        """A new side stream, or a NullStream where the device has none."""
        return NullStream()

    def current_stream(self) -> Any:
        return NullStream()

    def use_stream(self, stream: Any) -> ContextManager:
        """Context manager making `stream` current."""
        return contextlib.nullcontext()

    def event(self) -> Any:
        return NullEvent()

    # -- memory -----------------------------------------------------------
    def to_device(self, t: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        return t.to(self.device, non_blocking=non_blocking)

    @property
    def pin_available(self) -> bool:
        return False

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """`t` in page-locked host memory where possible, else `t` itself."""
        return t

    def register_host_memory(self, t: torch.Tensor) -> bool:
        """Page-lock, in place, host memory this process mapped but did not allocate (the
        lmcache server's shared-memory arena), so that device copies to and from it are
        pinned copies. True if it is registered now; False where the platform does not do
        it (CPU: nothing to gain; Gaudi: vllm-gaudi expects pageable host memory) or could not."""
        return False

    def unregister_host_memory(self, data_ptr: int) -> None:
        """Undo register_host_memory for the memory starting at `data_ptr`."""

    def empty_host(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor, pinned where the platform allows."""
        t = torch.empty(shape, dtype=dtype)
        return self.pin(t) if self.pin_available else t

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"
