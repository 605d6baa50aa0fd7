import pytest

from tests.helpers.cache_server import CHUNK, CacheServerProcess


@pytest.fixture
def cache_server_factory():
    started = []

    def make(**kwargs) -> CacheServerProcess:
        server = CacheServerProcess(**{"chunk_size": CHUNK, **kwargs})
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
    server = CacheServerProcess(chunk_size=CHUNK).start()
    yield server
    server.stop()
