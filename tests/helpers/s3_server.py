"""The S3 fixtures (SeaweedFS on 127.0.0.1, lmcache/testing/s3_server.py): import
`s3_server` and `s3_env` into a test module to use them."""

from __future__ import annotations

import pytest

from lmcache.testing.s3_server import BUCKET, CREDENTIALS, SeaweedS3  # noqa: F401 - re-exported


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    server = SeaweedS3(str(tmp_path_factory.mktemp("seaweedfs"))).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The server running, its bucket empty, its credentials in the environment (as
    an operator would set AWS_*); returns the server."""
    if not s3_server.running:
        s3_server.start()
    s3_server.empty_bucket()
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return s3_server
