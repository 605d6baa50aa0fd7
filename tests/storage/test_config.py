"""Configuration: every source, their precedence, each bad value's message, unknown keys."""

import logging

import pytest

from lmcache.v1.config import (
    ConfigError,
    LMCacheEngineConfig,
    apply_overrides,
    load_config,
)

UPSTREAM_DEFAULTS = {
    "chunk_size": 256,
    "local_cpu": True,
    "max_local_cpu_size": 5.0,
    "local_disk": None,
    "max_local_disk_size": 0.0,
    "remote_url": None,
    "remote_serde": "naive",
    "save_unfull_chunk": False,
    "save_decode_cache": False,
    "use_layerwise": False,
    "min_retrieve_tokens": 0,
    "extra_config": None,
}


def write_yaml(tmp_path, text):
    path = tmp_path / "lmcache.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_upstream_ones():
    config = load_config(environ={})
    for key, value in UPSTREAM_DEFAULTS.items():
        assert getattr(config, key) == value, key
    assert LMCacheEngineConfig.from_defaults() == config


def test_each_source_alone(tmp_path, monkeypatch):
    path = write_yaml(tmp_path, "chunk_size: 64\nlocal_cpu: false\nextra_config: {a: 1}\n")
    from_file = load_config(environ={"LMCACHE_CONFIG_FILE": path})
    assert (from_file.chunk_size, from_file.local_cpu, from_file.extra_config) == (64, False, {"a": 1})
    assert LMCacheEngineConfig.from_file(path).chunk_size == 64

    from_env = load_config(environ={"LMCACHE_CHUNK_SIZE": "128", "LMCACHE_SAVE_UNFULL_CHUNK": "TRUE",
                                    "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.5", "LMCACHE_EXTRA_CONFIG": '{"x": 2}'})
    assert (from_env.chunk_size, from_env.save_unfull_chunk, from_env.max_local_cpu_size) == (128, True, 0.5)
    assert from_env.extra_config == {"x": 2}

    from_vllm = load_config({"lmcache.chunk_size": 32, "lmcache.use_layerwise": True, "other.key": 1}, environ={})
    assert (from_vllm.chunk_size, from_vllm.use_layerwise) == (32, True)

    monkeypatch.setenv("LMCACHE_MIN_RETRIEVE_TOKENS", "7")
    assert load_config().min_retrieve_tokens == 7  # os.environ by default
    assert LMCacheEngineConfig.from_env().min_retrieve_tokens == 7


def test_precedence_defaults_file_env_vllm(tmp_path):
    path = write_yaml(tmp_path, "chunk_size: 64\nmin_retrieve_tokens: 5\nsave_decode_cache: true\n")
    env = {"LMCACHE_CONFIG_FILE": path, "LMCACHE_CHUNK_SIZE": "128", "LMCACHE_MIN_RETRIEVE_TOKENS": "9"}
    vllm = {"lmcache.chunk_size": 32}
    config = load_config(vllm, environ=env)
    assert config.chunk_size == 32  # vLLM extra config beats env and file
    assert config.min_retrieve_tokens == 9  # env beats file
    assert config.save_decode_cache is True  # file beats default
    assert config.local_cpu is True  # default
    assert load_config(environ=env).chunk_size == 128
    assert config.sources["chunk_size"].startswith("vLLM kv_connector_extra_config")


def test_disk_needs_size_from_any_source_and_accepts_file_urls(tmp_path):
    env = {"LMCACHE_LOCAL_DISK": f"file://{tmp_path}/cache/", "LMCACHE_MAX_LOCAL_DISK_SIZE": "2"}
    config = load_config(environ=env)
    assert config.local_disk == f"{tmp_path}/cache/"
    assert config.local_disk_bytes == 2 * 1024**3
    # the size may come from a later source than the path
    assert load_config({"lmcache.max_local_disk_size": 1}, environ={"LMCACHE_LOCAL_DISK": str(tmp_path)}).local_disk


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379", "rediss://user:pw@cache.example:6380/2", "valkey://h", "valkeys://:pw@h:1/0",
])
def test_remote_urls_accepted(url):
    assert load_config({"lmcache.remote_url": url}, environ={}).remote_url == url


BAD = [
    # (source kind, key, value, words that must be in the message)
    ("env", "chunk_size", "0", ["positive integer"]),
    ("file", "chunk_size", "abc", ["positive integer"]),
    ("vllm", "chunk_size", 2.5, ["positive integer"]),
    ("vllm", "max_local_cpu_size", -1, ["GB >= 0"]),
    ("env", "max_local_disk_size", "-0.5", ["GB >= 0"]),
    ("env", "local_cpu", "maybe", ["boolean"]),
    ("file", "use_layerwise", "[1, 2]", ["boolean"]),
    ("vllm", "remote_url", "http://host:6379", ["redis, rediss, valkey, valkeys"]),
    ("env", "remote_url", "redis://host:notaport", ["redis, rediss, valkey, valkeys"]),
    ("env", "remote_url", "redis://:6379", ["scheme://"]),
    ("vllm", "remote_serde", "cachegen", ["naive"]),
    ("env", "min_retrieve_tokens", "-3", ["integer >= 0"]),
    ("env", "extra_config", "[1]", ["mapping"]),
    ("env", "remote_timeout", "0", ["seconds > 0"]),
    ("env", "store_queue_size", "x", ["positive integer"]),
]


@pytest.mark.parametrize("kind,key,value,words", BAD)
def test_bad_value_message_names_key_value_source_and_accepted(tmp_path, kind, key, value, words):
    if kind == "env":
        env, vllm, source = {f"LMCACHE_{key.upper()}": value}, None, f"env LMCACHE_{key.upper()}"
    elif kind == "file":
        path = write_yaml(tmp_path, f"{key}: {value}\n")
        env, vllm, source = {"LMCACHE_CONFIG_FILE": path}, None, f"file {path}"
    else:
        env, vllm, source = {}, {f"lmcache.{key}": value}, f"lmcache.{key}"
    with pytest.raises(ConfigError) as info:
        load_config(vllm, environ=env)
    message = str(info.value)
    assert f"{key}=" in message and source in message and "accepted" in message, message
    for word in words:
        assert word in message, message


def test_local_disk_that_is_a_file_is_rejected(tmp_path):
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"local_disk=.*not_a_dir.*accepted: a directory"):
        load_config({"lmcache.local_disk": str(a_file), "lmcache.max_local_disk_size": 1}, environ={})


def test_disk_without_budget_is_an_error():
    with pytest.raises(ConfigError, match=r"local_disk='/tmp/x'.*max_local_disk_size=0.0.*GB > 0"):
        load_config({"lmcache.local_disk": "/tmp/x"}, environ={})


def test_missing_and_malformed_config_files(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"nope.yaml.*env LMCACHE_CONFIG_FILE.*does not exist"):
        load_config(environ={"LMCACHE_CONFIG_FILE": missing})
    with pytest.raises(ConfigError, match=r"holds a list.*YAML mapping"):
        load_config(environ={"LMCACHE_CONFIG_FILE": write_yaml(tmp_path, "- 1\n- 2\n")})
    with pytest.raises(ConfigError, match="cannot read YAML"):
        load_config(environ={"LMCACHE_CONFIG_FILE": write_yaml(tmp_path, "a: [1\n")})


def test_unknown_keys_warn_with_closest_known_key(tmp_path, caplog):
    path = write_yaml(tmp_path, "chunk_sise: 64\n")
    with caplog.at_level(logging.WARNING, logger="lmcache.v1.config"):
        config = load_config(
            {"lmcache.max_local_cpu_sise": 1, "lmcache.zzz": 1},
            environ={"LMCACHE_CONFIG_FILE": path, "LMCACHE_LOCAL_DSK": "/tmp", "LMCACHE_DEVICE": "cpu"},
        )
    assert config.chunk_size == 256  # the typo changed nothing
    text = caplog.text
    assert "'chunk_sise'" in text and "did you mean 'chunk_size'" in text
    assert "did you mean 'max_local_cpu_size'" in text
    assert "did you mean 'local_disk'" in text and "env LMCACHE_LOCAL_DSK" in text
    assert "'zzz'" in text and "known keys" in text
    assert "device" not in text.lower().replace("lmcache_local_dsk", "")  # LMCACHE_DEVICE is not a config key


def test_apply_overrides_checks_and_keeps_sources():
    config = apply_overrides(LMCacheEngineConfig(), {"chunk_size": "16"}, source="test")
    assert config.chunk_size == 16 and config.sources["chunk_size"] == "test"
    with pytest.raises(ConfigError, match=r"chunk_size=-1 \(from test\)"):
        apply_overrides(config, {"chunk_size": -1}, source="test")
