"""Values that were accepted but could not work, and secrets that were shown: the
Redis password (and any URL credential) never reaches `python -m lmcache doctor`,
a ConfigError, or the config's repr."""

import json
import logging
import os
import subprocess
import sys

import pytest

from lmcache.doctor import config_check
from lmcache.v1 import config as cfg
from lmcache.v1.config import ConfigError, LMCacheEngineConfig, load_config
from lmcache.v1.config_values import physical_memory_bytes
from lmcache.v1.remote_urls import redact_url
from lmcache.v1.storage_backend.lm import parse_lm_url

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PASSWORD = "hunter2-s3cret"


@pytest.mark.parametrize("url", [
    f"redis://:{PASSWORD}@127.0.0.1:1/0",
    f"rediss://alice:{PASSWORD}@cache-host:6380",
    f"valkey://127.0.0.1:1?password={PASSWORD}",
])
def test_doctor_never_prints_the_password(url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env.update(LMCACHE_REMOTE_URL=url, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "lmcache", "doctor", "--quick", "--json", "--timeout", "1"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    out = json.loads(proc.stdout)
    values = next(c for c in out["checks"] if c["check"] == "config.values")
    assert "remote_url=" in values["fact"] and "***" in values["fact"]
    assert PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.parametrize("url", [
    f"redis://:{PASSWORD}@host:notaport/0",  # a bad port
    f"ftp://user:{PASSWORD}@host:21",  # a bad scheme
    f"redis://user:{PASSWORD}@host:6379/db",  # a bad db
    f"redis//user:{PASSWORD}@host",  # not even a URL
])
def test_config_errors_never_show_the_password(url):
    with pytest.raises(ConfigError) as err:
        load_config(environ={"LMCACHE_REMOTE_URL": url})
    assert PASSWORD not in str(err.value) and "***" in str(err.value) and "remote_url" in str(err.value)
    findings, _ = config_check.checks(None, {"LMCACHE_REMOTE_URL": url})
    assert all(PASSWORD not in f.fact for f in findings)


def test_repr_and_secret_keys_are_redacted():
    config = LMCacheEngineConfig.from_defaults(remote_url=f"redis://:{PASSWORD}@h:6379/0")
    assert PASSWORD not in repr(config) and "redis://:***@h:6379/0" in repr(config)
    assert cfg.shown_value("chunk_secret", "abc") == "***" and cfg.shown_value("min_retrieve_tokens", 5) == 5
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"  # nothing to hide: unchanged


@pytest.mark.parametrize("url", ["lm://cache-host:0", "redis://cache-host:0"])
def test_port_zero_is_refused(url):
    with pytest.raises(ConfigError, match="port 1..65535"):
        LMCacheEngineConfig.from_defaults(remote_url=url)
    if url.startswith("lm"):
        with pytest.raises(ValueError, match="port 1..65535"):
            parse_lm_url(url)


def test_config_file_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a directory") as err:
        load_config(environ={"LMCACHE_CONFIG_FILE": str(tmp_path)})
    assert "does not exist" not in str(err.value)


def test_host_budget_above_physical_memory_warns_once(caplog):
    physical = physical_memory_bytes()
    assert physical, "no physical memory size on this OS"
    too_much = round(2 * physical / 1024**3, 1)
    cfg._warned.clear()
    with caplog.at_level(logging.WARNING, logger=cfg.__name__):
        for _ in range(3):
            load_config(environ={"LMCACHE_MAX_LOCAL_CPU_SIZE": str(too_much)})
        load_config(environ={"LMCACHE_MAX_LOCAL_CPU_SIZE": "1"})
    assert caplog.text.count("more than this machine's memory") == 1
    assert "LMCACHE_MAX_LOCAL_CPU_SIZE" in caplog.text
