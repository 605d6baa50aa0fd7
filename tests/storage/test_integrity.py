"""Cache poisoning, tried as an attacker would (issue 20 item 2), against the real engine
and real tiers: a real lm:// server process, a real redis-server without a password,
real files. Each attack succeeded on ec5d26c: the victim loaded the attacker's bytes
as its prompt's KV.

- Anyone who can write a shared tier and knows a prompt can compute its keys. Without
  a secret nothing can tell their chunk from ours; with `chunk_secret` a chunk without
  a valid MAC is never loaded (and is removed where the tier allows it).
- A valid chunk of another model placed under one of our keys on disk (copied, renamed,
  symlinked) names its own key in its header: refused, counted, removed, no secret needed.
- A chunk the engine refuses (valid bytes, wrong shape for it) is removed from every
  tier, so lookups stop reporting it (item 4).
"""

import logging
import os
import shutil
import struct

import pytest
import torch
import xxhash

from lmcache.testing.processes import wait_until
from lmcache.v1.cache_engine import LMCacheEngine
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.storage_backend.local_disk import file_name
from tests.helpers.host_connector import HostPagedConnector, bits
from tests.helpers.upstream_wheel import upstream_056  # noqa: F401 (fixture)
from tests.helpers.lm_peers import lm_factory  # noqa: F401 (fixture)
from tests.helpers.workload import SHAPE, check_prompt, make_engine, metadata, prompt_kv, prompt_tokens, store_prompt

CS, N = 16, 64  # 4 chunks per prompt
SECRET = "correct horse battery staple 42"
OTHER_SECRET = "another deployment's secret 0123"


def config(**kw):
    kw.setdefault("max_local_cpu_size", 0.02)
    return LMCacheEngineConfig.from_defaults(chunk_size=CS, **kw)


def poison(engine, conn, victim_prompt: int, attacker_prompt: int) -> None:
    """Store `attacker_prompt`'s KV under `victim_prompt`'s tokens (the keys anyone can compute)."""
    slots = torch.arange(N)
    conn.cache[slots] = prompt_kv(attacker_prompt, N, conn.kv_dtype)
    assert engine.store(prompt_tokens(victim_prompt, N), slot_mapping=slots) == N
    assert engine.flush(10)
    remote = engine.storage.remote
    if remote is not None:  # an lm:// PUT has no reply: wait until the server holds them all
        keys = [c.key for c in engine.token_db.chunks(prompt_tokens(victim_prompt, N))]
        assert wait_until(lambda: remote.prefix_count(keys) == len(keys), timeout=10)


def loads_attacker_kv(engine, conn, victim_prompt: int, attacker_prompt: int) -> int:
    """Tokens of victim_prompt loaded whose KV is the attacker's."""
    slots = torch.arange(N)
    conn.cache.zero_()
    loaded = int(engine.retrieve(prompt_tokens(victim_prompt, N), slot_mapping=slots).sum())
    if loaded and torch.equal(bits(conn.cache[:loaded]), bits(prompt_kv(attacker_prompt, N, conn.kv_dtype)[:loaded])):
        return loaded
    return 0


def shared_tier_attack(remote_url: str, caplog) -> list[LMCacheEngine]:
    """An engine without the secret (and one with another secret) poisons prompt 1;
    the victim, with the secret, must load none of it; a peer with the secret loads
    what the victim stored, bit-exact. Returns the engines (closed by the caller)."""
    engines = []
    attacker, a_conn = make_engine(config(remote_url=remote_url, local_cpu=True), N)
    engines.append(attacker)
    poison(attacker, a_conn, 1, 2)
    victim, v_conn = make_engine(config(remote_url=remote_url, chunk_secret=SECRET), N)
    engines.append(victim)
    assert victim.lookup(prompt_tokens(1, N)) == N  # the server says it holds them
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert loads_attacker_kv(victim, v_conn, 1, 2) == 0
        assert int(victim.retrieve(prompt_tokens(1, N), slot_mapping=torch.arange(N)).sum()) == 0
    assert victim.stats.misses["refused"] >= 1
    assert victim.lookup(prompt_tokens(1, N)) == 0  # refused: no longer reported
    assert SECRET not in caplog.text

    forger, f_conn = make_engine(config(remote_url=remote_url, chunk_secret=OTHER_SECRET), N)
    engines.append(forger)
    poison(forger, f_conn, 3, 4)  # sealed, but with another secret
    assert loads_attacker_kv(victim, v_conn, 3, 4) == 0, victim.stats.as_dict()
    assert victim.lookup(prompt_tokens(3, N)) == 0, victim.stats.as_dict()

    assert store_prompt(victim, v_conn, 5, N) == N and victim.flush(10)
    keys = [c.key for c in victim.token_db.chunks(prompt_tokens(5, N))]
    assert wait_until(lambda: victim.storage.remote.prefix_count(keys) == len(keys), timeout=10)
    peer, p_conn = make_engine(config(remote_url=remote_url, chunk_secret=SECRET), N)
    engines.append(peer)
    assert check_prompt(peer, p_conn, 5, N) == (N, True)  # sealed chunks round-trip between holders
    assert peer.stats.tier_counts.get("remote.hit_tokens") == N
    return engines


def test_lm_put_under_a_known_prompts_keys_is_not_loaded_with_a_secret(lm_factory, caplog):  # noqa: F811
    server = lm_factory("--max-size-gb", "0.25")
    engines = shared_tier_attack(server.url, caplog)
    for engine in engines:
        engine.close()


@pytest.mark.redis
def test_redis_value_under_a_known_prompts_keys_is_not_loaded_with_a_secret(redis_url, redis_server, caplog):
    engines = shared_tier_attack(redis_url, caplog)
    victim = engines[1]
    client = redis_server.client()
    key = victim.token_db.chunks(prompt_tokens(1, N))[0].key.to_string()
    assert client.exists(key) == 0  # the refused value was deleted
    for engine in engines:
        engine.close()


@pytest.mark.redis
def test_a_tampered_sealed_value_is_refused(redis_url, redis_server):
    """Someone who knows the format but not the secret edits a payload and fixes every
    checksum: the MAC still fails."""
    victim, conn = make_engine(config(remote_url=redis_url, chunk_secret=SECRET, local_cpu=True), N)
    store_prompt(victim, conn, 1, N)
    assert victim.flush(10)
    client = redis_server.client()
    name = victim.token_db.chunks(prompt_tokens(1, N))[1].key.to_string()
    blob = bytearray(client.get(name))
    blob[128 + 7] ^= 0x10
    blob[56:64] = xxhash.xxh3_64_intdigest(bytes(blob[128:])).to_bytes(8, "little")
    blob[120:128] = xxhash.xxh3_64_intdigest(bytes(blob[:120])).to_bytes(8, "little")
    client.set(name, bytes(blob))
    reader, r_conn = make_engine(config(remote_url=redis_url, chunk_secret=SECRET), N)
    assert check_prompt(reader, r_conn, 1, N) == (CS, True)  # the chunk before it only
    assert reader.stats.tier_counts.get("remote.refused") == 1 and client.exists(name) == 0
    victim.close()
    reader.close()


def test_disk_chunks_written_without_the_secret_are_not_loaded(tmp_path):
    disk = dict(local_disk=str(tmp_path), max_local_disk_size=0.02)
    writer, conn = make_engine(config(**disk), N)
    store_prompt(writer, conn, 1, N)
    writer.close()
    reader, r_conn = make_engine(config(chunk_secret=SECRET, **disk), N)
    assert check_prompt(reader, r_conn, 1, N) == (0, True)
    assert reader.stats.tier_counts.get("disk.refused") == 1
    assert reader.lookup(prompt_tokens(1, N)) == 0  # its first chunk was removed
    store_prompt(reader, r_conn, 3, N)  # the secret holder's own chunks
    reader.close()
    again, a_conn = make_engine(config(chunk_secret=SECRET, **disk), N)
    assert check_prompt(again, a_conn, 3, N) == (N, True)
    again.close()


def other_model_engine(cfg):
    conn = HostPagedConnector(N, SHAPE["num_layers"], SHAPE["num_heads"], SHAPE["head_size"], torch.float16)
    return LMCacheEngine(cfg, metadata(CS, torch.float16, model="org/another-model"), conn), conn


@pytest.mark.parametrize("how", ["copy", "rename", "symlink"])
def test_another_models_chunk_placed_under_our_key_is_refused(tmp_path, how):
    """Same dtype and shape: nothing but the key digest in its header tells them apart."""
    disk = dict(local_disk=str(tmp_path), max_local_disk_size=0.02)
    other, o_conn = other_model_engine(config(**disk))
    store_prompt(other, o_conn, 2, N)
    other.close()
    ours, conn = make_engine(config(**disk), N)
    theirs = [tmp_path / file_name(c.key) for c in other.token_db.chunks(prompt_tokens(2, N))]
    mine = [tmp_path / file_name(c.key) for c in ours.token_db.chunks(prompt_tokens(1, N))]
    for src, dst in zip(theirs, mine):
        {"copy": shutil.copyfile, "rename": os.rename, "symlink": lambda s, d: os.symlink(s, d)}[how](src, dst)
    if how == "symlink":  # the disk tier neither lists nor follows a symlink under a chunk's name
        assert ours.lookup(prompt_tokens(1, N)) == 0
        assert loads_attacker_kv(ours, conn, 1, 2) == 0
    else:
        assert ours.lookup(prompt_tokens(1, N)) == N  # the names are there
        assert loads_attacker_kv(ours, conn, 1, 2) == 0
        assert ours.stats.tier_counts.get("disk.refused") == 1  # the first chunk ends the load
        assert ours.lookup(prompt_tokens(1, N)) == 0  # removed
        assert not mine[0].exists() and not mine[0].is_symlink()
    ours.close()
    if how != "rename":  # the other model's own files are untouched and still serve it
        other, o_conn = other_model_engine(config(**disk))
        assert check_prompt(other, o_conn, 2, N) == (N, True)
        other.close()


@pytest.mark.parametrize("tier", ["disk", "redis"])
def test_a_chunk_the_engine_refuses_is_removed_from_every_tier(tmp_path, request, tier):
    """Valid bytes under our key (key digest and checksums good) but not this engine's
    shape: refused, removed from the CPU tier and the tier it came from, no longer a hit."""
    if tier == "redis":
        request.applymarker(pytest.mark.redis)
        cfg = config(remote_url=request.getfixturevalue("redis_url"))
    else:
        cfg = config(local_disk=str(tmp_path), max_local_disk_size=0.02)
    eng, conn = make_engine(cfg, N)
    store_prompt(eng, conn, 1, N)
    assert eng.flush(10)
    key = eng.token_db.chunks(prompt_tokens(1, N))[2].key
    slow = eng.storage.disk if tier == "disk" else eng.storage.remote
    other = eng.storage.pool.allocate((2, 1, CS, 256), torch.float16, eng.metadata.memory_format)  # same bytes
    slow.remove(key)
    assert slow.put(key, other)
    other.free()
    assert eng.storage.cpu.remove(key)  # as if evicted from host memory
    assert eng.lookup(prompt_tokens(1, N)) == N
    assert check_prompt(eng, conn, 1, N) == (2 * CS, True)
    assert eng.lookup(prompt_tokens(1, N)) == 2 * CS  # no longer reported
    assert not eng.storage.in_host_memory(key) and not slow.contains(key)
    assert eng.stats.misses["refused"] == 1
    eng.close()


def test_a_header_edited_on_disk_is_corrupt_even_with_a_good_payload_checksum(tmp_path):
    eng, conn = make_engine(config(local_disk=str(tmp_path), max_local_disk_size=0.02, local_cpu=True), N)
    store_prompt(eng, conn, 1, N)
    eng.close()
    path = tmp_path / file_name(eng.token_db.chunks(prompt_tokens(1, N))[1].key)
    data = path.read_bytes()
    shape = struct.pack("<4Q", 2, 2, CS, 128)
    assert data.count(shape) >= 1 and data.index(shape) < 128
    # [2, 2, 16, 128] -> [2, 1, 16, 256]: the same bytes, another layout; payload checksum still good
    path.write_bytes(data.replace(shape, struct.pack("<4Q", 2, 1, CS, 256), 1))
    reader, r_conn = make_engine(config(local_disk=str(tmp_path), max_local_disk_size=0.02), N)
    assert check_prompt(reader, r_conn, 1, N) == (CS, True)
    assert reader.lookup(prompt_tokens(1, N)) == CS and not path.exists()
    assert reader.stats.tier_counts.get("disk.corrupt") == 1
    reader.close()


def test_namespaces_keep_deployments_apart(tmp_path):
    disk = dict(local_disk=str(tmp_path), max_local_disk_size=0.02)
    a, a_conn = make_engine(config(cache_namespace="team-a", **disk), N)
    store_prompt(a, a_conn, 1, N)
    a.close()
    b, b_conn = make_engine(config(cache_namespace="team-b", **disk), N)
    assert b.lookup(prompt_tokens(1, N)) == 0 and check_prompt(b, b_conn, 1, N) == (0, True)
    b.close()
    a2, a2_conn = make_engine(config(cache_namespace="team-a", **disk), N)
    assert check_prompt(a2, a2_conn, 1, N) == (N, True)
    a2.close()
    plain, _ = make_engine(config(), N)
    assert plain.token_db.chunks(prompt_tokens(1, N))[0].key.fingerprint == "kv.L2.H4.D32"  # no tag: keys as before
    assert a2.token_db.chunks(prompt_tokens(1, N))[0].key.fingerprint.startswith("kv.L2.H4.D32.m")
    plain.close()


def test_the_secret_is_never_shown(monkeypatch, caplog):
    from lmcache.doctor import config_check
    from lmcache.v1.config import ConfigError, load_config

    for name in [n for n in os.environ if n.startswith("LMCACHE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LMCACHE_CHUNK_SECRET", SECRET)
    cfg = load_config({})
    assert cfg.chunk_secret == SECRET and SECRET not in repr(cfg)
    found, _ = config_check.checks({})
    values = [f for f in found if f.check == "config.values"][0]
    assert "chunk_secret='***' (env LMCACHE_CHUNK_SECRET)" in values.fact and SECRET not in values.fact
    short = "tooshort-secret"  # 15 characters
    monkeypatch.setenv("LMCACHE_CHUNK_SECRET", short)
    with pytest.raises(ConfigError, match="chunk_secret='\\*\\*\\*'.*at least 16") as err:
        load_config({})
    assert short not in str(err.value)
    found, _ = config_check.checks({})
    assert all(short not in f.fact for f in found)
    eng, _ = make_engine(config(chunk_secret=SECRET), N)
    assert SECRET not in repr(eng.storage.integrity) and SECRET not in repr(eng.config)
    eng.close()


def test_host_memory_checks_the_key_an_object_was_stored_under():
    eng, conn = make_engine(config(), N)
    store_prompt(eng, conn, 1, N)
    store_prompt(eng, conn, 2, N)
    mine = eng.token_db.chunks(prompt_tokens(1, N))[1].key
    theirs = eng.token_db.chunks(prompt_tokens(2, N))[1].key
    obj = eng.storage.cpu.detach(theirs)
    eng.storage.cpu.remove(mine)
    assert eng.storage.cpu.put(mine, obj)  # another chunk's object under our key (a bug, a mix-up)
    assert check_prompt(eng, conn, 1, N) == (CS, True)
    assert eng.stats.tier_counts.get("cpu.refused") == 1
    assert eng.lookup(prompt_tokens(1, N)) == CS and not eng.storage.in_host_memory(mine)
    eng.close()


@pytest.mark.network
def test_sealed_values_work_through_upstreams_own_server(upstream_056, lm_factory):  # noqa: F811
    """With a secret, values are opaque BINARY bytes to any lm:// server: upstream 0.5.6's
    server stores and returns them, and what its clients could PUT (no MAC) is refused."""
    server = lm_factory(upstream_tree=upstream_056)
    victim, conn = make_engine(config(remote_url=server.url, chunk_secret=SECRET), N)
    assert store_prompt(victim, conn, 1, N) == N and victim.flush(10)
    keys = [c.key for c in victim.token_db.chunks(prompt_tokens(1, N))]
    assert wait_until(lambda: victim.storage.remote.prefix_count(keys) == len(keys), timeout=10)
    peer, p_conn = make_engine(config(remote_url=server.url, chunk_secret=SECRET), N)
    assert check_prompt(peer, p_conn, 1, N) == (N, True)
    attacker, a_conn = make_engine(config(remote_url=server.url), N)
    poison(attacker, a_conn, 2, 3)
    assert loads_attacker_kv(peer, p_conn, 2, 3) == 0 and peer.stats.tier_counts.get("remote.refused") == 1
    for engine in (victim, peer, attacker):
        engine.close()
    # (upstream's server logs a ConnectionResetError here: a refused reply's payload is
    # never read, the connection is closed instead, and that kills its handler thread only)


@pytest.mark.redis
def test_a_redis_value_copied_under_another_key_is_refused_without_a_secret(redis_url, redis_server):
    other, o_conn = other_model_engine(config(remote_url=redis_url))
    store_prompt(other, o_conn, 2, N)
    assert other.flush(10)
    ours, conn = make_engine(config(remote_url=redis_url), N)
    client = redis_server.client()
    theirs = [c.key.to_string() for c in other.token_db.chunks(prompt_tokens(2, N))]
    mine = [c.key.to_string() for c in ours.token_db.chunks(prompt_tokens(1, N))]
    for src, dst in zip(theirs, mine):
        client.set(dst, client.get(src))
    assert loads_attacker_kv(ours, conn, 1, 2) == 0
    assert ours.stats.tier_counts.get("remote.refused") == 1 and client.exists(mine[0]) == 0
    other.close()
    ours.close()


def test_a_big_chunk_is_sealed_over_every_leaf():
    """Chunks over 4 MiB are MAC'd through per-leaf digests hashed on several threads: a
    byte changed in any leaf (checksums fixed up) is refused; the same bytes verify."""
    from lmcache.v1.memory import HostMemoryPool, MemoryFormat
    from lmcache.v1.storage_backend import serde
    from tests.helpers.host_connector import random_fill

    pool = HostMemoryPool(64 << 20)
    obj = pool.allocate((2, 2, 1024, 1536), torch.float16, MemoryFormat.KV_2LTD)  # 12 MiB: 3 leaves
    random_fill(obj.tensor, 7)
    key = metadata_key(1)
    sealer = serde.Integrity(SECRET)
    blob = serde.to_bytes(obj, key, sealer)
    back = serde.from_bytes(blob, pool.allocate, key, sealer)
    assert back is not None and torch.equal(bits(back.tensor), bits(obj.tensor))
    back.free()
    payload = bytearray(blob[serde.HEADER_SIZE:])
    digest = serde.payload_digest(payload)
    for offset in (5, (4 << 20) + 5, obj.nbytes - 5):  # first, middle and last leaf
        payload[offset] ^= 0x01
        assert serde.payload_digest(payload) != digest
        payload[offset] ^= 0x01
        forged = bytearray(blob)
        forged[serde.HEADER_SIZE + offset] ^= 0x01
        forged[56:64] = xxhash.xxh3_64_intdigest(bytes(forged[serde.HEADER_SIZE:])).to_bytes(8, "little")
        forged[120:128] = xxhash.xxh3_64_intdigest(bytes(forged[:120])).to_bytes(8, "little")
        serde.decode_header(bytes(forged))  # well-formed: only the MAC can tell
        with pytest.raises(serde.RefusedChunk, match="MAC"):
            serde.from_bytes(bytes(forged), pool.allocate, key, sealer)
    assert serde.payload_digest(payload) == digest
    with pytest.raises(serde.RefusedChunk, match="another key"):
        serde.from_bytes(blob, pool.allocate, metadata_key(2), sealer)
    assert serde.from_bytes(blob, pool.allocate, key, serde.NO_SECRET) is not None  # no secret: key check only


def metadata_key(i):
    from lmcache.v1.token_database import CacheEngineKey

    return CacheEngineKey("org/model-7B", 1, 0, f"{i:032x}", "float16", "kv.L2.H4.D32")
