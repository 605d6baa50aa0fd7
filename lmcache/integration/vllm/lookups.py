"""A lookup's answer as a value: how many prefix tokens LMCache holds, and where."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LookupAnswer:
    hit: int = 0  # prefix tokens every rank holds
    # which tier holds which part of the hit, in prefix order: ((tier, tokens), ...);
    # None: the workers have the host-memory tier only
    runs: tuple[tuple[str, int], ...] | None = None

    @classmethod
    def of(cls, hit: int, runs=None) -> "LookupAnswer":
        hit = int(hit)
        if hit <= 0:
            return cls()
        return cls(hit, None if runs is None else tuple((str(tier), int(n)) for tier, n in runs))

    def wire_runs(self) -> list | None:
        """The runs as the lookup channel's JSON frame carries them."""
        return None if self.runs is None else [[tier, n] for tier, n in self.runs]

    def needs_slow_tier(self, start: int, count: int) -> bool:
        """Whether tokens [start, start + count) lie partly outside host memory."""
        pos, end = 0, start + count
        for tier, n in self.runs or ():
            if tier != "cpu" and pos < end and pos + n > start:
                return True
            pos += n
        return False
