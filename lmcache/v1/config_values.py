"""How each config value is read: one parser per kind of value (lmcache.v1.config).

A parser returns the value in its Python form or raises `BadValue`; the caller turns that
into a ConfigError naming the key, the value, its source and what is accepted.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from typing import Any, Callable, Mapping

from lmcache.v1 import booleans
from lmcache.v1.remote_urls import redact_url

REMOTE_SCHEMES = ("redis", "rediss", "valkey", "valkeys", "lm")
PLAIN_SCHEMES = ("redis", "valkey")  # no TLS: ssl_* options are refused
REMOTE_SERDES = ("naive",)
# Upstream serdes this implementation does not offer (named in the error).
UNSUPPORTED_SERDES = ("cachegen", "kivi")

class BadValue(Exception):
    """Raised by a parser; carries the 'accepted' text of the key."""


def parse_bool(value: Any) -> bool:
    try:
        return booleans.parse_bool(value)
    except ValueError:
        raise BadValue from None


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise BadValue
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise BadValue from None
    raise BadValue


def parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise BadValue
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise BadValue from None
    raise BadValue


def none_or(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return parse(value)

    return parse_optional


def positive_int(value: Any) -> int:
    n = parse_int(value)
    if n <= 0:
        raise BadValue
    return n


def non_negative_int(value: Any) -> int:
    n = parse_int(value)
    if n < 0:
        raise BadValue
    return n


def non_negative_float(value: Any) -> float:
    x = parse_float(value)
    if not x >= 0 or x == float("inf"):
        raise BadValue
    return x


def positive_float(value: Any) -> float:
    x = parse_float(value)
    if not x > 0 or x == float("inf"):
        raise BadValue
    return x


def disk_path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadValue
    value = value.strip()
    if "://" in value:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
            raise BadValue
        value = urllib.parse.unquote(parts.path)
    if os.path.exists(value) and not os.path.isdir(value):
        raise BadValue
    return value


def remote_url(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadValue
    value = value.strip()
    from lmcache.v1 import remote_urls

    if remote_urls.scheme_of(value) in remote_urls.DISTRIBUTED_SCHEMES:
        remote_urls.validate(value)  # ValueError: the caller reports the key and what is accepted
        return value
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # raises ValueError on a bad port
    except ValueError:
        raise BadValue from None
    if parts.scheme not in REMOTE_SCHEMES or not parts.hostname or parts.port == 0:
        raise BadValue  # port 0 is "any port" to a server, and no port at all to a client
    if parts.scheme == "lm" and (parts.port is None or parts.path not in ("", "/") or parts.username):
        raise BadValue  # lm://HOST:PORT, nothing else
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise BadValue
    if parts.scheme in PLAIN_SCHEMES and any(name.startswith("ssl_") for name, _ in
                                             urllib.parse.parse_qsl(parts.query, keep_blank_values=True)):
        raise BadValue  # a TLS option on a plain-text scheme: redis-py would fail at the first request
    return value


def http_url(value: Any) -> str:
    if not isinstance(value, str):
        raise BadValue
    parts = urllib.parse.urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
        raise BadValue
    return value.strip()


def mp_host(value: Any) -> str:
    """A host name or address, optionally as tcp://HOST; "auto" as it is."""
    if not isinstance(value, str) or not value.strip():
        raise BadValue
    host = value.strip()
    if host.lower() == "auto":
        return "auto"
    if "://" in host:
        scheme, host = host.split("://", 1)
        if scheme != "tcp":
            raise BadValue
    host = host.strip("[]")
    if not host or not all(c.isalnum() or c in ".-_:" for c in host):
        raise BadValue
    return host


def server_urls(value: Any) -> list[str]:
    """lmcache servers as "HOST:PORT" (tcp:// optional): a list, or one comma-separated
    string (some vLLM versions pass a string where upstream expects a list)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise BadValue
    urls = []
    for item in items:
        if not isinstance(item, str) or ":" not in item.strip().removeprefix("tcp://"):
            raise BadValue
        host, _, port = item.strip().rpartition(":")
        urls.append(f"{mp_host(host)}:{tcp_port(port)}")
    if not urls or "auto" in (u.rsplit(":", 1)[0] for u in urls):
        raise BadValue
    return urls


def tcp_port(value: Any) -> int:
    port = parse_int(value)
    if not 0 < port < 65536:
        raise BadValue
    return port


def serde_name(value: Any) -> str | None:
    """naive, or null (YAML null or the string NULL/none, as production files write
    it): None, which the tiers treat as naive."""
    if value is None:
        return None
    if isinstance(value, str):
        name = value.strip().lower()
        if name in ("null", "none", ""):
            return None
        if name in REMOTE_SERDES:
            return name
    raise BadValue


NO_NIXL = (
    "this package has no NIXL transport. Share KV between prefill and decode instances through "
    "a common tier instead: remote_url: lm://HOST:PORT (server: python -m lmcache.v1.server HOST PORT) "
    "or redis://HOST:PORT, with kv_role kv_producer (prefill) and kv_consumer (decode); "
    "see docs/examples/. Remove enable_nixl and the nixl_* keys"
)


def nixl_off(value: Any) -> bool:
    if parse_bool(value):
        raise BadValue
    return False


def extra_mapping(value: Any) -> dict | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        if value.strip().lower() in ("", "none", "null"):
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise BadValue from None
        if isinstance(parsed, dict):
            return parsed
    raise BadValue


def slot_buckets(value: Any) -> Any:
    from lmcache.v1.gpu_connector.hpu.buckets import parse_slot_buckets  # ValueError: not accepted
    return parse_slot_buckets(value)


def physical_memory_bytes() -> int | None:
    """This machine's memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# --- redaction: no password, secret or URL credential is ever shown (URLs: remote_urls) ---

_SECRET_KEY = re.compile(r"(^|_)(secret|password|passwd|token)($|_)")


def is_secret_key(key: str) -> bool:
    """chunk_secret, redis_password, ...: never shown (min_retrieve_tokens is not one)."""
    return _SECRET_KEY.search(key.lower()) is not None


def shown_value(key: str, value: Any) -> Any:
    """A config value as messages and reports may show it: secrets as ***, URLs
    without their credentials."""
    if value is None:
        return None
    if is_secret_key(key):
        return "***"
    if isinstance(value, str) and ("://" in value or "@" in value):
        return redact_url(value)
    return value
