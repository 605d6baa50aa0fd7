"""Stand-ins for `torch.hpu` and the Habana bridge modules (emulation only).

They expose what lmcache and the tests ask of a Gaudi bridge: device count and
selection, synchronize (counted), Stream/Event objects, `mark_step()` (counted)
and the lazy-mode query. Each module carries `__lmcache_emulation__ = True` and a
proper `__spec__`, so `importlib.util.find_spec("habana_frameworks")` finds it.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import logging
import threading
import types
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

import torch

logger = logging.getLogger(__name__)

EMULATION_MARK = "__lmcache_emulation__"


@dataclass
class HpuCounters:
    """What the emulated device saw since activation (or the last reset)."""

    mark_steps: int = 0  # htcore.mark_step() calls (graph breaks)
    synchronizes: int = 0  # torch.hpu.synchronize() calls
    stream_synchronizes: int = 0  # Stream.synchronize() calls
    event_synchronizes: int = 0  # Event.synchronize() calls
    ops: int = 0  # aten ops run on emulated hpu tensors (approximate under threads)
    ops_since_mark_step: int = 0  # lazy mode: ops waiting for the next graph break
    # distinct (op, argument shapes and dtypes, other arguments) run on hpu tensors: the
    # emulation's stand-in for graph compiles (lazy mode) / new recipes (eager mode)
    signatures: set = field(default_factory=set)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, set() if f.name == "signatures" else 0)

    def signatures_per_op(self) -> dict[str, int]:
        """How many distinct signatures each op ran with (op name -> count)."""
        counts: dict[str, int] = {}
        for op, *_ in self.signatures:
            counts[op] = counts.get(op, 0) + 1
        return dict(sorted(counts.items()))

    def shapes_per_call(self) -> dict[tuple, int]:
        """Distinct shape sets per (op, everything but the shapes): how many compiles one op of
        the code under test caused (its arguments' dtypes, devices and other values fixed)."""
        counts: dict[tuple, int] = {}
        for op, *args in self.signatures:
            key = (op, *_without_shapes(tuple(args)))
            counts[key] = counts.get(key, 0) + 1
        return counts


def _without_shapes(value):
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], tuple) and isinstance(value[2], torch.dtype):
        return (value[0], len(value[1]), value[2])  # a tensor: device type, rank, dtype
    if isinstance(value, tuple):
        return tuple(_without_shapes(v) for v in value)
    return value


class DeviceState:
    """The emulated device's mutable state, shared by all stand-in modules."""

    def __init__(self, device_count: int, lazy: bool):
        self.device_count = device_count
        self.lazy = lazy
        self._index = 0
        # Once attached, the C++ device guard holds the current index, so C++
        # device guards and torch.hpu.set_device agree.
        self.guard: Any = None
        self.counters = HpuCounters()
        self._lock = threading.Lock()
        self._streams = threading.local()
        self._warned_eager_mark_step = False

    def attach_guard(self, guard: Any) -> None:
        self.guard = guard
        guard.set_device_count(self.device_count)
        guard.set_device(self._index)

    @property
    def current_index(self) -> int:
        return self.guard.get_device() if self.guard is not None else self._index

    @current_index.setter
    def current_index(self, index: int) -> None:
        self._index = index
        if self.guard is not None:
            self.guard.set_device(index)

    def count_op(self, signature: tuple | None = None) -> None:
        c = self.counters
        c.ops += 1
        if self.lazy:
            c.ops_since_mark_step += 1
        if signature is not None:
            c.signatures.add(signature)

    def mark_step(self) -> None:
        with self._lock:
            self.counters.mark_steps += 1
            self.counters.ops_since_mark_step = 0
        if not self.lazy and not self._warned_eager_mark_step:
            self._warned_eager_mark_step = True
            logger.warning("emulated HPU: mark_step() called outside lazy mode is a no-op")

    def synchronize(self) -> None:
        with self._lock:
            self.counters.synchronizes += 1

    def index_of(self, device: Any) -> int:
        if device is None:
            return self.current_index
        if isinstance(device, int):
            index = device
        else:
            dev = torch.device(device)
            if dev.type != "hpu":
                raise ValueError(f"expected an hpu device, got {dev}")
            index = self.current_index if dev.index is None else dev.index
        if not 0 <= index < self.device_count:
            raise RuntimeError(
                f"invalid hpu device index {index}: the emulation has "
                f"{self.device_count} device(s) (0..{self.device_count - 1})"
            )
        return index

    def stream_stack(self) -> list:
        stack = getattr(self._streams, "stack", None)
        if stack is None:
            stack = self._streams.stack = []
        return stack


def _spec(name: str, package: bool) -> importlib.machinery.ModuleSpec:
    return importlib.machinery.ModuleSpec(name, loader=None, is_package=package)


def _module(name: str, doc: str, package: bool = False) -> types.ModuleType:
    mod = types.ModuleType(name, doc)
    mod.__spec__ = _spec(name, package)
    if package:
        mod.__path__ = []
    setattr(mod, EMULATION_MARK, True)
    return mod


def make_torch_hpu(state: DeviceState) -> types.ModuleType:
    """The stand-in registered as `torch.hpu`."""
    mod = _module("torch.hpu", "Emulated torch.hpu (lmcache.testing): CPU memory, not Gaudi.")

    class Event:
        """Stand-in for torch.hpu.Event: work is done in program order on CPU."""

        def __init__(self, enable_timing: bool = False, **_: Any):
            self.recorded = False

        def record(self, stream: Any = None) -> None:
            self.recorded = True

        def wait(self, stream: Any = None) -> None:
            pass

        def query(self) -> bool:
            return True

        def synchronize(self) -> None:
            with state._lock:
                state.counters.event_synchronizes += 1

        def elapsed_time(self, end: "Event") -> float:
            return 0.0

        def __repr__(self) -> str:
            return f"<emulated torch.hpu.Event recorded={self.recorded} id={id(self):#x}>"

    class Stream:
        """Stand-in for torch.hpu.Stream (ordering is program order on CPU)."""

        def __init__(self, device: Any = None, priority: int = 0, **_: Any):
            self.device = torch.device("hpu", state.index_of(device))
            self.priority = priority

        def wait_stream(self, other: Any) -> None:
            pass

        def wait_event(self, event: Any) -> None:
            pass

        def record_event(self, event: Any = None) -> Event:
            event = event if event is not None else Event()
            event.record(self)
            return event

        def query(self) -> bool:
            return True

        def synchronize(self) -> None:
            with state._lock:
                state.counters.stream_synchronizes += 1

        def __repr__(self) -> str:
            return f"<emulated torch.hpu.Stream device={self.device} id={id(self):#x}>"

    default_streams: dict[int, Stream] = {}

    def default_stream(device: Any = None) -> Stream:
        index = state.index_of(device)
        if index not in default_streams:
            default_streams[index] = Stream(index)
        return default_streams[index]

    def current_stream(device: Any = None) -> Stream:
        stack = state.stream_stack()
        return stack[-1] if stack else default_stream(device)

    @contextlib.contextmanager
    def stream(s: Any) -> Iterator[Any]:
        if s is None:
            yield s
            return
        stack = state.stream_stack()
        stack.append(s)
        try:
            yield s
        finally:
            stack.pop()

    def set_device(device: Any) -> None:
        state.current_index = state.index_of(device)

    def synchronize(device: Any = None) -> None:
        state.index_of(device)
        state.synchronize()

    mod.is_available = lambda: True
    mod.is_initialized = lambda: True
    mod.init = lambda: None
    mod._lazy_init = lambda: None  # torch calls it before the first hpu allocation
    mod.device_count = lambda: state.device_count
    mod.current_device = lambda: state.current_index
    mod.set_device = set_device
    mod.synchronize = synchronize
    mod.get_device_name = lambda device=None: "GAUDI (emulated on CPU by lmcache.testing)"
    mod.Stream = Stream
    mod.Event = Event
    mod.current_stream = current_stream
    mod.default_stream = default_stream
    mod.stream = stream
    return mod


def make_habana_modules(state: DeviceState, torch_hpu: types.ModuleType) -> dict[str, types.ModuleType]:
    """`habana_frameworks`, `.torch`, `.torch.core`, `.torch.hpu`, `.torch.utils(.internal)`."""
    note = "Emulated Habana bridge (lmcache.testing): proves placement and sync, not Gaudi speed."
    root = _module("habana_frameworks", note, package=True)
    pt = _module("habana_frameworks.torch", note, package=True)
    core = _module("habana_frameworks.torch.core", note)
    utils = _module("habana_frameworks.torch.utils", note, package=True)
    internal = _module("habana_frameworks.torch.utils.internal", note)

    def mark_step(device_str: str = "", sync: bool = False) -> None:
        state.mark_step()
        if sync:
            state.synchronize()

    core.mark_step = mark_step
    internal.is_lazy = lambda: state.lazy
    root.torch = pt
    pt.core = core
    pt.utils = utils
    pt.hpu = torch_hpu
    utils.internal = internal
    return {
        m.__name__: m for m in (root, pt, core, utils, internal)
    } | {"habana_frameworks.torch.hpu": torch_hpu}
