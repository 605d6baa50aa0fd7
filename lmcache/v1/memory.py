"""Host memory objects that hold KV for a chunk of tokens, and the pool they come from.

A MemoryObj is one contiguous host tensor:
  KV_2LTD     [2, num_layers, num_tokens, num_heads * head_size]  (K plane, V plane)
  KV_MLA_FMT  [1, num_layers, num_tokens, head_size]              (MLA latent, no K/V split)
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass

import torch

from lmcache.platforms import current_platform

logger = logging.getLogger(__name__)


class MemoryFormat(enum.Enum):
    KV_2LTD = "kv_2ltd"
    KV_MLA_FMT = "kv_mla"

    @property
    def num_planes(self) -> int:
        return 1 if self is MemoryFormat.KV_MLA_FMT else 2


@dataclass(frozen=True)
class MemoryObjMetadata:
    shape: torch.Size
    dtype: torch.dtype
    fmt: MemoryFormat

    @property
    def num_tokens(self) -> int:
        return int(self.shape[2])

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def check_shape(shape: torch.Size, fmt: MemoryFormat) -> torch.Size:
    shape = torch.Size(shape)
    if len(shape) != 4 or shape[0] != fmt.num_planes:
        raise ValueError(
            f"memory object shape {tuple(shape)} does not fit format {fmt.name}: "
            f"expected [{fmt.num_planes}, num_layers, num_tokens, hidden]"
        )
    return shape


class MemoryObj:
    """A chunk's KV in host memory. Readers hold it (ref_count_up) so eviction skips it."""

    __slots__ = ("tensor", "metadata", "stored_key", "_pool", "_readers", "_lock")

    def __init__(self, tensor: torch.Tensor, fmt: MemoryFormat, pool: "HostMemoryPool | None" = None):
        if not tensor.is_contiguous():
            raise ValueError("a memory object's tensor must be contiguous")
        check_shape(tensor.shape, fmt)
        self.tensor = tensor
        self.metadata = MemoryObjMetadata(tensor.shape, tensor.dtype, fmt)
        self.stored_key = None  # the key the storage manager holds it under (checked on every read)
        self._pool = pool
        self._readers = 0
        self._lock = threading.Lock()

    @property
    def num_tokens(self) -> int:
        return self.metadata.num_tokens

    @property
    def nbytes(self) -> int:
        return self.metadata.nbytes

    @property
    def fmt(self) -> MemoryFormat:
        return self.metadata.fmt

    def ref_count_up(self) -> None:
        with self._lock:
            self._readers += 1

    def ref_count_down(self) -> None:
        with self._lock:
            if self._readers == 0:
                raise RuntimeError("ref_count_down() without a matching ref_count_up()")
            self._readers -= 1

    @property
    def in_use(self) -> bool:
        return self._readers > 0

    def free(self) -> None:
        """Give the bytes back to the pool (idempotent). The pool may hand the same
        buffer out again, so nobody may touch `.tensor` after this."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.release(self.nbytes)
            pool.recycle(self.tensor)

    def __repr__(self) -> str:
        return f"MemoryObj({self.fmt.name}, shape={tuple(self.metadata.shape)}, dtype={self.metadata.dtype})"


class HostMemoryPool:
    """Hands out memory objects within a byte budget.

    Pinned where the platform can pin (faster device copies); plain pageable
    memory otherwise. Running out returns None: the caller skips that store.

    Freed buffers are kept for reuse by the next allocation of the same byte size
    (fresh host memory costs page faults, pinned memory a slow registration); kept
    buffers plus handed-out bytes never exceed the budget, the oldest kept ones
    are dropped first.
    """

    def __init__(self, budget_bytes: int, pin: bool | None = None):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._pin = pin
        self._used = 0
        self._lock = threading.Lock()
        self._idle: dict[int, list[torch.Tensor]] = {}  # nbytes -> flat uint8 buffers
        self._idle_bytes = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self._used

    def fits(self, nbytes: int) -> bool:
        """Whether an object of `nbytes` could be allocated now."""
        return self.free_bytes >= nbytes

    def _should_pin(self) -> bool:
        if self._pin is None:
            self._pin = current_platform().pin_available
        return self._pin

    def allocate(self, shape, dtype: torch.dtype, fmt: MemoryFormat) -> MemoryObj | None:
        shape = check_shape(torch.Size(shape), fmt)
        nbytes = shape.numel() * dtype.itemsize
        with self._lock:
            if self._used + nbytes > self.budget_bytes:
                return None
            self._used += nbytes
            reused = self._take_idle(nbytes)
            if reused is None:
                self._trim_idle(self.budget_bytes - self._used)
        try:
            if reused is not None:
                tensor = reused.view(dtype).view(shape)
            else:
                flat = torch.empty(nbytes, dtype=torch.uint8)
                if self._should_pin():
                    flat = current_platform().pin(flat)
                tensor = flat.view(dtype).view(shape)
        except RuntimeError as exc:  # the host itself is out of memory
            self.release(nbytes)
            logger.warning("cannot allocate %d bytes of host memory: %s", nbytes, exc)
            return None
        return MemoryObj(tensor, fmt, pool=self)

    # -- reuse of freed buffers (caller holds self._lock) ------------------
    def _take_idle(self, nbytes: int) -> torch.Tensor | None:
        bucket = self._idle.get(nbytes)
        if not bucket:
            return None
        self._idle_bytes -= nbytes
        buf = bucket.pop()
        if not bucket:
            del self._idle[nbytes]
        return buf

    def _trim_idle(self, keep_bytes: int) -> None:
        """Drop kept buffers (oldest sizes first) until at most keep_bytes remain."""
        while self._idle_bytes > max(0, keep_bytes) and self._idle:
            size = next(iter(self._idle))
            bucket = self._idle[size]
            bucket.pop(0)
            self._idle_bytes -= size
            if not bucket:
                del self._idle[size]

    def recycle(self, tensor: torch.Tensor) -> None:
        """Keep a freed object's buffer for reuse (called by MemoryObj.free)."""
        flat = tensor.view(torch.uint8).reshape(-1)
        nbytes = flat.numel()
        with self._lock:
            if self._used + self._idle_bytes + nbytes > self.budget_bytes:
                self._trim_idle(self.budget_bytes - self._used - nbytes)
            if self._used + self._idle_bytes + nbytes <= self.budget_bytes:
                self._idle.setdefault(nbytes, []).append(flat)
                self._idle_bytes += nbytes

    @property
    def idle_bytes(self) -> int:
        """Bytes of freed buffers kept for reuse (reclaimable; not counted as used)."""
        return self._idle_bytes

    def clear_idle(self) -> None:
        with self._lock:
            self._trim_idle(0)

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._used = max(0, self._used - nbytes)

    def free(self, obj: MemoryObj) -> None:
        obj.free()
