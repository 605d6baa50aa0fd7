"""The distributed remote_url schemes, parsed once (config validation and the tiers).

  redis-cluster://[user:password@]h1:p1,h2:p2,...[?read_from_replicas=true]   (also rediss-cluster,
      valkey-cluster, valkeys-cluster: the `s` means TLS)
  redis-sentinel://[user:password@]h1:p1,h2:p2,...[/service_name][?read_from_replicas=true]
      (also rediss-sentinel); the service name defaults to $REDIS_SERVICE_NAME, then `redismaster`
  s3://bucket[/prefix]   (the endpoint of a non-AWS store: config key s3_endpoint_url)

Parsing never looks at the network. Errors are ValueError with a message that never
contains the password.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass, field

from lmcache.v1 import booleans

CLUSTER_SCHEMES = {"redis-cluster": False, "rediss-cluster": True, "valkey-cluster": False, "valkeys-cluster": True}
SENTINEL_SCHEMES = {"redis-sentinel": False, "rediss-sentinel": True}
S3_SCHEMES = ("s3",)
DISTRIBUTED_SCHEMES = (*CLUSTER_SCHEMES, *SENTINEL_SCHEMES, *S3_SCHEMES)
DEFAULT_SERVICE = "redismaster"
_OPTIONS = {"read_from_replicas"}
# S3 bucket names: 3-63 of lower-case letters, digits, dots and hyphens.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class RedisSeeds:
    """Where a cluster or sentinel group is, and how to log in to its data nodes."""
    kind: str  # "cluster" | "sentinel"
    seeds: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    service: str | None = None  # sentinel only
    read_from_replicas: bool = False


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ends with "/"


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


_USERINFO = re.compile(r"((?:^|/)[^/@:\s]*:)[^@/\s]*@")
_SECRET_QUERY = ("password", "pass", "passwd", "pwd", "secret", "token", "key", "auth")


def redact_url(url: str) -> str:
    """`url` with the password of its user-info, and query values that look like
    credentials, replaced by ***; anything else unchanged."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return _USERINFO.sub(r"\1***@", url)
    if not parts.scheme or not parts.netloc and not parts.query:
        return _USERINFO.sub(r"\1***@", url)  # not a URL as parsed: mask anything shaped like user:pw@
    netloc = parts.netloc
    if password is not None or "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if password is not None else f"{userinfo}@{host}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(name.lower() in _SECRET_QUERY for name, _ in pairs):
            query = "&".join(f"{name}=***" if name.lower() in _SECRET_QUERY else f"{name}={value}"
                             for name, value in pairs)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))



def _host_port(item: str, url: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = item.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"remote_url {redact_url(url)!r}: seed {item!r} is not HOST:PORT (port 1-65535)")
    return host, int(port_text)


def _options(query: str, url: str) -> dict[str, bool]:
    out = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        try:
            if name not in _OPTIONS:
                raise ValueError(name)
            out[name] = booleans.parse_bool(value)
        except ValueError:
            raise ValueError(f"remote_url {redact_url(url)!r}: option {name}={value!r} is not known; accepted: "
                             "read_from_replicas=true|false") from None
    return out


def parse_redis_seeds(url: str, environ: dict | None = None) -> RedisSeeds:
    """A redis-cluster:// or redis-sentinel:// URL (and their TLS / valkey spellings)."""
    environ = os.environ if environ is None else environ
    scheme = scheme_of(url)
    if scheme in CLUSTER_SCHEMES:
        kind, tls = "cluster", CLUSTER_SCHEMES[scheme]
    elif scheme in SENTINEL_SCHEMES:
        kind, tls = "sentinel", SENTINEL_SCHEMES[scheme]
    else:
        raise ValueError(f"remote_url {redact_url(url)!r}: not a cluster or sentinel URL")
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        creds, _, netloc = netloc.rpartition("@")
        user, colon, pw = creds.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(pw) if colon else None
    seeds = tuple(_host_port(item, url) for item in netloc.split(",") if item.strip())
    if not seeds:
        raise ValueError(f"remote_url {redact_url(url)!r}: no seed HOST:PORT given")
    path = urllib.parse.unquote(path.strip("/"))
    service = None
    if kind == "sentinel":
        service = path or environ.get("REDIS_SERVICE_NAME") or DEFAULT_SERVICE
    elif path:
        raise ValueError(f"remote_url {redact_url(url)!r}: a cluster URL has no path (a cluster has one database)")
    opts = _options(query, url)
    return RedisSeeds(kind, seeds, tls, username, password, service, opts.get("read_from_replicas", False))


def parse_s3(url: str) -> S3Location:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3" or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"remote_url {redact_url(url)!r}: expected s3://BUCKET[/PREFIX] (credentials come from the "
                         "AWS environment or files, never from the URL)")
    if not _BUCKET.match(parts.netloc):
        raise ValueError(f"remote_url {url!r}: {parts.netloc!r} is not a bucket name (3-63 of a-z, 0-9, '.', '-')")
    prefix = parts.path.strip("/")
    return S3Location(parts.netloc, prefix + "/" if prefix else "")


def validate(url: str) -> None:
    """Raise ValueError if a distributed-scheme URL is malformed."""
    if scheme_of(url) in S3_SCHEMES:
        parse_s3(url)
    else:
        parse_redis_seeds(url, environ={})
