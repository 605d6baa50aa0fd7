"""`--l2-adapter JSON`: upstream's adapter types mapped onto this package's tiers.

  {"type": "fs", "base_path": DIR, "max_capacity_gb": N}           -> the disk tier
  {"type": "resp", "host": H, "port": P[, "username", "password"]} -> the Redis tier
  {"type": "valkey", "startup_nodes": ["h:p", ...][, "cluster_mode", "tls_enable", "username",
   "password", "database_id"]}                                      -> the Redis tier, or its cluster
  {"type": "s3", "s3_endpoint": "s3://BUCKET" | HOST[:PORT], "s3_region": R[, "s3_addressing_style":
   "path", "s3_bucket", "disable_tls", "s3_ca_bundle", "aws_access_key_id", "aws_secret_access_key"]}
                                                                    -> the S3 tier (boto3)
  {"type": "lm", "url": "lm://h:p"}                                -> the lm:// tier
The result is config overrides (local_disk, max_local_disk_size, remote_url, s3_endpoint_url)
and, for S3, what boto3 reads from the server's environment (region, static keys, CA
bundle); at most one disk and one network adapter (the tiers below host memory are one of
each).
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field

ACCEPTED = "fs, resp, valkey, s3, lm"
NOT_HERE = {"mooncake_store", "nixl", "fs_native", "raw_block", "dax", "hf3fs", "bigtable", "gcs",
            "hfbucket", "aerospike", "seaweedfs", "mock", "fault_inject"}


class AdapterError(ValueError):
    pass


@dataclass
class L2Settings:
    overrides: dict = field(default_factory=dict)  # config keys
    environment: dict = field(default_factory=dict)  # variables boto3 reads (S3), set in the server process


def _field(spec: dict, *names: str, required: bool = True):
    for name in names:
        if name in spec:
            return spec[name]
    if required:
        raise AdapterError(f"--l2-adapter {_shown(spec)}: field {names[0]!r} is required")
    return None


def _shown(spec: dict) -> str:
    """The adapter as JSON, secrets replaced by ***."""
    return json.dumps({k: ("***" if "password" in k or "secret" in k else v) for k, v in spec.items()})


def _auth(user, password) -> str:
    """The user-info part of a URL ("" without credentials), %-quoted."""
    if not (user or password):
        return ""
    quote = urllib.parse.quote
    return quote(str(user or ""), safe="") + ":" + quote(str(password or ""), safe="") + "@"


def _netloc(host: str, port, user, password) -> str:
    return f"{_auth(user, password)}{host}:{int(port)}"


def _valkey(spec: dict) -> str:
    nodes = _field(spec, "startup_nodes")
    if not isinstance(nodes, list) or not nodes or not all(":" in str(n) for n in nodes):
        raise AdapterError('--l2-adapter valkey: startup_nodes must be a list of "host:port"')
    user, password = spec.get("username"), spec.get("password")
    tls = "s" if spec.get("tls_enable") else ""
    db = spec.get("database_id")
    if spec.get("cluster_mode"):
        if db:
            raise AdapterError("--l2-adapter valkey: database_id must be 0 with cluster_mode (a cluster has "
                               "database 0 only)")
        seeds = ",".join(f"{h}:{int(p)}" for h, p in (str(n).rsplit(":", 1) for n in nodes))
        return f"valkey{tls}-cluster://{_auth(user, password)}{seeds}"
    if len(nodes) != 1:
        raise AdapterError('--l2-adapter valkey: one "host:port" in startup_nodes, or cluster_mode true for '
                           "several")
    host, port = str(nodes[0]).rsplit(":", 1)
    return f"valkey{tls}://" + _netloc(host, port, user, password) + (f"/{int(db)}" if db else "")


def _s3(spec: dict, settings: L2Settings) -> None:
    endpoint = str(_field(spec, "s3_endpoint"))
    if spec.get("s3_enable_s3express"):
        raise AdapterError("--l2-adapter s3: s3_enable_s3express is not supported by the server's S3 tier")
    if endpoint.startswith("s3://"):  # AWS, the bucket named in the endpoint
        bucket = endpoint[len("s3://"):].strip("/")
        settings.overrides["remote_url"] = f"s3://{bucket}/"
    else:  # a host of an S3-compatible store: requests name the bucket in their path
        bucket = spec.get("s3_bucket")
        if not bucket:
            raise AdapterError(f"--l2-adapter {_shown(spec)}: with a host in s3_endpoint, s3_bucket is required "
                               '(this tier addresses the bucket by path); or give s3_endpoint "s3://BUCKET" (AWS)')
        if "://" not in endpoint:
            endpoint = ("http://" if spec.get("disable_tls") else "https://") + endpoint
        settings.overrides["remote_url"] = f"s3://{str(bucket).strip('/')}/"
        settings.overrides["s3_endpoint_url"] = endpoint
    settings.environment["AWS_DEFAULT_REGION"] = str(_field(spec, "s3_region"))
    key_id, secret = spec.get("aws_access_key_id"), spec.get("aws_secret_access_key")
    if bool(key_id) != bool(secret):
        raise AdapterError("--l2-adapter s3: give both aws_access_key_id and aws_secret_access_key, or neither "
                           "(then boto3's default credential chain: environment, instance profile, ...)")
    if key_id:
        settings.environment.update(AWS_ACCESS_KEY_ID=str(key_id), AWS_SECRET_ACCESS_KEY=str(secret))
    if spec.get("s3_ca_bundle"):
        settings.environment["AWS_CA_BUNDLE"] = str(spec["s3_ca_bundle"])


def parse_adapters(texts: list[str]) -> L2Settings:
    settings = L2Settings()
    overrides = settings.overrides
    for text in texts:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            example = '\'{"type": "fs", "base_path": "/var/cache/lmcache", "max_capacity_gb": 100}\''
            raise AdapterError(f"--l2-adapter is not JSON ({exc}); e.g. {example}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise AdapterError(f"--l2-adapter: a JSON object with a \"type\" is expected; types: {ACCEPTED}")
        kind = spec["type"]
        if kind == "fs":
            if "local_disk" in overrides:
                raise AdapterError("--l2-adapter: at most one fs adapter")
            overrides["local_disk"] = _field(spec, "base_path", "path")
            overrides["max_local_disk_size"] = _field(spec, "max_capacity_gb", "size_gb")
            continue
        if "remote_url" in overrides and kind in ("resp", "valkey", "s3", "lm"):
            raise AdapterError(f"--l2-adapter: at most one network adapter (resp, valkey, s3 or lm); got a second: "
                               f"{kind}")
        if kind == "resp":
            overrides["remote_url"] = "redis://" + _netloc(_field(spec, "host"), _field(spec, "port"),
                                                           spec.get("username"), spec.get("password"))
        elif kind == "valkey":
            overrides["remote_url"] = _valkey(spec)
        elif kind == "s3":
            _s3(spec, settings)
        elif kind == "lm":
            overrides["remote_url"] = _field(spec, "url")
        elif kind in NOT_HERE:
            raise AdapterError(f"--l2-adapter type {kind!r} (upstream's) is not provided here; accepted: {ACCEPTED}")
        else:
            raise AdapterError(f"--l2-adapter type {kind!r} is unknown; accepted: {ACCEPTED}")
    return settings
