import pytest

from tests.helpers.cache_server import CacheServerProcess


@pytest.fixture
def cache_server_factory():
    started = []

    def make(**kwargs) -> CacheServerProcess:
        server = CacheServerProcess(**kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def cache_server(cache_server_factory) -> CacheServerProcess:
    return cache_server_factory().start()


@pytest.fixture(scope="module")
def module_server():
    """One server for a module's tests that leave it as they found it."""
    from lmcache.testing.processes import free_port

    http_port = free_port()
    server = CacheServerProcess(extra_args=("--http-port", str(http_port))).start()
    server.http_port = http_port
    yield server
    server.stop()
