"""Bucket sizes for the slot lists of HPU gathers and scatters (static shapes).

On Gaudi every new tensor shape is a new graph (lazy mode) or a new recipe (eager
mode): a compile that costs far more than the copy. A step's slot count changes
every step, so each batched transfer pads its slot list up to the next bucket
size and a long run compiles at most one graph per bucket and op.

Setting (config key `hpu_slot_buckets`, the factory's `slot_buckets`):
  "auto"         powers of two from 256 tokens (the default chunk size) up, as far
                 as the batches go: 256, 512, 1024, ...
  "off"          no padding: every batch its own shape (the CUDA-style path)
  sizes          ascending token counts, e.g. [256, 1024, 4096] or "256,1024,4096";
                 a batch above the largest pads to that size times a power of two
                 (said once in the log: list a larger size to avoid it).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

logger = logging.getLogger(__name__)

AUTO_MIN_BUCKET = 256
ACCEPTED = ('"auto" (powers of two from 256 tokens), "off" (no padding), or ascending positive token counts '
            '(a list, or a comma-separated string such as "256,1024,4096")')


class SlotBuckets:
    """The bucket a batch of n slots pads to."""

    def __init__(self, sizes: Sequence[int] = ()):
        self.sizes = tuple(int(s) for s in sizes)  # () = powers of two from AUTO_MIN_BUCKET
        self._warned = False

    def size_for(self, n: int) -> int:
        if n <= 0:
            raise ValueError(f"a batch has at least one slot, got {n}")
        if not self.sizes:
            return max(AUTO_MIN_BUCKET, 1 << (n - 1).bit_length())
        for size in self.sizes:
            if n <= size:
                return size
        largest = self.sizes[-1]
        if not self._warned:
            self._warned = True
            logger.warning("HPU batch of %d slots is above the largest hpu_slot_buckets size %d: padded to %d x a "
                           "power of two (a new graph per size); list a larger size in hpu_slot_buckets",
                           n, largest, largest)
        return largest << (-(-n // largest) - 1).bit_length()

    def describe(self) -> str:
        return ",".join(map(str, self.sizes)) if self.sizes else f"powers of two from {AUTO_MIN_BUCKET}"

    def __repr__(self) -> str:
        return f"SlotBuckets({self.describe()})"


def parse_slot_buckets(value: Any) -> str | tuple[int, ...]:
    """A config value -> "auto", "off" or ascending sizes; ValueError naming what is accepted."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "", "default"):
            return "auto"
        if text in ("off", "none", "false", "0"):
            return "off"
        value = [v for v in text.replace(" ", "").strip("[]").split(",") if v]
    if isinstance(value, (bool, int, float)) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"hpu_slot_buckets={value!r}: accepted: {ACCEPTED}")
    try:
        sizes = tuple(_positive(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"hpu_slot_buckets={value!r}: accepted: {ACCEPTED}") from None
    if list(sizes) != sorted(set(sizes)):
        raise ValueError(f"hpu_slot_buckets={value!r}: sizes must be strictly ascending; accepted: {ACCEPTED}")
    return sizes


def _positive(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError
    n = int(v)
    if n != float(v) or n <= 0:
        raise ValueError
    return n


def slot_buckets(setting: Any) -> SlotBuckets | None:
    """The buckets for a setting (see module doc); None = no padding."""
    if isinstance(setting, SlotBuckets):
        return setting
    parsed = parse_slot_buckets(setting)
    if parsed == "off":
        return None
    return SlotBuckets(() if parsed == "auto" else parsed)
