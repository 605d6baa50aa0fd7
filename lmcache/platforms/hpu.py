"""Intel Gaudi (HPU) through the Habana PyTorch bridge (habana_frameworks.torch).

Lazy mode (PT_HPU_LAZY_MODE=1) accumulates ops into a graph that only runs at
mark_step(); eager mode runs ops as they come. The mode is asked of the bridge,
never assumed from the environment.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any, ContextManager

import torch

from lmcache.platforms.base import NullEvent, NullStream, Platform

logger = logging.getLogger(__name__)


def _bridge_importable() -> bool:
    try:
        return importlib.util.find_spec("habana_frameworks") is not None
    except (ImportError, ValueError):
        return False


class HpuPlatform(Platform):
    device_type = "hpu"

    def __init__(self, index: int = 0):
        super().__init__(index)
        self._core = importlib.import_module("habana_frameworks.torch.core")
        self._pin_ok: bool | None = None

    @staticmethod
    def is_present() -> bool:
        if not _bridge_importable():
            return False
        try:
            importlib.import_module("habana_frameworks.torch")
        except Exception as exc:  # a broken bridge install is "no HPU", said once
            logger.warning("habana_frameworks.torch is installed but failed to import: %s", exc)
            return False
        hpu = getattr(torch, "hpu", None)
        return hpu is not None and bool(hpu.is_available())

    def set_device(self, index: int) -> None:
        super().set_device(index)
        torch.hpu.set_device(index)

    def device_count(self) -> int:
        return torch.hpu.device_count()

    def synchronize(self) -> None:
        torch.hpu.synchronize()

    @property
    def is_lazy(self) -> bool:
        try:
            internal = importlib.import_module("habana_frameworks.torch.utils.internal")
            return bool(internal.is_lazy())
        except (ImportError, AttributeError):
            return False

    def flush(self) -> None:
        # mark_step() outside lazy mode only warns; skip it so eager mode pays nothing.
        if self.is_lazy:
            self._core.mark_step()

    def stream(self) -> Any:
        stream_cls = getattr(torch.hpu, "Stream", None)
        return stream_cls() if stream_cls is not None else NullStream()

    def current_stream(self) -> Any:
        fn = getattr(torch.hpu, "current_stream", None)
        return fn() if fn is not None else NullStream()

    def use_stream(self, stream: Any) -> ContextManager:
        fn = getattr(torch.hpu, "stream", None)
        if fn is None or isinstance(stream, NullStream):
            return super().use_stream(stream)
        return fn(stream)

    def event(self) -> Any:
        event_cls = getattr(torch.hpu, "Event", None)
        return event_cls() if event_cls is not None else NullEvent()

    @property
    def pin_available(self) -> bool:
        if self._pin_ok is None:
            try:
                torch.empty(1, pin_memory=True)
                self._pin_ok = True
            except RuntimeError as exc:
                logger.info("HPU bridge refuses pinned host memory (%s); using pageable memory", exc)
                self._pin_ok = False
        return self._pin_ok

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        if not self.pin_available:
            return t
        try:
            return t if t.is_pinned() else t.pin_memory()
        except RuntimeError:
            self._pin_ok = False
            return t
