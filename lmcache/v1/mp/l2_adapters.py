"""`--l2-adapter JSON`: upstream's adapter types mapped onto this package's tiers.

  {"type": "fs", "base_path": DIR, "max_capacity_gb": N}           -> the disk tier
  {"type": "resp", "host": H, "port": P[, "username", "password"]} -> the Redis tier
  {"type": "valkey", "startup_nodes": ["h:p"][, "username", "password", "database_id"]}
  {"type": "lm", "url": "lm://h:p"}                                -> the lm:// tier
The result is config overrides (local_disk, max_local_disk_size, remote_url); at most
one disk and one network adapter (the tiers below host memory are one of each).
"""

from __future__ import annotations

import json
import urllib.parse

ACCEPTED = "fs, resp, valkey, lm"
NOT_HERE = {"s3", "mooncake_store", "nixl", "fs_native", "raw_block", "dax", "hf3fs", "bigtable", "gcs",
            "hfbucket", "aerospike", "seaweedfs", "mock", "fault_inject"}


class AdapterError(ValueError):
    pass


def _field(spec: dict, *names: str, required: bool = True):
    for name in names:
        if name in spec:
            return spec[name]
    if required:
        raise AdapterError(f"--l2-adapter {json.dumps(spec)}: field {names[0]!r} is required")
    return None


def _netloc(host: str, port, user, password) -> str:
    auth = ""
    if user or password:
        quote = urllib.parse.quote
        auth = quote(str(user or ""), safe="") + ":" + quote(str(password or ""), safe="") + "@"
    return f"{auth}{host}:{int(port)}"


def parse_adapters(texts: list[str]) -> dict:
    overrides: dict = {}
    for text in texts:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            example = '\'{"type": "fs", "base_path": "/var/cache/lmcache", "max_capacity_gb": 100}\''
            raise AdapterError(f"--l2-adapter {text!r} is not JSON ({exc}); e.g. {example}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise AdapterError(f"--l2-adapter {text!r}: a JSON object with a \"type\" is expected; types: {ACCEPTED}")
        kind = spec["type"]
        if kind == "fs":
            if "local_disk" in overrides:
                raise AdapterError("--l2-adapter: at most one fs adapter")
            overrides["local_disk"] = _field(spec, "base_path", "path")
            overrides["max_local_disk_size"] = _field(spec, "max_capacity_gb", "size_gb")
            continue
        if "remote_url" in overrides:
            raise AdapterError(f"--l2-adapter: at most one network adapter (resp, valkey or lm); got a second: {kind}")
        if kind == "resp":
            overrides["remote_url"] = "redis://" + _netloc(_field(spec, "host"), _field(spec, "port"),
                                                           spec.get("username"), spec.get("password"))
        elif kind == "valkey":
            if spec.get("cluster_mode"):
                raise AdapterError("--l2-adapter valkey: cluster_mode is not supported by the server's tier; "
                                   "accepted: one standalone node in startup_nodes")
            nodes = _field(spec, "startup_nodes")
            if not isinstance(nodes, list) or len(nodes) != 1 or ":" not in str(nodes[0]):
                raise AdapterError('--l2-adapter valkey: startup_nodes must be one "host:port"')
            host, port = str(nodes[0]).rsplit(":", 1)
            db = spec.get("database_id")
            overrides["remote_url"] = "valkey://" + _netloc(host, port, spec.get("username"), spec.get("password")) + (
                f"/{int(db)}" if db else "")
        elif kind == "lm":
            overrides["remote_url"] = _field(spec, "url")
        elif kind in NOT_HERE:
            raise AdapterError(f"--l2-adapter type {kind!r} (upstream's) is not provided here; accepted: {ACCEPTED}")
        else:
            raise AdapterError(f"--l2-adapter type {kind!r} is unknown; accepted: {ACCEPTED}")
    return overrides
