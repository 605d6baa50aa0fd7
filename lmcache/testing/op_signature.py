"""The key a Gaudi compiles a graph (lazy mode) or recipe (eager mode) for, as the HPU
emulation and `shape_log.ShapeLog` record it (test support)."""

from __future__ import annotations

from typing import Any

import torch


def signature(func: Any, args: tuple, kwargs: dict | None) -> tuple:
    """(op name, per argument: a tensor's (device type, shape, dtype), else the value itself).

    On a Gaudi each new such signature is a graph compile (lazy mode) or a new recipe
    (eager mode); the emulation records them as a stand-in. Storage offsets and the
    values held are not part of it, as they are not part of a graph."""
    items = [_arg_signature(a) for a in args]
    if kwargs:
        items.extend((k, _arg_signature(v)) for k, v in sorted(kwargs.items()))
    return (str(func.overloadpacket.__name__), *items)


def _arg_signature(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (a.device.type, tuple(a.shape), a.dtype)
    if isinstance(a, (list, tuple)):
        return tuple(_arg_signature(x) for x in a)
    if isinstance(a, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format)):
        return a
    return type(a).__name__
