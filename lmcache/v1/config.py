"""LMCacheEngineConfig: the engine's settings and where they come from.

Sources, later wins:
  defaults < YAML file named by LMCACHE_CONFIG_FILE < LMCACHE_<KEY> env vars
           < "lmcache.<key>" entries of vLLM's kv_connector_extra_config.

Every value is checked when it is read. A bad value raises ConfigError naming the
key, the value, where it came from and what is accepted; an unknown key warns and
suggests the closest known one (typos are the usual cause).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from lmcache.v1.config_values import (  # the constants are re-exported
    NO_NIXL,
    REMOTE_SCHEMES,
    UNSUPPORTED_SERDES,
    BadValue,
    disk_path,
    extra_mapping,
    http_url,
    mp_host,
    server_urls,
    nixl_off,
    non_negative_float,
    non_negative_int,
    none_or,
    parse_bool,
    positive_float,
    tcp_port,
    positive_int,
    remote_url,
    serde_name,
    slot_buckets,
    physical_memory_bytes,
    shown_value,
)

logger = logging.getLogger(__name__)

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_"
VLLM_PREFIX = "lmcache."

# LMCACHE_* variables that are not config keys (read elsewhere, or upstream
# switches with no meaning here): never warned about.
NON_CONFIG_ENV = frozenset({"CONFIG_FILE", "DEVICE", "CI", "USE_EXPERIMENTAL", "LOG_LEVEL", "TRACK_USAGE",
                            "FORCE_SKIP_SAVE", "TEST_HOOKS", "TEST_CORRUPT_FILE", "HPU_PIN_MEMORY"})  # read by the vLLM integration


GB = 1024**3
MIN_SECRET_CHARS = 16


def _namespace(value: Any) -> str:
    text = str(value)
    if not 1 <= len(text) <= 64 or not text.isprintable():
        raise BadValue()
    return text


def _secret(value: Any) -> str:
    if not isinstance(value, (str, bytes)) or len(value) < MIN_SECRET_CHARS:
        raise BadValue()
    return value.decode() if isinstance(value, bytes) else value


class ConfigError(ValueError):
    """A configuration value that cannot be used."""


@dataclass
class LMCacheEngineConfig:
    # --- upstream keys (same names and defaults) ---
    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = 5.0
    local_disk: str | None = None
    max_local_disk_size: float = 0.0
    remote_url: str | None = None
    remote_serde: str | None = "naive"  # None (null): the same as naive
    save_unfull_chunk: bool = False
    save_decode_cache: bool = False
    use_layerwise: bool = False
    min_retrieve_tokens: int = 0
    extra_config: dict | None = None
    # --- ours ---
    remote_timeout: float = 2.0
    remote_connect_timeout: float = 0.5
    remote_retry_interval: float = 10.0
    s3_endpoint_url: str | None = None  # s3:// on MinIO, Ceph RGW, SeaweedFS...: http(s)://host:port
    store_queue_size: int = 64
    # vLLM CPU backend: keep whole blocks in vLLM's own tiled byte order (block copies,
    # no transposes); false: plain per-token K/V that CUDA and Gaudi instances can share
    cpu_native_blocks: bool = True
    hpu_slot_buckets: Any = "auto"  # Gaudi: pad slot lists to these sizes (gpu_connector/hpu/buckets.py)
    # seconds a chunk found by a scheduler lookup stays held for that request's load
    # (a lost request must not pin host memory forever)
    lookup_lease_ttl: float = 60.0
    # upstream's NIXL switch: only false is accepted (there is no NIXL transport here)
    enable_nixl: bool = False
    # --- chunk integrity (lmcache/v1/storage_backend/serde.py) ---
    # a name in every key: deployments with different namespaces never share chunks
    cache_namespace: str | None = None
    # shared secret: chunks carry an HMAC over key, header and payload, and a chunk
    # without a valid one is never loaded. Never shown (repr, doctor, errors).
    chunk_secret: str | None = field(default=None, repr=False)
    # the shared host cache (`lmcache server`, docs/server.md); upstream's keys are
    # lmcache.mp.host / lmcache.mp.port. None: the host tier lives in this process;
    # "auto": the server at 127.0.0.1:mp_port if one answers at start-up, else in process
    mp_host: str | None = None
    mp_port: int = 5555
    # lmcache.mp.server_urls: servers tried in order, the first that answers is used
    # (and again from the first after an outage); set, it wins over mp_host / mp_port
    mp_server_urls: list | None = None

    # Where each non-default value came from (for messages); not a config key.
    sources: dict = field(default_factory=dict, repr=False, compare=False)

    # -- constructors like upstream's -------------------------------------
    @classmethod
    def from_defaults(cls, **overrides: Any) -> "LMCacheEngineConfig":
        return apply_overrides(cls(), overrides, source="from_defaults()")

    @classmethod
    def from_file(cls, path: str) -> "LMCacheEngineConfig":
        return _apply_file(cls(), path, source="from_file()")

    @classmethod
    def from_env(cls) -> "LMCacheEngineConfig":
        return _apply_env(cls(), os.environ)

    # -- derived sizes ----------------------------------------------------
    @property
    def local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * GB)

    @property
    def local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GB)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in KEYS}

    def __repr__(self) -> str:  # no password or secret in logs, tracebacks or reports
        shown = ", ".join(f"{name}={shown_value(name, getattr(self, name))!r}" for name in KEYS)
        return f"{type(self).__name__}({shown})"


@dataclass(frozen=True)
class _Key:
    parse: Callable[[Any], Any]
    accepted: str


KEYS: dict[str, _Key] = {
    "chunk_size": _Key(positive_int, "a positive integer (tokens per chunk)"),
    "local_cpu": _Key(parse_bool, "a boolean: true/false/1/0/yes/no/on/off"),
    "max_local_cpu_size": _Key(non_negative_float, "a number of GB >= 0"),
    "local_disk": _Key(
        none_or(disk_path),
        "a directory path or file:///path/ (not an existing regular file), or none",
    ),
    "max_local_disk_size": _Key(non_negative_float, "a number of GB >= 0"),
    "remote_url": _Key(
        none_or(remote_url),
        "none, lm://host:port (port 1..65535), a URL scheme://[user:password@]host[:port][/db] with scheme one of "
        + ", ".join(REMOTE_SCHEMES[:-1])
        + ", redis-cluster://[user:password@]h1:p1,h2:p2,... (rediss-cluster, valkey-cluster: the same), "
        "redis-sentinel://[user:password@]h1:p1,h2:p2,...[/service_name] (rediss-sentinel), or s3://bucket[/prefix]; "
        "?ssl_ca_certs=PATH (and redis-py's other ssl_* options) only with a TLS scheme: rediss, valkeys, "
        "rediss-cluster, valkeys-cluster, rediss-sentinel",
    ),
    "remote_serde": _Key(
        serde_name,
        "naive (the default) or null/NULL (the same); "
        + ", ".join(UNSUPPORTED_SERDES) + " (upstream's compressing serdes) are not supported here",
    ),
    "save_unfull_chunk": _Key(parse_bool, "a boolean: true/false/1/0/yes/no/on/off"),
    "save_decode_cache": _Key(parse_bool, "a boolean: true/false/1/0/yes/no/on/off"),
    "use_layerwise": _Key(parse_bool, "a boolean: true/false/1/0/yes/no/on/off"),
    "min_retrieve_tokens": _Key(non_negative_int, "an integer >= 0 (tokens)"),
    "extra_config": _Key(extra_mapping, "a mapping (in env vars: a JSON object), or none"),
    "remote_timeout": _Key(positive_float, "a number of seconds > 0"),
    "remote_connect_timeout": _Key(positive_float, "a number of seconds > 0"),
    "remote_retry_interval": _Key(non_negative_float, "a number of seconds >= 0"),
    "s3_endpoint_url": _Key(none_or(http_url), "none (AWS) or http(s)://host[:port] of an S3-compatible store"),
    "store_queue_size": _Key(positive_int, "a positive integer (chunks)"),
    "cpu_native_blocks": _Key(parse_bool, "a boolean: true/false/1/0/yes/no/on/off"),
    "hpu_slot_buckets": _Key(slot_buckets, '"auto", "off", or ascending token counts ("256,1024")'),
    "lookup_lease_ttl": _Key(positive_float, "a number of seconds > 0"),
    "enable_nixl": _Key(nixl_off, "false only: " + NO_NIXL),
    "cache_namespace": _Key(none_or(_namespace), "a short name (1-64 printable characters), or none"),
    "chunk_secret": _Key(
        none_or(_secret), f"a secret of at least {MIN_SECRET_CHARS} characters (env LMCACHE_CHUNK_SECRET), or none"
    ),
    "mp_host": _Key(none_or(mp_host), 'none, "auto", or the lmcache server\'s host (127.0.0.1, tcp://localhost)'),
    "mp_port": _Key(tcp_port, "a TCP port, 1..65535"),
    "mp_server_urls": _Key(none_or(server_urls), 'lmcache servers "HOST:PORT" (tcp:// optional), a list or '
                                                 "one comma-separated string, or none"),
}

# upstream's dotted names of the same keys ("lmcache.mp.host" in vLLM's extra config)
KEY_ALIASES = {"mp.host": "mp_host", "mp.port": "mp_port", "mp.server_urls": "mp_server_urls"}


def _set(config: LMCacheEngineConfig, key: str, value: Any, source: str) -> None:
    spec = KEYS[key]
    try:
        parsed = spec.parse(value)
    except (BadValue, ValueError):
        raise ConfigError(
            f"lmcache config: {key}={shown_value(key, value)!r} (from {source}) is not valid; "
            f"accepted: {spec.accepted}"
        ) from None
    setattr(config, key, parsed)
    config.sources[key] = source


def _refuse_nixl(key: str, source: str) -> None:
    raise ConfigError(f"lmcache config: {key} (from {source}) asks for NIXL transfers, but {NO_NIXL}")


def _warn_unknown(key: str, source: str) -> None:
    if key.startswith("nixl_"):
        _refuse_nixl(key, source)
    close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(KEYS)}"
    logger.warning("lmcache config: unknown key %r (from %s) is ignored%s", key, source, hint)


_warned: set = set()  # (what, value) already warned about in this process


def _warn_once(what: tuple, message: str, *args) -> None:
    if what not in _warned:
        _warned.add(what)
        logger.warning(message, *args)


def _check_whole(config: LMCacheEngineConfig) -> LMCacheEngineConfig:
    """Rules that involve more than one key, and values that are accepted but cannot work as meant."""
    physical = physical_memory_bytes()
    if config.local_cpu and physical is not None and config.local_cpu_bytes > physical:
        _warn_once(("max_local_cpu_size", config.max_local_cpu_size),
                   "lmcache config: max_local_cpu_size=%g GB (from %s) is more than this machine's memory "
                   "(%.1f GB): the process will run out of memory long before the budget is full",
                   config.max_local_cpu_size, config.sources.get("max_local_cpu_size", "default"), physical / GB)
    if config.local_disk is not None and config.max_local_disk_size <= 0:
        raise ConfigError(
            f"lmcache config: local_disk={shown_value('local_disk', config.local_disk)!r} (from "
            f"{config.sources.get('local_disk', 'default')}) needs a disk budget, but "
            f"max_local_disk_size={config.max_local_disk_size!r} (from "
            f"{config.sources.get('max_local_disk_size', 'default')}); accepted: a number of GB > 0"
        )
    return config


# --- applying sources ------------------------------------------------------

def apply_overrides(
    config: LMCacheEngineConfig,
    overrides: Mapping[str, Any] | None,
    source: str = "overrides",
    check: bool = True,
) -> LMCacheEngineConfig:
    """A copy of `config` with plain `key: value` overrides applied and checked."""
    new = dataclasses.replace(config, sources=dict(config.sources))
    for key, value in (overrides or {}).items():
        key = KEY_ALIASES.get(key, key)
        if key in KEYS:
            _set(new, key, value, source)
        else:
            _warn_unknown(str(key), source)
    return _check_whole(new) if check else new


def apply_vllm_extra_config(
    config: LMCacheEngineConfig, extra_config: Mapping[str, Any] | None, check: bool = True
) -> LMCacheEngineConfig:
    """Apply the "lmcache.<key>" entries of vLLM's kv_connector_extra_config
    (other entries belong to other connectors and are left alone)."""
    new = dataclasses.replace(config, sources=dict(config.sources))
    for name, value in (extra_config or {}).items():
        if not isinstance(name, str) or not name.startswith(VLLM_PREFIX):
            continue
        key = KEY_ALIASES.get(name[len(VLLM_PREFIX):], name[len(VLLM_PREFIX):])
        source = f"vLLM kv_connector_extra_config[{name!r}]"
        if key in KEYS:
            _set(new, key, value, source)
        else:
            _warn_unknown(key, source)
    return _check_whole(new) if check else new


def _read_yaml(path: str, source: str) -> dict:
    import yaml

    if os.path.isdir(path):
        raise ConfigError(
            f"lmcache config: config file {path!r} (from {source}) is a directory; "
            "accepted: the path of a readable YAML file"
        )
    if not os.path.isfile(path):
        raise ConfigError(
            f"lmcache config: config file {path!r} (from {source}) does not exist; "
            "accepted: the path of a readable YAML file"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"lmcache config: cannot read YAML file {path!r}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"lmcache config: file {path!r} holds a {type(data).__name__}; accepted: a YAML mapping of key: value"
        )
    return data


def _apply_file(config: LMCacheEngineConfig, path: str, source: str, check: bool = True) -> LMCacheEngineConfig:
    return apply_overrides(config, _read_yaml(path, source), source=f"file {path}", check=check)


def _apply_env(
    config: LMCacheEngineConfig, environ: Mapping[str, str], check: bool = True
) -> LMCacheEngineConfig:
    new = dataclasses.replace(config, sources=dict(config.sources))
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):]
        if rest in NON_CONFIG_ENV:
            continue
        key = rest.lower()
        if key in KEYS:
            _set(new, key, value, f"env {name}")
        else:
            _warn_unknown(key, f"env {name}")
    return _check_whole(new) if check else new


def load_config(
    extra_config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> LMCacheEngineConfig:
    """The engine config from every source: defaults < LMCACHE_CONFIG_FILE (YAML)
    < LMCACHE_<KEY> env vars < "lmcache.<key>" entries of `extra_config`
    (vLLM's kv_connector_extra_config)."""
    environ = os.environ if environ is None else environ
    config = LMCacheEngineConfig()
    path = environ.get(CONFIG_FILE_ENV)
    if path:
        config = _apply_file(config, path, source=f"env {CONFIG_FILE_ENV}", check=False)
    config = _apply_env(config, environ, check=False)
    config = apply_vllm_extra_config(config, extra_config, check=False)
    return _check_whole(config)


def value_sources(config: LMCacheEngineConfig) -> dict[str, str]:
    """Where each key's value came from: "default", or the source that set it last
    (a file, an env var, vLLM's extra config)."""
    return {key: config.sources.get(key, "default") for key in KEYS}
