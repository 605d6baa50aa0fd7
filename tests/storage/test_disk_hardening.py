"""The disk tier's directory as someone else may shape it: symlinks under chunk
names, files planted at temporary names, a directory owned by another user,
read-only or unreadable, and a budget smaller than one chunk.

Permission cases run the tier in a child process; when the tests run as root, the
child runs without the capabilities that let root ignore permissions (setpriv)."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lmcache.v1.config import ConfigError
from lmcache.v1.memory import HostMemoryPool
from lmcache.v1.storage_backend import local_disk
from lmcache.v1.storage_backend.local_disk import LocalDiskBackend, file_name
from lmcache.v1.storage_backend.stats import EngineStats
from tests.helpers.tier_objects import MB, key, make_obj, same

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOBODY = 65534
AS_ROOT = os.geteuid() == 0

CHILD = r"""
import json, logging, sys, torch
from lmcache.v1.memory import HostMemoryPool
from lmcache.v1.storage_backend.local_disk import LocalDiskBackend
from tests.helpers.tier_objects import key, make_obj
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.INFO)
try:
    tier = LocalDiskBackend(sys.argv[1], int(sys.argv[2]))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc), "lines": lines}))
    sys.exit(0)
pool = HostMemoryPool(16 * 1024**2)
obj = make_obj(pool, torch.bfloat16, False)
stored = [tier.put(key(i), obj) for i in range(1, 21)]
print(json.dumps({"stored": sum(stored), "lines": lines, "found": tier.get(key(0), pool.allocate) is not None}))
"""


def run_tier_elsewhere(directory, budget: int = 64 * MB) -> dict:
    """The tier in a child process that permissions apply to (root: without
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH)."""
    prefix = []
    if AS_ROOT:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run a root child that obeys permissions"
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    proc = subprocess.run([*prefix, sys.executable, "-c", CHILD, str(directory), str(budget)], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_symlink_under_a_chunk_name_is_never_followed(tmp_path, caplog):
    pool = HostMemoryPool(8 * MB)
    stats = EngineStats()
    tier = LocalDiskBackend(str(tmp_path / "d"), 64 * MB, stats)
    obj = make_obj(pool, torch.bfloat16, False)
    assert tier.put(key(1), obj)
    real = tmp_path / "d" / file_name(key(1))
    link = tmp_path / "d" / file_name(key(2))
    os.symlink(real, link)  # a valid chunk, of another key, under key 2's name
    assert not tier.contains(key(2))
    with caplog.at_level(logging.WARNING):
        assert tier.get(key(2), pool.allocate) is None
    assert "symbolic link" in caplog.text and not os.path.lexists(link) and real.exists()
    assert stats.as_dict()["misses_corrupt"] == 1
    assert same(tier.get(key(1), pool.allocate), obj)  # the real one is untouched
    fifo = tmp_path / "d" / file_name(key(3))
    os.mkfifo(fifo)  # would block a plain open()
    assert tier.get(key(3), pool.allocate) is None and not fifo.exists()


def test_temporary_files_never_write_through_what_is_planted(tmp_path, monkeypatch):
    import threading

    pool = HostMemoryPool(8 * MB)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = tmp_path / "d"
    tier = LocalDiskBackend(str(d), 64 * MB)
    name = file_name(key(1))
    monkeypatch.setattr(local_disk.os, "urandom", lambda n: b"\x01" * n)
    for planted in (f".{name}.{os.getpid()}.{'01' * 6}.tmp",  # the name it will pick now
                    f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"):  # the name it used to pick
        os.symlink(victim, d / planted)
    tier.put(key(1), make_obj(pool, torch.bfloat16, False))
    assert victim.read_bytes() == b"precious"


def test_a_directory_owned_by_another_user_warns(tmp_path, caplog):
    if not AS_ROOT:
        pytest.skip("making a directory owned by another user needs root")
    d = tmp_path / "theirs"
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    with caplog.at_level(logging.WARNING):
        LocalDiskBackend(str(d), 64 * MB)
    assert f"owned by uid {NOBODY}" in caplog.text
    mine = tmp_path / "open"
    mine.mkdir()
    os.chmod(mine, 0o777)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        LocalDiskBackend(str(mine), 64 * MB)
    assert "writable by every user" in caplog.text


def test_a_read_only_directory_is_one_line_and_still_serves(tmp_path):
    d = tmp_path / "ro"
    pool = HostMemoryPool(32 * MB)
    writer = LocalDiskBackend(str(d), 64 * MB)  # files from an earlier run, more than the child's budget allows
    for i in range(8):
        assert writer.put(key(100 + i), make_obj(pool, torch.bfloat16, False, tokens=2048))
    assert writer.put(key(0), make_obj(pool, torch.bfloat16, False))
    os.chmod(d, 0o555)
    try:
        out = run_tier_elsewhere(d, budget=8 * MB)
    finally:
        os.chmod(d, 0o755)
    assert out["stored"] == 0 and out["found"]
    assert sum("read-only" in line for line in out["lines"]) == 1, out["lines"]
    assert len(out["lines"]) <= 3, out["lines"]


def test_an_unreadable_directory_fails_start_up_naming_local_disk(tmp_path):
    d = tmp_path / "private"
    d.mkdir()
    os.chmod(d, 0)
    try:
        out = run_tier_elsewhere(d)
    finally:
        os.chmod(d, 0o700)
    assert out.get("error") == "ConfigError", out
    assert "local_disk=" in out["message"] and "cannot be read" in out["message"]


def test_budget_smaller_than_one_chunk_says_so_once(tmp_path, caplog):
    pool = HostMemoryPool(8 * MB)
    tier = LocalDiskBackend(str(tmp_path / "d"), 1000)
    with caplog.at_level(logging.WARNING):
        for i in range(5):
            assert not tier.put(key(i), make_obj(pool, torch.bfloat16, False))
    assert caplog.text.count("max_local_disk_size (1000 bytes) is smaller than one chunk") == 1


def test_a_local_disk_that_cannot_be_created_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="local_disk="):
        LocalDiskBackend(str(tmp_path / "file" / "sub"), 64 * MB)
