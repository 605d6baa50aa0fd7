"""The configurations `bench workload` compares, one entry each: vLLM alone, then LMCache
with one tier at a time (the slow tiers without the host-memory tier, so their hits are
theirs). A new tier is one more `Tier(...)` line.

Every LMCache configuration runs our connector class (LMCacheConnectorV1Dynamic, by module
path) with an explicit "async_load": false, except `disk-async` ("async_load": true): the
pair `disk` / `disk-async` is what the stall scenario compares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CHUNK_TOKENS = 256
# Disk and remote tiers still stage chunks in host memory while they move.
STAGING_GB = 0.5
SYNC_LOAD = {"async_load": False}
ASYNC_LOAD = {"async_load": True}
STALL_TIERS = ("disk", "disk-async")  # the stall scenario's two configurations


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
    connector_extra: dict = field(default_factory=lambda: dict(SYNC_LOAD))  # plain extra-config keys


def _base(**keys) -> dict:
    return {"chunk_size": CHUNK_TOKENS, **keys}


def _disk(directory: str) -> Callable[[TierContext], dict]:
    return lambda c: _base(local_cpu=False, max_local_cpu_size=STAGING_GB, local_disk=str(c.workdir / directory),
                           max_local_disk_size=c.disk_gb)


TIERS: list[Tier] = [
    Tier("vllm", "vLLM alone (prefix cache only)", lambda c: None),
    Tier("cpu", "LMCache host memory", lambda c: _base(local_cpu=True, max_local_cpu_size=c.host_gb)),
    Tier("disk", "LMCache disk", _disk("disk-tier")),
    Tier("disk-async", "LMCache disk, async load", _disk("disk-tier-async"), connector_extra=dict(ASYNC_LOAD)),
    Tier("redis", "LMCache Redis", lambda c: _base(local_cpu=False, max_local_cpu_size=STAGING_GB,
                                                   remote_url=c.service_url), service="redis"),
    Tier("lm", "LMCache lm:// server", lambda c: _base(local_cpu=False, max_local_cpu_size=STAGING_GB,
                                                       remote_url=c.service_url), service="lm"),
]
TIER_NAMES = [t.name for t in TIERS]


def select_tiers(names: str, with_stall: bool = False) -> list[Tier]:
    """`--tiers a,b,...` (always with the vLLM-alone baseline, and with the stall scenario's
    pair when it runs); unknown names are an error."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in TIER_NAMES]
    if unknown:
        raise SystemExit(f"--tiers: unknown {', '.join(unknown)}; accepted: {', '.join(TIER_NAMES)} (comma-separated)")
    wanted += ["vllm", *(STALL_TIERS if with_stall else ())]
    return [t for t in TIERS if t.name in wanted]
