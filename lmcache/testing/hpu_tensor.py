"""`hpu`-typed tensors backed by CPU memory (emulation only).

`EmulatedHpuTensor` is a wrapper tensor subclass: to torch and to the code under
test it is a genuine tensor on `torch.device("hpu", i)`, while the data lives in
a plain CPU tensor it holds. Every aten op on it goes through
`__torch_dispatch__`, which unwraps the operands, runs the op on CPU and wraps
the results again, so aliasing (views, in-place ops) is the CPU tensor's own.
An op that mixes hpu and cpu tensors fails as it would on a device: "Expected
all tensors to be on the same device". Copies (`copy_`, `.to()`) may cross
devices, and advanced indexing accepts cpu index tensors, as on CUDA.

Inside `torch.inference_mode()` torch hands composite ops (`.to()`, `reshape`,
...) to `__torch_dispatch__` whole instead of decomposing them first; they are
decomposed here, so `.to()` behaves as outside it (same device: the tensor
itself; another device: a copy). A wrapper is an inference tensor exactly when
the CPU tensor it holds is one, so views of normal tensors taken in inference
mode stay normal (torch shares their version counter), as on a real device.

Sizes and strides are asked of the held CPU tensor on every query
(dispatch_sizes_strides_policy="sizes"), so in-place metadata ops (`resize_`,
`out=` results, `transpose_`, `unsqueeze_`) stay truthful.

`HpuKernels` registers the factory and cross-device copy kernels for the HPU
dispatch key, so `torch.empty(..., device="hpu")`, `torch.zeros`,
`torch.randn`, `torch.tensor(..., device="hpu")` and `.to("hpu")` produce these
tensors.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lmcache.testing.op_signature import signature

aten = torch.ops.aten

_CPU = torch.device("cpu")

# Ops that only read metadata: answered from the held tensor directly (they are
# asked often, so they skip the general path) and not counted as device work.
_METADATA_OPS: dict[Any, Callable[..., Any]] = {
    aten.sym_size.default: lambda t: t.size(),
    aten.sym_size.int: lambda t, d: t.size(d),
    aten.sym_stride.default: lambda t: t.stride(),
    aten.sym_stride.int: lambda t, d: t.stride(d),
    aten.sym_numel.default: lambda t: t.numel(),
    aten.sym_storage_offset.default: lambda t: t.storage_offset(),
    aten.dim.default: lambda t: t.dim(),
    aten.is_contiguous.default: lambda t: t.is_contiguous(),
    aten.is_contiguous.memory_format: lambda t, mf: t.is_contiguous(memory_format=mf),
    aten.is_strides_like_format.default: aten.is_strides_like_format.default,
    aten.is_non_overlapping_and_dense.default: aten.is_non_overlapping_and_dense.default,
}

# Pure data movement that CPU kernels lack for 1-byte float (fp8) dtypes; a Gaudi
# moves those bytes, so the emulation runs them on uint8 views of the same memory.
_BYTE_MOVING_OPS = frozenset(
    {
        aten.index_copy_.default,
        aten.index_copy.default,
        aten.gather.default,
        aten.scatter_.src,
        aten.scatter.src,
    }
)

# Ops whose tensors may legitimately sit on different devices.
_CROSS_DEVICE_OPS = frozenset(
    {
        aten.copy_.default,
        aten._copy_from.default,
        aten._copy_from_and_resize.default,
        aten._to_copy.default,
        aten.copy.default,
    }
)

# Advanced indexing: the index tensors may be on cpu or on self's device.
_INDEXING_OPS = frozenset(
    {
        aten.index.Tensor,
        aten.index_put_.default,
        aten.index_put.default,
        aten._index_put_impl_.default,
        aten._unsafe_index.Tensor,
        aten._unsafe_index_put.default,
    }
)


class _OpHooks:
    """What the emulation wants to hear about ops (set while it is active)."""

    # called once per op on hpu tensors, with its signature (None for host reads)
    on_op: Callable[[tuple | None], None] | None = None
    # hpu device (index may be None) -> hpu device with a valid index
    resolve: Callable[[Any], torch.device] = staticmethod(
        lambda d: torch.device("hpu", 0 if d is None or d.index is None else d.index)
    )


hooks = _OpHooks()


def _mismatch(a: torch.device, b: torch.device, func: Any) -> RuntimeError:
    return RuntimeError(
        "Expected all tensors to be on the same device, but found at least two "
        f"devices, {a} and {b}! (in emulated HPU op {func})"
    )


class EmulatedHpuTensor(torch.Tensor):
    """A tensor on an emulated `hpu` device; `.cpu_data` is the backing CPU tensor."""

    cpu_data: torch.Tensor

    @staticmethod
    def __new__(cls, cpu_data: torch.Tensor, device: torch.device):
        if isinstance(cpu_data, EmulatedHpuTensor) or not cpu_data.is_cpu:
            raise RuntimeError(
                "HPU emulation bug: an emulated hpu tensor must hold a plain CPU "
                f"tensor, got a {type(cpu_data).__name__} on {cpu_data.device}"
            )
        inference = cpu_data.is_inference()
        if inference == torch.is_inference_mode_enabled():
            t = _make_wrapper(cls, cpu_data, device)
        else:
            with torch.inference_mode(inference):
                t = _make_wrapper(cls, cpu_data, device)
        t.cpu_data = cpu_data
        return t

    def __repr__(self, *, tensor_contents=None) -> str:
        body = repr(self.cpu_data)
        suffix = f", device='{self.device}')"
        return body[:-1] + suffix if body.endswith(")") else body + suffix

    def __reduce_ex__(self, protocol):
        raise TypeError("emulated hpu tensors cannot be pickled; call .cpu() first")

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        meta = _METADATA_OPS.get(func)
        if meta is not None:
            return meta(args[0].cpu_data, *args[1:])
        kwargs = kwargs or {}
        if _is_composite(func):
            # Composite ops arrive whole only where autograd is skipped (inference
            # mode); run on the held CPU tensors they would see cpu, not hpu.
            return func.decompose(*args, **kwargs)
        return _run_on_cpu(func, args, kwargs)

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            memo[id(self)] = wrap(self.cpu_data.clone(), self.device)
        return memo[id(self)]

    def __format__(self, format_spec: str) -> str:
        if self.dim() == 0:
            return self.item().__format__(format_spec)
        return object.__format__(self, format_spec)

    def data_ptr(self) -> int:
        """The address of the backing memory (a device address on a real HPU)."""
        return self.cpu_data.data_ptr()

    def tolist(self):
        if hooks.on_op is not None:
            hooks.on_op(None)
        return self.cpu_data.tolist()

    def numpy(self, *, force: bool = False):
        raise TypeError(
            f"can't convert {self.device} device type tensor to numpy. "
            "Use Tensor.cpu() to copy the tensor to host memory first."
        )


def _make_wrapper(cls, cpu_data: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.Tensor._make_wrapper_subclass(
        cls,
        cpu_data.size(),
        strides=cpu_data.stride(),
        storage_offset=cpu_data.storage_offset(),
        dtype=cpu_data.dtype,
        layout=cpu_data.layout,
        device=device,
        requires_grad=cpu_data.requires_grad,
        dispatch_sizes_strides_policy="sizes",
    )


def wrap(cpu_data: torch.Tensor, device: torch.device) -> EmulatedHpuTensor:
    return EmulatedHpuTensor(cpu_data, device)


_composite: dict[Any, bool] = {}


def _is_composite(func: Any) -> bool:
    """Whether `func` has a CompositeImplicitAutograd kernel (cached per op)."""
    known = _composite.get(func)
    if known is None:
        known = _composite[func] = bool(func._can_decompose())
    return known


class _Unwrapper:
    """Unwraps operands, remembering which devices were seen."""

    __slots__ = ("hpu_device", "cpu_seen", "pairs", "plain")

    def __init__(self):
        self.hpu_device: torch.device | None = None
        self.cpu_seen = False
        self.pairs: list[tuple[torch.Tensor, EmulatedHpuTensor]] = []
        self.plain: list[torch.Tensor] = []

    def one(self, a: Any, func: Any, strict: bool) -> Any:
        if isinstance(a, EmulatedHpuTensor):
            if self.hpu_device is None:
                self.hpu_device = a.device
            elif strict and a.device != self.hpu_device:
                raise _mismatch(self.hpu_device, a.device, func)
            self.pairs.append((a.cpu_data, a))
            return a.cpu_data
        if isinstance(a, torch.Tensor):
            # Like CUDA, a 0-dim cpu tensor may join an op as a scalar.
            if a.dim() > 0:
                self.cpu_seen = True
            self.plain.append(a)
            return a
        if isinstance(a, (list, tuple)) and a and any(
            isinstance(x, torch.Tensor) for x in a
        ):
            return type(a)(self.one(x, func, strict) for x in a)
        return a


def _check_indexing(func, args, kwargs) -> None:
    """self/values share a device; indices may be on cpu or on self's device."""
    self_t = args[0]
    self_dev = self_t.device
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    for idx in indices or ():
        if isinstance(idx, torch.Tensor) and idx.device != self_dev and idx.device.type != "cpu":
            raise RuntimeError(
                "indices should be either on cpu or on the same device as the indexed "
                f"tensor ({self_dev}) (in emulated HPU op {func})"
            )
    values = args[2] if len(args) > 2 else kwargs.get("values")
    if isinstance(values, torch.Tensor) and values.dim() > 0 and values.device != self_dev:
        raise _mismatch(self_dev, values.device, func)


def _run_on_cpu(func, args, kwargs):
    cross_device = func in _CROSS_DEVICE_OPS
    indexing = func in _INDEXING_OPS
    if indexing:
        _check_indexing(func, args, kwargs)
    u = _Unwrapper()
    strict = not (cross_device or indexing)
    cargs = [u.one(a, func, strict) for a in args]
    ckwargs = {k: u.one(v, func, strict) for k, v in kwargs.items()} if kwargs else kwargs

    out_device = u.hpu_device
    if cross_device:  # a copy's result lives where its first operand does
        out_device = args[0].device if isinstance(args[0], EmulatedHpuTensor) else None
    dev = ckwargs.get("device") if ckwargs else None
    if dev is not None:
        dev = torch.device(dev)
        if dev.type == "hpu":
            out_device = hooks.resolve(dev)
            ckwargs["device"] = _CPU
        else:
            out_device = None
    if strict and u.cpu_seen and u.hpu_device is not None:
        raise _mismatch(u.hpu_device, _CPU, func)
    if hooks.on_op is not None:
        hooks.on_op(signature(func, args, kwargs))

    if func in _BYTE_MOVING_OPS and _has_fp8(cargs):
        out = _run_on_bytes(func, cargs, ckwargs)
    else:
        out = func(*cargs, **ckwargs)
    return _rewrap(out, u, out_device)


def _is_fp8(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.dtype.itemsize == 1


def _has_fp8(args) -> bool:
    return any(_is_fp8(a) for a in args)


def _run_on_bytes(func, args, kwargs):
    originals = {}

    def as_bytes(a):
        if _is_fp8(a):
            v = a.view(torch.uint8)
            originals[id(v)] = a
            return v
        return a

    byte_args = [as_bytes(a) for a in args]
    out = func(*byte_args, **kwargs)
    if id(out) in originals:  # in-place: hand back the argument itself
        return originals[id(out)]
    return out.view(args[0].dtype) if out.dtype == torch.uint8 and _is_fp8(args[0]) else out


def _rewrap(out: Any, u: _Unwrapper, device: torch.device | None) -> Any:
    if isinstance(out, torch.Tensor):
        for inner, wrapper in u.pairs:
            if out is inner:  # in-place / out= ops hand back their argument
                return wrapper
        for plain in u.plain:
            if out is plain:
                return plain
        return wrap(out, device) if device is not None else out
    if isinstance(out, (list, tuple)):
        return type(out)(_rewrap(o, u, device) for o in out)
    return out


# -- kernels for the HPU dispatch key ----------------------------------------


def _target(device: torch.device | None) -> torch.device:
    return hooks.resolve(device)


def _empty_memory_format(
    size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None
):
    cpu = torch.empty(size, dtype=dtype, layout=layout, memory_format=memory_format)
    return wrap(cpu, _target(device))


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    cpu = torch.empty_strided(size, stride, dtype=dtype, layout=layout)
    return wrap(cpu, _target(device))


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.cpu_data if isinstance(t, EmulatedHpuTensor) else t


def _copy_from(self, dst, non_blocking=False):
    _plain(dst).copy_(_plain(self))
    return dst


def _copy_from_and_resize(self, dst):
    _plain(dst).resize_(self.shape).copy_(_plain(self))
    return dst


class HpuKernels:
    """The aten kernels registered for the HPU key while the emulation is on."""

    def __init__(self):
        self._lib: torch.library.Library | None = None

    def register(self) -> None:
        lib = torch.library.Library("aten", "IMPL")
        lib.impl("empty.memory_format", _empty_memory_format, "HPU")
        lib.impl("empty_strided", _empty_strided, "HPU")
        lib.impl("_copy_from", _copy_from, "HPU")
        lib.impl("_copy_from_and_resize", _copy_from_and_resize, "HPU")
        self._lib = lib

    def unregister(self) -> None:
        if self._lib is not None:
            self._lib._destroy()
            self._lib = None
