"""Intel Gaudi (HPU) through the Habana PyTorch bridge (habana_frameworks.torch).

Lazy mode (PT_HPU_LAZY_MODE=1) accumulates ops into a graph that only runs at
mark_step(); eager mode runs ops as they come. The mode is asked of the bridge,
never assumed from the environment.

Host buffers are pageable unless pinning is forced or a start-up probe succeeds
(vllm-gaudi reports pinned memory as unsupported on HPU): see `pin_available`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
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
        except Exception as exc:  # noqa: BLE001 - a broken bridge install is "no HPU", said once
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
        """Pinned host memory only where forced (LMCACHE_HPU_PIN_MEMORY=1) or where a probe
        succeeds: vllm-gaudi reports pinning unsupported on HPU, so the default is pageable."""
        if self._pin_ok is None:
            setting = pin_setting()
            self._pin_ok = setting if setting is not None else self._probe_pinning()
            logger.info("HPU host buffers: %s (%s=%s)", "pinned" if self._pin_ok else "pageable", PIN_ENV,
                        os.environ.get(PIN_ENV, "auto"))
        return self._pin_ok

    def _probe_pinning(self) -> bool:
        """A pinned round trip through the device; any exception (or wrong bytes) means no."""
        try:
            sent = torch.empty(4096, dtype=torch.uint8, pin_memory=True)
            if not sent.is_pinned():
                return False
            sent.fill_(0x5A)
            back = torch.empty(4096, dtype=torch.uint8, pin_memory=True)
            back.copy_(sent.to(self.device, non_blocking=True), non_blocking=True)
            torch.hpu.synchronize()
            return bool(torch.equal(back, sent))
        except Exception as exc:  # noqa: BLE001 - a probe must never stop start-up
            logger.info("HPU pinned host memory unavailable (%s: %s); using pageable memory", type(exc).__name__, exc)
            return False

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        if not self.pin_available:
            return t
        try:
            return t if t.is_pinned() else t.pin_memory()
        except Exception as exc:  # noqa: BLE001 - forced pinning that fails: pageable, said once
            logger.warning("HPU: pinning a host buffer failed (%s: %s); pageable memory from now on",
                           type(exc).__name__, exc)
            self._pin_ok = False
            return t


PIN_ENV = "LMCACHE_HPU_PIN_MEMORY"
_PIN_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
               "off": False, "auto": None, "": None}


def pin_setting() -> bool | None:
    """LMCACHE_HPU_PIN_MEMORY: True (force pinned), False (force pageable), None (auto: probe)."""
    value = os.environ.get(PIN_ENV, "auto").strip().lower()
    if value not in _PIN_VALUES:
        raise ValueError(f"{PIN_ENV}={os.environ[PIN_ENV]!r} is not valid; accepted: auto (probe, the default), "
                         "1/true (pinned host buffers), 0/false (pageable host buffers)")
    return _PIN_VALUES[value]


def bridge_graph_compilations() -> int | None:
    """Graph compiles the Habana bridge has counted in this process (its runtime metrics API,
    `metric_global("graph_compilation")`), or None where the bridge has no such metric."""
    try:
        metrics = importlib.import_module("habana_frameworks.torch.hpu.metrics")
        stats = dict(metrics.metric_global("graph_compilation").stats())
        return int(stats["TotalNumber"])
    except Exception:  # noqa: BLE001 - an emulated or older bridge: not counted
        return None
