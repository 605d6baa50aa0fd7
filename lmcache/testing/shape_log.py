"""Distinct op signatures on hpu tensors, recorded on a real Gaudi or on the emulation.

`ShapeLog` is a TorchDispatchMode: while it is active, every aten op with an `hpu`
tensor among its arguments is recorded as (op, per argument: device type, shape and
dtype, or the value itself) - the key a Gaudi compiles a new graph (lazy mode) or
recipe (eager mode) for. `python -m lmcache bench connector --device hpu` counts them
over a run of varied batch sizes. On a real card the bridge's own compile counter
(lmcache.platforms.hpu.bridge_graph_compilations) is the ground truth; this log names
the ops behind it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmcache.testing.hpu_tensor import _METADATA_OPS
from lmcache.testing.op_signature import signature

aten = torch.ops.aten
# metadata queries and allocations: no graph, no recipe
_NOT_COMPILED = frozenset(_METADATA_OPS) | {aten.empty.memory_format, aten.empty_strided.default}


class ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.signatures: set = set()
        self.view_ops: set[str] = set()   # ops that only make views (no data moved)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _NOT_COMPILED and (_touches_hpu(args) or _touches_hpu(tuple(kwargs.values()))):
            sig = signature(func, args, kwargs)
            self.signatures.add(sig)
            if func.is_view:
                self.view_ops.add(sig[0])
        return func(*args, **kwargs)

    def per_op(self, views: bool = True) -> dict[str, int]:
        """Distinct signatures per op name (views=False: only ops that move or compute data)."""
        counts: dict[str, int] = {}
        for op, *_ in self.signatures:
            if views or op not in self.view_ops:
                counts[op] = counts.get(op, 0) + 1
        return dict(sorted(counts.items()))


def _touches_hpu(values: Any) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor) and v.device.type == "hpu":
            return True
        if isinstance(v, torch.device) and v.type == "hpu":  # a copy to the device
            return True
        if isinstance(v, (list, tuple)) and _touches_hpu(v):
            return True
    return False
