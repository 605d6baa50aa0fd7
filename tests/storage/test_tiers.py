"""Bit-exact round trips through each tier and through the storage manager,
for bf16, fp16, fp32 and fp8, MLA and non-MLA memory objects."""

import logging
import os

import pytest
import torch

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory import HostMemoryPool
from lmcache.v1.storage_backend import serde
from lmcache.v1.storage_backend.local_cpu import LocalCPUBackend
from lmcache.v1.storage_backend.local_disk import LocalDiskBackend, file_name
from lmcache.v1.storage_backend.remote import RemoteBackend
from lmcache.v1.storage_backend.serde import SerdeError
from lmcache.v1.storage_backend.storage_manager import StorageManager
from tests.helpers.host_connector import bits
from tests.helpers.tier_objects import CASES, IDS, MB, key, make_obj, same

@pytest.mark.parametrize("dtype,mla", CASES, ids=IDS)
def test_serde_round_trip_and_rejections(dtype, mla):
    pool = HostMemoryPool(8 * MB)
    obj = make_obj(pool, dtype, mla)
    blob = serde.to_bytes(obj)
    assert len(blob) == serde.HEADER_SIZE + obj.nbytes
    back = serde.from_bytes(blob, pool.allocate)
    assert same(obj, back)
    flipped = bytearray(blob)
    flipped[serde.HEADER_SIZE + 5] ^= 0x01
    with pytest.raises(SerdeError, match="checksum"):
        serde.from_bytes(bytes(flipped), pool.allocate)
    with pytest.raises(SerdeError, match="truncated"):
        serde.from_bytes(blob[:-1], pool.allocate)
    with pytest.raises(SerdeError, match="magic"):
        serde.from_bytes(b"\x80\x04" + blob[2:], pool.allocate)  # e.g. a pickle
    with pytest.raises(SerdeError, match="shorter"):
        serde.from_bytes(blob[:10], pool.allocate)


@pytest.mark.parametrize("dtype,mla", CASES, ids=IDS)
def test_cpu_tier_round_trip(dtype, mla):
    pool = HostMemoryPool(8 * MB)
    tier = LocalCPUBackend(8 * MB)
    obj = make_obj(pool, dtype, mla)
    expected = obj.tensor.clone()
    assert tier.put(key(1), obj)
    got = tier.get(key(1))
    assert got.in_use and torch.equal(bits(got.tensor), bits(expected))
    got.ref_count_down()


@pytest.mark.parametrize("dtype,mla", CASES, ids=IDS)
def test_disk_tier_round_trip_and_restart(tmp_path, dtype, mla):
    pool = HostMemoryPool(8 * MB)
    tier = LocalDiskBackend(str(tmp_path), 8 * MB)
    obj = make_obj(pool, dtype, mla)
    assert tier.put(key(1), obj)
    assert os.listdir(tmp_path) == [file_name(key(1))]  # no temporary file left behind
    assert same(tier.get(key(1), pool.allocate), obj)
    restarted = LocalDiskBackend(str(tmp_path), 8 * MB)
    assert len(restarted) == 1 and restarted.used_bytes == serde.HEADER_SIZE + obj.nbytes
    assert restarted.contains(key(1)) and not restarted.contains(key(2))
    assert same(restarted.get(key(1), pool.allocate), obj)


@pytest.mark.redis
@pytest.mark.parametrize("dtype,mla", CASES, ids=IDS)
def test_remote_tier_round_trip(redis_url, dtype, mla):
    pool = HostMemoryPool(8 * MB)
    tier = RemoteBackend(redis_url)
    obj = make_obj(pool, dtype, mla)
    assert tier.put(key(1), obj)
    assert tier.prefix_count([key(1), key(2)]) == 1
    assert same(tier.get(key(1), pool.allocate), obj)
    assert tier.get(key(2), pool.allocate) is None
    tier.close()


@pytest.mark.redis
def test_remote_valkey_scheme_with_password(redis_factory, caplog):
    server = redis_factory("--requirepass", "s3cret")
    pool = HostMemoryPool(8 * MB)
    obj = make_obj(pool, torch.bfloat16, False)
    tier = RemoteBackend(f"valkey://:s3cret@127.0.0.1:{server.port}/0")
    assert tier.put(key(1), obj) and same(tier.get(key(1), pool.allocate), obj)
    with caplog.at_level(logging.WARNING):
        wrong = RemoteBackend(f"valkey://:wrong@127.0.0.1:{server.port}")
        assert wrong.get(key(1), pool.allocate) is None  # a miss, not an exception
    assert "s3cret" not in caplog.text and "wrong" not in caplog.text


def manager(tmp_path, redis_url, **overrides):
    config = LMCacheEngineConfig.from_defaults(
        max_local_cpu_size=0.01, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.01,
        remote_url=redis_url, **overrides,
    )
    return StorageManager(config)


@pytest.mark.redis
@pytest.mark.parametrize("dtype,mla", CASES, ids=IDS)
def test_manager_round_trip_through_every_tier(tmp_path, redis_url, dtype, mla):
    first = manager(tmp_path, redis_url)
    obj = make_obj(first.pool, dtype, mla)
    expected = HostMemoryPool(8 * MB).allocate(obj.metadata.shape, dtype, obj.fmt)
    expected.tensor.copy_(obj.tensor)
    first.put(key(1), obj)
    assert first.flush(10)
    assert first.lookup_prefix([key(1), key(2)]) == 1
    got = first.get(key(1))  # from the CPU tier
    assert same(got, expected)
    first.release(got)
    first.close()

    second = manager(tmp_path, redis_url)  # empty CPU tier: the disk has it
    got = second.get(key(1))
    assert same(got, expected)
    second.release(got)
    assert second.cpu.contains(key(1))  # promoted
    second.close()

    os.unlink(tmp_path / "disk" / file_name(key(1)))
    third = manager(tmp_path, redis_url, local_cpu=False)  # only Redis has it now
    assert third.lookup_prefix([key(1)]) == 1
    got = third.get(key(1))
    assert same(got, expected)
    third.release(got)
    assert third.pool.used_bytes == 0  # a chunk no tier keeps is freed after use
    third.close()


@pytest.mark.redis
def test_lookup_walks_tiers_and_stops_at_the_first_gap(tmp_path, redis_url):
    m = manager(tmp_path, redis_url)
    pool = m.pool
    for i in (0, 1, 2, 4):
        m.put(key(i), make_obj(pool, torch.float16, False, seed=i))
    assert m.flush(10)
    m.cpu.remove(key(1))  # 1 only on disk and Redis
    os.unlink(tmp_path / "disk" / file_name(key(2)))
    m.disk._forget(file_name(key(2)))
    m.cpu.remove(key(2))  # 2 only in Redis
    assert m.lookup_prefix([key(i) for i in range(5)]) == 3  # 3 is missing everywhere
    assert not m.cpu.contains(key(1))  # lookup has no side effects
    m.close()
