"""Faults in a tier are misses plus one log line: corrupt/truncated/foreign disk
files, a full disk, Redis killed in the middle of a run and restarted, bad
values in Redis; and a second process finds what the first stored."""

import errno
import logging
import os

import pytest

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.storage_backend import chunk_file, serde
from lmcache.v1.storage_backend.local_disk import file_name
from tests.helpers.workload import check_prompt, make_engine, outage_then_recovery, prompt_tokens, store_prompt

CS, N = 16, 64  # 4 chunks per prompt


def disk_config(path, **kw):
    return LMCacheEngineConfig.from_defaults(
        chunk_size=CS, max_local_cpu_size=0.02, local_disk=str(path), max_local_disk_size=0.02, **kw
    )


def stored_on_disk(tmp_path, p=1):
    writer, conn = make_engine(disk_config(tmp_path), N)
    store_prompt(writer, conn, p, N)
    writer.close()
    keys = [c.key for c in writer.token_db.chunks(prompt_tokens(p, N))]
    return [tmp_path / file_name(k) for k in keys]


def flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[serde.HEADER_SIZE + 100] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path):
    os.truncate(path, path.stat().st_size - 7)


def foreign(path):
    path.write_bytes(b"\x80\x04\x95" + os.urandom(3000))  # e.g. someone's pickle


def empty(path):
    path.write_bytes(b"")


def bad_header(path):
    data = bytearray(path.read_bytes())
    data[7] = 250  # unknown dtype code
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [flip_payload_byte, truncate, foreign, empty, bad_header])
def test_damaged_disk_file_is_a_logged_miss_and_removed(tmp_path, caplog, damage):
    files = stored_on_disk(tmp_path)
    damage(files[1])
    reader, conn = make_engine(disk_config(tmp_path), N)
    assert reader.lookup(prompt_tokens(1, N)) == N  # lookup does not read files
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        loaded, exact = check_prompt(reader, conn, 1, N)
        assert (loaded, exact) == (CS, True)  # the prefix before the damaged chunk, exact
        assert not files[1].exists() and files[0].exists()
        assert reader.stats.misses["corrupt"] == 1
        loaded, _ = check_prompt(reader, conn, 1, N)  # now simply absent: no second warning
        assert loaded == CS
    warnings = [r for r in caplog.records if files[1].name in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    reader.close()


def _no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


# Where the disk runs out: when the file's space is reserved (fallocate), or, on a
# file system without fallocate, in the middle of writing the payload.
FULL_AT = {"preallocate": (chunk_file.Preallocator, "__call__"), "write": (chunk_file, "_write_all")}


@pytest.mark.parametrize("where", sorted(FULL_AT))
def test_full_disk_is_a_skipped_store(tmp_path, caplog, monkeypatch, where):
    engine, conn = make_engine(disk_config(tmp_path), N)
    monkeypatch.setattr(*FULL_AT[where], _no_space)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert store_prompt(engine, conn, 1, N) == N  # the CPU tier took it
        assert store_prompt(engine, conn, 2, N) == N
        assert engine.flush(10)
    assert engine.stats.misses["dropped"] == 8
    assert os.listdir(tmp_path) == []  # no temporary files left behind
    assert caplog.text.count("disk full") == 1
    monkeypatch.undo()
    assert store_prompt(engine, conn, 3, N) == N and engine.flush(10)
    assert len(os.listdir(tmp_path)) == 4
    engine.close()


@pytest.mark.redis
def test_redis_killed_mid_run_then_back(redis_factory, caplog):
    server = redis_factory()
    outage_then_recovery(server.url, server.stop, server.start, caplog, CS, N)


@pytest.mark.redis
def test_bad_value_in_redis_is_a_miss_and_deleted(redis_url, caplog):
    config = LMCacheEngineConfig.from_defaults(chunk_size=CS, max_local_cpu_size=0.02, local_cpu=False,
                                               remote_url=redis_url)
    engine, conn = make_engine(config, N)
    store_prompt(engine, conn, 1, N)
    assert engine.flush(10)
    key = engine.token_db.chunks(prompt_tokens(1, N))[2].key.to_string()
    import redis

    client = redis.Redis.from_url(redis_url)
    client.set(key, b"not a chunk")
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert check_prompt(engine, conn, 1, N) == (2 * CS, True)
    assert client.get(key) is None and engine.stats.misses["corrupt"] == 1
    assert caplog.text.count("not a valid chunk") == 1
    engine.close()


@pytest.mark.redis
def test_second_process_finds_what_the_first_stored(tmp_path, redis_url, run_children):
    cfg = dict(chunk_size=CS, max_local_cpu_size=0.02, local_disk=str(tmp_path), max_local_disk_size=0.02,
               remote_url=redis_url)
    (stored,) = run_children(dict(config=cfg, mode="store", prompts=[1, 2], tokens=N))
    assert stored["stored"] == 2 * N

    disk_only, _ = make_engine(disk_config(tmp_path), N)
    redis_only, conn = make_engine(
        LMCacheEngineConfig.from_defaults(chunk_size=CS, max_local_cpu_size=0.02, remote_url=redis_url), N
    )
    for engine in (disk_only, redis_only):
        for p in (1, 2):
            assert engine.lookup(prompt_tokens(p, N)) == N
            assert check_prompt(engine, engine.gpu_connector, p, N) == (N, True)
        assert engine.lookup(prompt_tokens(3, N)) == 0
        engine.close()


@pytest.mark.redis
def test_full_redis_is_a_skipped_store(redis_factory, caplog):
    server = redis_factory("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    config = LMCacheEngineConfig.from_defaults(chunk_size=CS, max_local_cpu_size=0.02, local_cpu=False,
                                               remote_url=server.url)
    n = 1024  # 64 chunks of 16 KiB per prompt
    engine, conn = make_engine(config, n)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        for p in range(5):
            store_prompt(engine, conn, p, n)
            assert engine.flush(10)
    assert engine.stats.misses["dropped"] > 0
    assert caplog.text.count("SET failed") == 1, caplog.text
    assert check_prompt(engine, conn, 0, n) == (n, True)  # what fitted is intact
    engine.close()
