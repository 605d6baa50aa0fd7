"""Shared names and small helpers of the vLLM integration.

`ENGINE_NAME` is the name vLLM's examples pass to `LMCacheEngineBuilder.destroy`.
Configuration comes from every source `lmcache.v1.config.load_config` knows:
defaults < `LMCACHE_CONFIG_FILE` (YAML) < `LMCACHE_<KEY>` env vars <
`"lmcache.<key>"` entries of vLLM's `kv_connector_extra_config`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

ENGINE_NAME = "vllm-instance"

# Setting it (to anything but "", "0", "false") turns every save off, as upstream.
FORCE_SKIP_SAVE_ENV = "LMCACHE_FORCE_SKIP_SAVE"
# Per-request switch in sampling_params.extra_args["kv_transfer_params"].
SKIP_SAVE_PARAM = "lmcache.skip_save"

# Plain (unprefixed) kv_connector_extra_config keys this integration reads itself.
ASYNC_SAVE_KEY = "async_save"
LOOKUP_TIMEOUT_KEY = "lookup_timeout_ms"
DEFAULT_LOOKUP_TIMEOUT_MS = 5000

_FALSY = {"", "0", "false", "no", "off"}


def truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in _FALSY
    return bool(value)


def force_skip_save() -> bool:
    return truthy(os.environ.get(FORCE_SKIP_SAVE_ENV, ""))


def extra_config_of(vllm_config) -> dict:
    kv_transfer_config = getattr(vllm_config, "kv_transfer_config", None)
    if kv_transfer_config is None:
        return {}
    return dict(kv_transfer_config.kv_connector_extra_config or {})


def lmcache_config_from_vllm(vllm_config):
    """The engine config for this vLLM instance (see the module docstring)."""
    from lmcache.v1.config import load_config

    return load_config(extra_config_of(vllm_config))


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


LOG_LEVEL_ENV = "LMCACHE_LOG_LEVEL"


def ensure_log_handler() -> None:
    """Show LMCache's own log lines inside vLLM processes (vLLM configures only its
    "vllm" logger). Level from LMCACHE_LOG_LEVEL (default INFO). Leaves any handler
    the application installed alone."""
    root = logging.getLogger("lmcache")
    if root.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[lmcache %(levelname)s %(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    level = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    root.setLevel(level if level in logging._nameToLevel else "INFO")
