"""The merged config, where each value came from, and names that are not ours (typos)."""

from __future__ import annotations

import difflib
import logging
import os
from typing import Mapping

from lmcache.doctor.report import FAIL, OK, WARN, Finding
from lmcache.v1 import config as cfg

KEY_NAMES = list(cfg.KEYS)
ENV_NAMES = [cfg.ENV_PREFIX + k.upper() for k in cfg.KEYS] + [cfg.ENV_PREFIX + n for n in cfg.NON_CONFIG_ENV]


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}?" if match else "no known name is close"


def _file_keys(environ: Mapping[str, str]) -> tuple[str | None, list[str]]:
    path = environ.get(cfg.CONFIG_FILE_ENV)
    if not path or not os.path.isfile(path):
        return path, []
    try:
        data = cfg._read_yaml(path, f"env {cfg.CONFIG_FILE_ENV}")
    except cfg.ConfigError:
        return path, []
    return path, [str(k) for k in data]


def unknown_names(environ: Mapping[str, str], extra_config: Mapping | None) -> list[tuple[str, str]]:
    """(where, name) of every name that looks meant for lmcache but is not one of its keys."""
    found = []
    path, keys = _file_keys(environ)
    found += [(f"file {path}", k) for k in keys if k not in cfg.KEYS]
    for name in environ:
        if name.startswith(cfg.ENV_PREFIX):
            if name not in ENV_NAMES:
                found.append(("env", name))
        elif difflib.get_close_matches(name, ENV_NAMES, n=1, cutoff=0.85):  # LMCAHCE_CHUNK_SIZE
            found.append(("env", name))
    for name in extra_config or {}:
        if isinstance(name, str) and name.startswith(cfg.VLLM_PREFIX) and name[len(cfg.VLLM_PREFIX):] not in cfg.KEYS:
            found.append(("vLLM kv_connector_extra_config", name))
    return found


def _suggestion(where: str, name: str) -> str:
    if where == "env":
        return _closest(name, ENV_NAMES)
    key = name[len(cfg.VLLM_PREFIX):] if where.startswith("vLLM") else name
    return _closest(key, KEY_NAMES)


def checks(extra_config: Mapping | None, environ: Mapping[str, str] | None = None):
    """Findings, and the merged config (None when it does not load)."""
    environ = os.environ if environ is None else environ
    out = []
    quiet = logging.getLogger(cfg.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its unknown-key warnings are findings here
    try:
        config = cfg.load_config(extra_config, environ)
    except cfg.ConfigError as exc:
        out.append(Finding("config.values", FAIL, str(exc), "fix that value where the message says it came from; "
                                                            "keys and accepted values: docs/configuration.md"))
        config = None
    finally:
        quiet.setLevel(level)
    if config is not None:
        sources = cfg.value_sources(config)
        defaults = cfg.LMCacheEngineConfig()
        changed = [f"{k}={cfg.display_value(k, getattr(config, k))} ({sources[k]})" for k in cfg.KEYS
                   if sources[k] != "default" and getattr(config, k) != getattr(defaults, k)]
        same = [f"{k} ({sources[k]})" for k in cfg.KEYS
                if sources[k] != "default" and getattr(config, k) == getattr(defaults, k)]
        fact = "; ".join(changed) if changed else "all defaults"
        if same:
            fact += "; set to the default value: " + ", ".join(same)
        out.append(Finding("config.values", OK, fact))
    for where, name in unknown_names(environ, extra_config):
        out.append(Finding("config.unknown_name", WARN, f"{name!r} (from {where}) is not an lmcache setting and is "
                                                        "ignored", _suggestion(where, name)))
    if not any(f.check == "config.unknown_name" for f in out):
        out.append(Finding("config.unknown_name", OK, "every LMCACHE_* variable and config key is known"))
    return out, config
