"""The disk tier's file I/O (chunk_file.py): payloads of many blocks, sizes on and
around block boundaries, damage anywhere in a long file, short writes, the
fallocate preallocation, and the checksum shared by the tiers of one store."""

import ctypes
import errno
import logging
import os

import pytest
import torch

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory import HostMemoryPool, MemoryFormat
from lmcache.v1.storage_backend import chunk_file, serde
from lmcache.v1.storage_backend.local_disk import LocalDiskBackend, file_name
from lmcache.v1.storage_backend.serde import HEADER_SIZE, ChecksumMemo, SerdeError
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.storage_backend.storage_manager import StorageManager
from lmcache.v1.token_database import CacheEngineKey

MB = 1024**2
W, R = chunk_file.WRITE_BLOCK, chunk_file.READ_BLOCK
# Payload sizes: one byte; on, just before and just after the end of the first read
# and write block (which holds the header too); several blocks plus a ragged end.
SIZES = [1, R - HEADER_SIZE - 1, R - HEADER_SIZE, R - HEADER_SIZE + 1, W - HEADER_SIZE, W, 3 * W + 12345]
KEY = CacheEngineKey("org/m", 1, 0, "ab" * 16, "uint8", "mla.L1.D1")


def payload_obj(pool, nbytes, seed=0):
    """A memory object of exactly `nbytes` payload bytes, filled with random bytes."""
    obj = pool.allocate((1, 1, nbytes, 1), torch.uint8, MemoryFormat.KV_MLA_FMT)
    obj.tensor.copy_(torch.randint(0, 256, obj.tensor.shape, dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(seed)))
    return obj


@pytest.fixture
def pool():
    return HostMemoryPool(16 * MB)


@pytest.mark.parametrize("nbytes", SIZES)
def test_the_file_is_the_blob_and_reads_back_exact(tmp_path, pool, nbytes):
    tier = LocalDiskBackend(str(tmp_path), 8 * MB)
    obj = payload_obj(pool, nbytes, seed=nbytes)
    assert tier.put(KEY, obj)
    assert os.listdir(tmp_path) == [file_name(KEY)]  # renamed into place, no temporary left
    # byte for byte what serde's one-shot encoder makes (independent of the block logic)
    assert (tmp_path / file_name(KEY)).read_bytes() == serde.to_bytes(obj, KEY)
    back = tier.get(KEY, pool.allocate)
    assert back is not None and torch.equal(back.tensor, obj.tensor)


def damage_at(offset):
    def damage(path):
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x10]))
    return damage


def cut(nbytes):
    return lambda path: os.truncate(path, os.path.getsize(path) - nbytes)


def grow(path):
    with open(path, "ab") as f:
        f.write(b"\0")


NBYTES = 3 * W + 12345
DAMAGE = {
    "first payload byte": damage_at(HEADER_SIZE),
    "end of first block": damage_at(R - 1),
    "middle block": damage_at(W + R + 17),
    "last byte": damage_at(HEADER_SIZE + NBYTES - 1),
    "header checksum": damage_at(HEADER_SIZE - 6),
    "truncated by one": cut(1),
    "truncated by a block": cut(R),
    "one byte appended": grow,
}


@pytest.mark.parametrize("damage", list(DAMAGE.values()), ids=list(DAMAGE))
def test_damage_anywhere_in_a_long_file_is_a_miss_and_removed(tmp_path, pool, caplog, damage):
    stats = EngineStats()
    tier = LocalDiskBackend(str(tmp_path), 8 * MB, stats)
    assert tier.put(KEY, payload_obj(pool, NBYTES))
    damage(tmp_path / file_name(KEY))
    used = pool.used_bytes
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert tier.get(KEY, pool.allocate) is None
    assert stats.misses["corrupt"] == 1 and "not a valid chunk" in caplog.text
    assert os.listdir(tmp_path) == []
    assert pool.used_bytes == used  # a buffer it read into went back to the pool


def test_a_file_shorter_than_its_header_says_is_refused_while_reading(tmp_path, pool):
    obj = payload_obj(pool, 2 * R)
    path = tmp_path / "f"
    path.write_bytes(serde.to_bytes(obj, KEY)[: HEADER_SIZE + R + 5])  # as if it shrank after the size check
    target = bytearray(2 * R)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(SerdeError, match="truncated"):
            chunk_file.read_payload(fd, target)
    finally:
        os.close(fd)


def test_short_writes_are_resumed(tmp_path, pool, monkeypatch):
    real_write = os.write

    def writev_some(fd, buffers):  # the kernel may take less than asked
        return real_write(fd, memoryview(buffers[0])[:1000])

    def write_some(fd, data):
        return real_write(fd, memoryview(data)[:777])

    monkeypatch.setattr(os, "writev", writev_some)
    monkeypatch.setattr(os, "write", write_some)
    tier = LocalDiskBackend(str(tmp_path), 8 * MB)
    obj = payload_obj(pool, W + 3000)
    assert tier.put(KEY, obj)
    monkeypatch.undo()
    assert (tmp_path / file_name(KEY)).read_bytes() == serde.to_bytes(obj, KEY)


def fake_fallocate(error):
    calls = []

    def fallocate(fd, mode, offset, length):
        calls.append(length)
        ctypes.set_errno(error)
        return -1
    return fallocate, calls


def test_without_fallocate_support_files_are_written_unpreallocated(tmp_path, pool, caplog):
    tier = LocalDiskBackend(str(tmp_path), 8 * MB)
    fn, calls = fake_fallocate(errno.EOPNOTSUPP)
    tier._preallocate._fallocate = fn
    obj = payload_obj(pool, W + 1)
    with caplog.at_level(logging.INFO, logger="lmcache"):
        assert tier.put(KEY, obj)
        assert tier.put(KEY._replace(chunk_hash="cd" * 16), obj)
    assert calls == [HEADER_SIZE + W + 1]  # asked once, then turned off
    assert not tier._preallocate.enabled and caplog.text.count("fallocate unsupported") == 1
    assert torch.equal(tier.get(KEY, pool.allocate).tensor, obj.tensor)


def test_no_space_at_preallocation_is_a_skipped_store(tmp_path, pool, caplog):
    stats = EngineStats()
    tier = LocalDiskBackend(str(tmp_path), 8 * MB, stats)
    tier._preallocate._fallocate, _ = fake_fallocate(errno.ENOSPC)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert not tier.put(KEY, payload_obj(pool, 1000))
    assert stats.misses["dropped"] == 1 and "disk full" in caplog.text
    assert os.listdir(tmp_path) == [] and tier.used_bytes == 0


@pytest.mark.skipif(chunk_file._FALLOCATE is None, reason="no fallocate(2) on this platform")
def test_the_real_fallocate_reserves_exactly_the_file(tmp_path, pool):
    tier = LocalDiskBackend(str(tmp_path), 8 * MB)
    obj = payload_obj(pool, 2 * W + 7)
    assert tier.put(KEY, obj)
    assert os.path.getsize(tmp_path / file_name(KEY)) == HEADER_SIZE + obj.nbytes


def test_a_checksum_known_from_another_tier_is_not_computed_again(tmp_path, pool, monkeypatch):
    obj = payload_obj(pool, W + 99)
    memo = ChecksumMemo()
    assert LocalDiskBackend(str(tmp_path / "a"), 8 * MB).put(KEY, obj, memo)
    assert memo.value == serde.checksum(serde.payload_view(obj.tensor))

    def no_hashing():
        raise AssertionError("the payload was hashed again")

    monkeypatch.setattr(serde, "new_checksum", no_hashing)
    second = LocalDiskBackend(str(tmp_path / "b"), 8 * MB)
    assert second.put(KEY, obj, memo)
    monkeypatch.undo()
    assert (tmp_path / "b" / file_name(KEY)).read_bytes() == serde.to_bytes(obj, KEY)


def test_a_wrong_shared_checksum_is_caught_by_the_reader(tmp_path, pool):
    obj = payload_obj(pool, 5000)
    memo = ChecksumMemo()
    memo.value = 12345  # not the payload's
    stats = EngineStats()
    tier = LocalDiskBackend(str(tmp_path), 8 * MB, stats)
    assert tier.put(KEY, obj, memo)
    assert tier.get(KEY, pool.allocate) is None and stats.misses["corrupt"] == 1


@pytest.mark.redis
def test_one_store_to_disk_and_redis_hashes_the_chunk_once(tmp_path, redis_url, monkeypatch):
    config = LMCacheEngineConfig.from_defaults(
        max_local_cpu_size=0.02, local_disk=str(tmp_path), max_local_disk_size=0.02, remote_url=redis_url,
    )
    manager = StorageManager(config)
    streams, one_shot = [], []
    real_new, real_checksum = serde.new_checksum, serde.checksum
    monkeypatch.setattr(serde, "new_checksum", lambda: streams.append(1) or real_new())
    monkeypatch.setattr(serde, "checksum", lambda p: one_shot.append(1) or real_checksum(p))
    obj = payload_obj(manager.pool, 2 * W + 5)
    expected = obj.tensor.clone()
    manager.put(KEY, obj)
    assert manager.flush(10)
    assert (len(streams), len(one_shot)) == (1, 0)  # hashed while writing the file, reused for Redis
    monkeypatch.undo()
    manager.cpu.clear()
    manager.disk.remove(KEY)
    got = manager.get(KEY)  # now only Redis has it: its blob must verify
    assert got is not None and torch.equal(got.tensor, expected)
    manager.release(got)
    manager.close()
