"""The integration's settings: names, extra-config keys, and one reader per flag.

`ENGINE_NAME` is the name vLLM's examples pass to `LMCacheEngineBuilder.destroy`.
Configuration comes from every source `lmcache.v1.config.load_config` knows:
defaults < `LMCACHE_CONFIG_FILE` (YAML) < `LMCACHE_<KEY>` env vars <
`"lmcache.<key>"` entries of vLLM's `kv_connector_extra_config`; with
`--kv-offloading-backend lmcache --kv-offloading-size N`, the host tier is N GiB.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from lmcache.integration.vllm.runner import runner_of_config
from lmcache.v1 import booleans

logger = logging.getLogger(__name__)

ENGINE_NAME = "vllm-instance"

# Setting it (to anything but "", "0", "false") turns every save off, as upstream.
FORCE_SKIP_SAVE_ENV = "LMCACHE_FORCE_SKIP_SAVE"
# Per-request switch in sampling_params.extra_args["kv_transfer_params"].
SKIP_SAVE_PARAM = "lmcache.skip_save"

# Plain (unprefixed) kv_connector_extra_config keys this integration reads itself.
ASYNC_SAVE_KEY = "async_save"
ASYNC_LOAD_KEY = "async_load"
LOOKUP_TIMEOUT_KEY = "lookup_timeout_ms"
DEFAULT_LOOKUP_TIMEOUT_MS = 5000
# vllm-gaudi's examples: do not save a prompt's last partial chunk (combined with
# save_unfull_chunk as upstream does: saved only if save_unfull_chunk and not this).
DISCARD_PARTIAL_CHUNKS_KEY = "discard_partial_chunks"
# vllm-gaudi's examples: upstream's per-instance RPC port name; nothing here uses it.
RPC_PORT_KEY = "lmcache_rpc_port"

USE_LAYERWISE_KEY = "use_layerwise"

KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")

truthy = booleans.truthy  # the lenient reading of a switch (lmcache/v1/booleans.py)


def use_layerwise(extra: dict, config=None) -> bool:
    """The one reader of use_layerwise: the plain or "lmcache."-prefixed extra-config
    key, or (given the engine config) its other sources (YAML, LMCACHE_USE_LAYERWISE)."""
    return (bool(getattr(config, "use_layerwise", False)) or truthy(extra.get(USE_LAYERWISE_KEY, False))
            or truthy(extra.get("lmcache." + USE_LAYERWISE_KEY, False)))


def async_save_wanted(vllm_config, extra: dict) -> bool:
    """The one reader of async_save (on unless turned off), for our own connector class.
    Never where the runner does not call handle_preemptions (vllm-gaudi): a preempted
    request's blocks could be reused while its save still reads them."""
    wanted = truthy(extra.get(ASYNC_SAVE_KEY, True))
    runner = runner_of_config(vllm_config)
    if wanted and not runner.calls_handle_preemptions:
        if ASYNC_SAVE_KEY in extra:
            logger.warning("LMCache: async_save is not available on %s; saving inside the step", runner.name)
        return False
    return wanted


def async_load_wanted(vllm_config, extra: dict, role) -> bool:
    """The one reader of async_load (on unless turned off), for our own connector class.
    Never with use_layerwise (loads follow the forward layer by layer) nor where the
    runner never reads load errors (vllm-gaudi: a short async load could not be reported).
    In the scheduler, sets the load-failure policy async loads need."""
    if not truthy(extra.get(ASYNC_LOAD_KEY, True)):
        return False
    runner = runner_of_config(vllm_config)
    layerwise = use_layerwise(extra)
    if layerwise or not runner.reads_load_errors:
        if ASYNC_LOAD_KEY in extra:
            logger.warning("LMCache: async_load is not available %s; loading inside the step",
                           "with use_layerwise" if layerwise else f"on {runner.name}")
        return False
    if role == KVConnectorRole.SCHEDULER:
        prefer_recompute(vllm_config, "for async loads: a chunk that cannot be read is recomputed, never a "
                                      "failed request; {\"async_load\": false} keeps 'fail'")
    return True


@dataclass(frozen=True)
class ConnectorFlags:
    """How one connector instance moves KV, decided once at construction."""

    use_layerwise: bool = False
    async_save: bool = False
    async_load: bool = False

    @classmethod
    def decide(cls, config, extra: dict, *, async_save: bool = False, async_load: bool = False) -> "ConnectorFlags":
        layerwise = use_layerwise(extra, config)
        # Layerwise saves and loads happen inside the forward, never in the background.
        return cls(layerwise, bool(async_save) and not layerwise, bool(async_load) and not layerwise)


def prefer_recompute(vllm_config, why: str) -> None:
    """Set vLLM's kv_load_failure_policy from "fail" to "recompute": a chunk that cannot
    be read is then recomputed, never a failed request (the scheduler reads the policy
    after building its connector)."""
    transfer = vllm_config.kv_transfer_config
    if getattr(transfer, "kv_load_failure_policy", "recompute") == "fail":
        transfer.kv_load_failure_policy = "recompute"
        logger.info("LMCache: kv_load_failure_policy set to 'recompute' (%s)", why)


def force_skip_save() -> bool:
    return truthy(os.environ.get(FORCE_SKIP_SAVE_ENV, ""))


def extra_config_of(vllm_config) -> dict:
    kv_transfer_config = getattr(vllm_config, "kv_transfer_config", None)
    if kv_transfer_config is None:
        return {}
    return dict(kv_transfer_config.kv_connector_extra_config or {})


def lmcache_config_from_vllm(vllm_config):
    """The engine config for this vLLM instance (see the module docstring)."""
    from lmcache.v1.config import apply_overrides, load_config

    config = load_config(extra_config_of(vllm_config))
    overrides = offloading_overrides(vllm_config)
    if overrides:
        source = "vLLM --kv-offloading-size (cache_config.kv_offloading_size)"
        earlier = config.sources.get("max_local_cpu_size")
        if earlier and config.max_local_cpu_size != overrides["max_local_cpu_size"]:
            logger.info("LMCache: host tier %s GiB from %s replaces %s GiB from %s",
                        overrides["max_local_cpu_size"], source, config.max_local_cpu_size, earlier)
        config = apply_overrides(config, overrides, source=source)
    if config.mp_host is None and _connector_name(vllm_config) == MP_CONNECTOR:
        # upstream's MP connector means "the node's lmcache server": use it when one answers
        # (lmcache.v1.mp.storage_choice says which in one start-up line)
        config = apply_overrides(config, {"mp_host": "auto"}, source=f"kv_connector={MP_CONNECTOR}")
    return config


MP_CONNECTOR = "LMCacheMPConnector"


def _connector_name(vllm_config) -> str | None:
    return getattr(getattr(vllm_config, "kv_transfer_config", None), "kv_connector", None)


def offloading_overrides(vllm_config) -> dict:
    """The host tier vLLM's one-flag switch asks for: `--kv-offloading-backend lmcache
    --kv-offloading-size N` means N GiB of host memory (vLLM does not forward N to
    this backend's connector). Empty when the switch is not in use."""
    cache_config = getattr(vllm_config, "cache_config", None)
    size = getattr(cache_config, "kv_offloading_size", None)
    if size is None or getattr(cache_config, "kv_offloading_backend", None) != "lmcache":
        return {}
    return {"local_cpu": True, "max_local_cpu_size": float(size)}


def kv_role_of(vllm_config) -> str:
    """kv_producer (stores, never loads), kv_consumer (loads, never stores) or kv_both."""
    kv_transfer_config = getattr(vllm_config, "kv_transfer_config", None)
    role = getattr(kv_transfer_config, "kv_role", None) or "kv_both"
    if role not in KV_ROLES:
        raise ValueError(f"LMCache: kv_role={role!r} is not valid; accepted: {', '.join(KV_ROLES)}")
    return role


def save_unfull_chunk_of(config, extra: dict) -> bool:
    """Whether a prompt's last partial chunk is saved: save_unfull_chunk, unless the
    extra config's discard_partial_chunks says not to."""
    return bool(config.save_unfull_chunk) and not truthy(extra.get(DISCARD_PARTIAL_CHUNKS_KEY, False))


def note_ignored_extra_keys(extra: dict) -> None:
    if RPC_PORT_KEY in extra:
        logger.debug("LMCache: kv_connector_extra_config[%r]=%r is accepted and has no effect here "
                     "(no separate LMCache RPC server)", RPC_PORT_KEY, extra[RPC_PORT_KEY])


def engine_id_of(vllm_config) -> str:
    """An id shared by the scheduler and every worker of one vLLM engine."""
    kv_transfer_config = vllm_config.kv_transfer_config
    return str(kv_transfer_config.engine_id)


def parallel_rank_and_size(vllm_config) -> tuple[int, int]:
    """This worker's rank among the tp*pp workers of one engine, and their number."""
    parallel = vllm_config.parallel_config
    tp, pp = int(parallel.tensor_parallel_size), int(parallel.pipeline_parallel_size)
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        rank = get_pp_group().rank_in_group * tp + get_tensor_model_parallel_rank()
    except (AssertionError, ImportError, AttributeError):  # not initialised (unit tests)
        rank = 0
    return rank, tp * pp


def mla_enabled(model_config) -> bool:
    return bool(getattr(model_config, "use_mla", False))


def attention_backend_name(vllm_config, layer_names) -> str | None:
    """The name vLLM's attention backend gives itself (e.g. "CPU_ATTN",
    "FLASH_ATTN"), read from the first attention layer; None if unknown."""
    try:
        layers = vllm_config.compilation_config.static_forward_context
    except AttributeError:
        return None
    for name in layer_names:
        layer = layers.get(name)
        backend = getattr(layer, "attn_backend", None)
        if backend is None and hasattr(layer, "get_attn_backend"):
            backend = layer.get_attn_backend()
        if backend is not None:
            return backend.get_name()
    return None
