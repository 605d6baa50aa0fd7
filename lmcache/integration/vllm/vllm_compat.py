"""What the installed vLLM offers, found once, in one place.

Supported: vLLM 0.26.0 (what vllm-gaudi v0.26.0 is built on) through 0.34.0 (the
newest tested), and the vLLM main commits vllm-gaudi tracks between them. The rest
of the package asks this module, never vLLM's version string: each optional piece
of vLLM's connector interface is detected by what the installed vLLM has (a module,
a symbol, a hook on `KVConnectorBase_V1`, a field, a method vLLM's own wrapper
defines). The version is read only for the supported range itself: below 0.26 the
connector refuses to start with one line (`require_supported`); above the newest
tested release it runs and says once that it is untested there.

Each feature that is missing degrades to something that still caches correctly;
`startup_line` says in one line what a connector cannot do on this vLLM (the
connector logs it once per process; `python -m lmcache doctor` prints it too).
Which release brought each feature (`Feature.since`) is read from the released
wheels (docs/vllm.md, "Supported vLLM") and only ever shown, never compared.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import logging
import re
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_FLOOR = "0.26.0"
NEWEST_TESTED = "0.34.0"
SUPPORTED_RANGE = f"{SUPPORTED_FLOOR} to {NEWEST_TESTED}"

# Connector kinds, as the startup line and the doctor name them.
OURS = "lmcache"  # our class: kv_connector "lmcache", LMCacheConnectorV1Dynamic, LMCacheMPConnector
WRAPPER = "LMCacheConnectorV1"  # vLLM's wrapper around our LMCacheConnectorV1Impl
KINDS = (OURS, WRAPPER)

_BASE = "vllm.distributed.kv_transfer.kv_connector.v1.base"
_WRAPPER_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector"


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is older than the supported range."""


def _optional(module: str, name: str | None = None) -> Any:
    """`module` (or its attribute `name`), or None when this vLLM has no such thing."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return mod if name is None else getattr(mod, name, None)


# -- symbols with a stand-in where vLLM lacks them --------------------------------------
# `CacheHitSource`, `MEDIA` and `KVCacheAccess` are looked up on first use (module
# __getattr__), so that importing this module imports no vLLM (the doctor reads the
# supported range without starting vLLM).

class _StandInCacheHitSource(str, enum.Enum):
    """vLLM's CacheHitSource members we use (vLLM before 0.32 has none; never reported there)."""

    HOST = "host"
    DISK = "disk"
    EXTERNAL_UNSPECIFIED = "external_unspecified"


def media_of(kv_events) -> dict[str, tuple[str, str]]:
    """(medium, locality) per LMCache tier, in the names `kv_events` (vLLM's module) has:
    "CPU", and "STORAGE" (0.27+) for the disk and remote tiers; vLLM 0.26 had "FS" and
    "OBJ" instead of "STORAGE"."""
    storage = getattr(kv_events, "MEDIUM_STORAGE", None)
    return {
        "cpu": (getattr(kv_events, "MEDIUM_CPU", "CPU"), "LOCAL"),
        "disk": (storage or getattr(kv_events, "MEDIUM_FS", "FS"), "LOCAL"),
        "remote": (storage or getattr(kv_events, "MEDIUM_OBJ", "OBJ"), "REMOTE"),
    }


_LAZY = {
    # vLLM 0.32+'s enum, or the stand-in
    "CacheHitSource": lambda: _optional("vllm.v1.metrics.cache_hit_source", "CacheHitSource")
    or _StandInCacheHitSource,
    "MEDIA": lambda: media_of(_optional("vllm.distributed.kv_events")),
    # vLLM 0.34+: how a connector reaches the device KV cache (None before)
    "KVCacheAccess": lambda: _optional("vllm.config.kv_transfer", "KVCacheAccess"),
}


def __getattr__(name: str):
    if name in _LAZY:
        value = _LAZY[name]()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- features -------------------------------------------------------------------------

@dataclass(frozen=True)
class Feature:
    key: str
    present: bool
    since: str  # the first release that has it (shown, never compared)
    kinds: tuple[str, ...]  # the connector kinds it matters to
    without: str  # what happens on a vLLM without it
    lost: bool = True  # False: nothing a user would notice is lost (handled another way)


@dataclass(frozen=True)
class VllmFeatures:
    version: str
    hit_sources: bool  # vllm.v1.metrics.cache_hit_source + get_external_cache_hit_sources
    medium_storage: bool  # kv_events.MEDIUM_STORAGE
    stats_to_dict: bool  # KVConnectorStats.to_dict
    pending_block_frees: bool  # KVConnectorBase_V1.has_pending_block_frees
    wrapper_binds_metadata: bool  # vLLM's LMCacheConnectorV1 forwards bind_connector_metadata
    sleep_hooks: bool  # KVConnectorBase_V1.unregister_kv_caches / restore_kv_caches
    wrapper_sleep_hooks: bool  # vLLM's wrapper forwards them (no release does)
    may_load_async: bool  # KVConnectorBase_V1.may_load_async (--max-num-inflight-kv-loads)
    kv_cache_access: bool  # KVConnectorBase_V1.kv_cache_access + vllm.config.kv_transfer.KVCacheAccess
    resumed_req_ids: bool  # CachedRequestData.resumed_req_ids (0.34: resumed requests come as new ones)

    def table(self) -> list[Feature]:
        return [
            Feature("hit_sources", self.hit_sources, "0.32", (OURS,),
                    "no per-tier hit labels (vLLM's prompt_tokens_cached_by_source metric is newer)"),
            Feature("medium_storage", self.medium_storage, "0.27", (OURS,),
                    "KV events name the disk/remote tiers 'FS'/'OBJ' (this vLLM's media names), "
                    "not 'STORAGE'"),
            Feature("stats_to_dict", self.stats_to_dict, "0.30", (WRAPPER,),
                    "stats payloads read from KVConnectorStats.data, as this vLLM ships them", lost=False),
            Feature("pending_block_frees", self.pending_block_frees, "0.30", (OURS,),
                    "vLLM cannot wait for blocks held by async saves: it preempts instead (more recompute)"),
            Feature("wrapper_binds_metadata", self.wrapper_binds_metadata, "0.29", (WRAPPER,),
                    "vLLM's wrapper does not forward bind_connector_metadata: lease releases and per-step "
                    "resets apply when the worker first reads a step's metadata", lost=False),
            Feature("sleep_hooks", self.sleep_hooks, "0.33", KINDS,
                    "vLLM does not tell connectors about sleep mode: do not sleep() an engine while it runs"),
            Feature("wrapper_sleep_hooks", self.wrapper_sleep_hooks or not self.sleep_hooks, "never", (WRAPPER,),
                    "vLLM's wrapper does not forward unregister/restore_kv_caches: with sleep mode use "
                    "kv_connector 'lmcache'"),
            Feature("may_load_async", self.may_load_async, "0.34", (OURS,),
                    "nothing to declare (no --max-num-inflight-kv-loads)", lost=False),
            Feature("kv_cache_access", self.kv_cache_access, "0.34", (OURS,),
                    "nothing to declare (no extensible KV cache)", lost=False),
        ]

    def missing(self, kind: str, lost_only: bool = False) -> list[Feature]:
        return [f for f in self.table() if not f.present and kind in f.kinds and (f.lost or not lost_only)]

    def startup_line(self, kind: str) -> str:
        """One line: this vLLM, whether it is in range, and what `kind` cannot do here."""
        lost = self.missing(kind, lost_only=True)
        line = f"LMCache on vLLM {self.version} ({range_note(self.version)}), kv_connector {kind!r}: "
        return line + ("cannot do here: " + " | ".join(f"{f.key}: {f.without}" for f in lost)
                       if lost else "every vLLM feature it uses is present")

@dataclass(frozen=True)
class Probe:
    """One thing to look for in vLLM: `module.name`, or its `member` ("has": an attribute,
    inherited ones included; "defines": in that class's own body; "field": a dataclass
    field). The contract test (tests/integration/test_vllm_contract.py) evaluates the same
    probes on released wheels' sources with `ast`."""

    module: str
    name: str
    member: str | None = None
    how: str = "has"


_SCHED_OUTPUT = "vllm.v1.core.sched.output"
_STATS = "vllm.distributed.kv_transfer.kv_connector.v1.metrics"

# feature -> what must all be there for it (VllmFeatures has one field per key)
PROBES: dict[str, tuple[Probe, ...]] = {
    "hit_sources": (Probe("vllm.v1.metrics.cache_hit_source", "CacheHitSource"),
                    Probe(_BASE, "KVConnectorBase_V1", "get_external_cache_hit_sources")),
    "medium_storage": (Probe("vllm.distributed.kv_events", "MEDIUM_STORAGE"),),
    "stats_to_dict": (Probe(_STATS, "KVConnectorStats", "to_dict"),),
    "pending_block_frees": (Probe(_BASE, "KVConnectorBase_V1", "has_pending_block_frees"),),
    "wrapper_binds_metadata": (Probe(_WRAPPER_MODULE, "LMCacheConnectorV1", "bind_connector_metadata", "defines"),),
    "sleep_hooks": (Probe(_BASE, "KVConnectorBase_V1", "unregister_kv_caches"),
                    Probe(_BASE, "KVConnectorBase_V1", "restore_kv_caches")),
    "wrapper_sleep_hooks": (Probe(_WRAPPER_MODULE, "LMCacheConnectorV1", "unregister_kv_caches", "defines"),
                            Probe(_WRAPPER_MODULE, "LMCacheConnectorV1", "restore_kv_caches", "defines")),
    "may_load_async": (Probe(_BASE, "KVConnectorBase_V1", "may_load_async"),),
    "kv_cache_access": (Probe("vllm.config.kv_transfer", "KVCacheAccess"),
                        Probe(_BASE, "KVConnectorBase_V1", "kv_cache_access")),
    "resumed_req_ids": (Probe(_SCHED_OUTPUT, "CachedRequestData", "resumed_req_ids", "field"),),
}


def probe(p: Probe) -> bool:
    """Whether the installed vLLM has what `p` names."""
    obj = _optional(p.module, p.name)
    if obj is None:
        return False
    if p.member is None:
        return True
    if p.how == "defines":
        return p.member in vars(obj)
    if p.how == "field":
        return dataclasses.is_dataclass(obj) and p.member in {f.name for f in dataclasses.fields(obj)}
    return hasattr(obj, p.member)


def features_from(found: dict[str, bool], version: str) -> VllmFeatures:
    """VllmFeatures from each PROBES key's answer (by import here, by ast in the contract test)."""
    return VllmFeatures(version=version, **{key: bool(found[key]) for key in PROBES})


def detect() -> VllmFeatures:
    """Look at the installed vLLM (imports only vLLM modules a connector imports anyway)."""
    return features_from({key: all(probe(p) for p in probes) for key, probes in PROBES.items()}, vllm_version())


_cached: VllmFeatures | None = None


def features() -> VllmFeatures:
    """The installed vLLM's features (detected on the first call)."""
    global _cached
    if _cached is None:
        _cached = detect()
    return _cached


# -- the supported range --------------------------------------------------------------

def vllm_version() -> str:
    try:
        from vllm.version import __version__
    except ImportError:
        try:
            from vllm import __version__
        except ImportError:
            return "unknown"
    return str(__version__)


def _release(version: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a release or dev version; None when it names none
    (a source build without tags reports e.g. "0.0.0+..." or "dev")."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not m:
        return None
    release = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    return None if release[:2] == (0, 0) else release


def range_note(version: str) -> str:
    release = _release(version)
    if release is None:
        return f"version unknown; supported {SUPPORTED_RANGE}"
    if release[:2] < _release(SUPPORTED_FLOOR)[:2]:
        return f"below the supported {SUPPORTED_RANGE}"
    if release > _release(NEWEST_TESTED):
        return f"newer than the newest tested, {NEWEST_TESTED}: untested"
    return f"in the supported range {SUPPORTED_RANGE}"


def in_range(version: str) -> bool | None:
    """True inside the supported range, False outside it, None when unknown."""
    release = _release(version)
    if release is None:
        return None
    return _release(SUPPORTED_FLOOR)[:2] <= release[:2] and release <= _release(NEWEST_TESTED)


_said_untested = False


def require_supported(version: str | None = None) -> None:
    """Refuse a vLLM older than the supported range (one line); say once that a newer
    one is untested. Any 0.26.x build, a dev build between releases included, is accepted."""
    global _said_untested
    version = vllm_version() if version is None else version
    release = _release(version)
    if release is not None and release[:2] < _release(SUPPORTED_FLOOR)[:2]:
        raise UnsupportedVllmError(
            f"LMCache supports vLLM {SUPPORTED_RANGE}; the installed vLLM is {version}. "
            f"Install vLLM {SUPPORTED_FLOOR} or newer (on Gaudi: vllm-gaudi v0.26.0 or newer).")
    if not _said_untested and (release is None or release > _release(NEWEST_TESTED)):
        _said_untested = True
        logger.warning("LMCache: vLLM %s is %s; LMCache is tested on vLLM %s and runs on by what this vLLM "
                       "offers (python -m lmcache doctor lists it)", version,
                       "newer than the newest tested" if release else "of unknown version", SUPPORTED_RANGE)


_said_features: set[str] = set()


def log_startup(kind: str) -> None:
    """The startup line for this connector kind, once per process."""
    if kind in _said_features:
        return
    _said_features.add(kind)
    logger.info(features().startup_line(kind))


# -- small answers the rest of the package asks for -----------------------------------

def stats_payload(stats) -> dict:
    """A KVConnectorStats' plain-data payload (`to_dict()` where vLLM has it, `.data` before)."""
    return stats.to_dict() if features().stats_to_dict else stats.data


def in_process_kv_cache_access():
    """KVCacheAccess.IN_PROCESS (vLLM 0.34+): our connector copies with torch ops in the
    worker's own process. None where vLLM has no such notion (it never asks there)."""
    access = __getattr__("KVCacheAccess")
    return None if access is None else access.IN_PROCESS
