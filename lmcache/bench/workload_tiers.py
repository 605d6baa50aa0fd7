"""The configurations `bench workload` compares, one entry each: vLLM alone, then LMCache
with one tier at a time (the slow tiers without the host-memory tier, so their hits are
theirs). A new tier is one more `Tier(...)` line."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CHUNK_TOKENS = 256
# Disk and remote tiers still stage chunks in host memory while they move.
STAGING_GB = 0.5


@dataclass(frozen=True)
class TierContext:
    workdir: Path
    host_gb: float
    disk_gb: float
    service_url: str | None = None  # the Redis / lm:// server started for this tier


@dataclass(frozen=True)
class Tier:
    name: str
    label: str
    settings: Callable[[TierContext], dict | None]  # LMCache config keys; None: no connector
    service: str | None = None  # "redis" or "lm": a server started for this tier
    unavailable: Callable[[], str | None] = lambda: None  # why it cannot run here, or None

    @property
    def is_baseline(self) -> bool:
        return self.name == "vllm"


def _lm_missing() -> str | None:
    try:
        found = importlib.util.find_spec("lmcache.v1.server") is not None
    except ModuleNotFoundError:
        found = False
    return None if found else "lmcache.v1.server does not exist in this tree yet"


def _base(**keys) -> dict:
    return {"chunk_size": CHUNK_TOKENS, **keys}


TIERS: list[Tier] = [
    Tier("vllm", "vLLM alone (prefix cache only)", lambda c: None),
    Tier("cpu", "LMCache host memory", lambda c: _base(local_cpu=True, max_local_cpu_size=c.host_gb)),
    Tier("disk", "LMCache disk", lambda c: _base(local_cpu=False, max_local_cpu_size=STAGING_GB,
                                                 local_disk=str(c.workdir / "disk-tier"), max_local_disk_size=c.disk_gb)),
    Tier("redis", "LMCache Redis", lambda c: _base(local_cpu=False, max_local_cpu_size=STAGING_GB,
                                                   remote_url=c.service_url), service="redis"),
    Tier("lm", "LMCache lm:// server", lambda c: _base(local_cpu=False, max_local_cpu_size=STAGING_GB,
                                                       remote_url=c.service_url), service="lm", unavailable=_lm_missing),
]
TIER_NAMES = [t.name for t in TIERS]


def select_tiers(names: str) -> list[Tier]:
    """`--tiers a,b,...` (always with the vLLM-alone baseline first); unknown names are an error."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in TIER_NAMES]
    if unknown:
        raise SystemExit(f"--tiers: unknown {', '.join(unknown)}; accepted: {', '.join(TIER_NAMES)} (comma-separated)")
    if "vllm" not in wanted:
        wanted.insert(0, "vllm")
    return [t for t in TIERS if t.name in wanted]
