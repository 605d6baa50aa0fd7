"""Interop with upstream LMCache 0.5.6 (its own modules from the PyPI wheel,
sha256-checked): its client against our server, our client against its server,
entries written by one client read by the other, and the headers byte for byte."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmcache.v1.memory import HostMemoryPool, MemoryFormat
from lmcache.v1.server import protocol as P
from lmcache.v1.storage_backend import lm_keys
from lmcache.v1.storage_backend.lm import LMServerBackend
from lmcache.v1.token_database import CacheEngineKey
from tests.helpers.upstream_wheel import upstream_056, upstream_env  # noqa: F401 (fixture)
from tests.helpers.host_connector import bits, random_fill
from tests.helpers.lm_peers import RawClient, lm_factory  # noqa: F401 (fixture)

pytestmark = pytest.mark.network

DRIVER = Path(__file__).parents[1] / "helpers" / "upstream_lm_driver.py"
MB = 1024**2
LAYOUT = "kv.L3.H4.D16"


def upstream(tree, port, ops):
    """Run upstream's client (or protocol classes, port=None) on `ops`."""
    proc = subprocess.run([sys.executable, str(DRIVER), json.dumps({"port": port, "ops": ops})],
                          env=upstream_env(tree), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def key(i, model="org/m", dtype="bfloat16"):
    return CacheEngineKey(model, 1, 0, f"{i:032x}", dtype, LAYOUT)


def chunk(pool, seed, dtype=torch.bfloat16, mla=False):
    fmt = MemoryFormat.KV_MLA_FMT if mla else MemoryFormat.KV_2LTD
    obj = pool.allocate((1 if mla else 2, 3, 16, 64), dtype, fmt)
    random_fill(obj.tensor, seed)
    return obj


def raw(obj) -> bytes:
    return obj.tensor.view(torch.uint8).numpy().tobytes()


def test_headers_and_keys_byte_for_byte(upstream_056):
    k = lm_keys.wire_key(key(5)).decode()
    odd = lm_keys.wire_key(key(5, model="a@b/" + "x" * 200)).decode()
    ops = [
        {"op": "request_header", "command": P.PUT, "key": k, "length": 12288, "fmt": 1, "dtype": 3,
         "shape": [2, 3, 16, 64]},
        {"op": "request_header", "command": P.GET, "key": k, "length": 0, "fmt": 1, "dtype": 2, "shape": [0, 0, 0, 0]},
        {"op": "request_header", "command": P.EXIST, "key": odd, "length": 0, "fmt": 6, "dtype": 8,
         "shape": [1, 3, 16]},
        {"op": "reply_header", "code": 200, "length": 6144, "fmt": 6, "dtype": 7, "shape": [1, 3, 16, 128]},
        {"op": "reply_header", "code": 400, "length": 0, "fmt": 1, "dtype": 2, "shape": [0, 0, 0, 0]},
        {"op": "parse_key", "key": k},
        {"op": "parse_key", "key": odd},
    ]
    got = upstream(upstream_056, None, ops)
    assert bytes.fromhex(got[0]) == P.pack_request(P.PUT, k.encode(), 12288, 1, 3, (2, 3, 16, 64))
    assert bytes.fromhex(got[1]) == P.pack_request(P.GET, k.encode())
    assert bytes.fromhex(got[2]) == P.pack_request(P.EXIST, odd.encode(), 0, 6, 8, (1, 3, 16))
    assert bytes.fromhex(got[3]) == P.Reply(200, 6144, 6, 7, (1, 3, 16, 128), 0).pack()
    assert bytes.fromhex(got[4]) == P.FAIL_REPLY
    assert got[5:] == [k, odd]  # upstream parses our keys and prints them back unchanged


def test_the_wheel_is_checked(upstream_056, tmp_path):
    from tests.helpers import upstream_wheel as uw

    good = uw.cache_dir() / uw.WHEEL
    uw.verify_wheel(good)
    bad = tmp_path / uw.WHEEL
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(uw.WheelFetchError, match="sha256"):
        uw.verify_wheel(bad)


@pytest.mark.parametrize("server_kind", ["ours", "upstream"])
def test_upstream_client_against_each_server(upstream_056, lm_factory, tmp_path, server_kind):
    """Upstream's client against our server; against its own server as the reference."""
    server = lm_factory() if server_kind == "ours" else lm_factory(upstream_tree=upstream_056)
    pool = HostMemoryPool(8 * MB)
    objs = [chunk(pool, 1), chunk(pool, 2, torch.float16, mla=True)]
    ops, keys = [], []
    for i, obj in enumerate(objs):
        k = lm_keys.wire_key(key(i, dtype=str(obj.metadata.dtype).removeprefix("torch."))).decode()
        keys.append(k)
        (tmp_path / f"in{i}").write_bytes(raw(obj))
        ops.append({"op": "put", "key": k, "file": str(tmp_path / f"in{i}"), "shape": list(obj.metadata.shape),
                    "dtype": str(obj.metadata.dtype).removeprefix("torch."), "fmt": 6 if i else 1})
    ops += [{"op": "exists", "key": k} for k in keys]
    ops += [{"op": "get", "key": k, "out": str(tmp_path / f"out{i}")} for i, k in enumerate(keys)]
    missing = lm_keys.wire_key(key(9)).decode()
    ops += [{"op": "exists", "key": missing}, {"op": "get", "key": missing, "out": str(tmp_path / "x")}]
    got = upstream(upstream_056, server.port, ops)
    assert got[2:4] == [True, True] and got[-2:] == [False, None]
    for i, obj in enumerate(objs):
        assert (tmp_path / f"out{i}").read_bytes() == raw(obj)
        assert got[4 + i]["shape"] == list(obj.metadata.shape) and got[4 + i]["fmt"] == (6 if i else 1)
    # and what upstream's client stored, our client reads (same key, same naive bytes)
    tier = LMServerBackend(server.url)
    back = tier.get(key(0), pool.allocate)
    assert back is not None and torch.equal(bits(back.tensor), bits(objs[0].tensor))
    tier.close()


def test_our_client_against_upstream_server(upstream_056, lm_factory, tmp_path):
    server = lm_factory(upstream_tree=upstream_056)
    assert "Server started at" in server.log()  # upstream's own log line: it is upstream's server
    pool = HostMemoryPool(8 * MB)
    tier = LMServerBackend(server.url)
    assert tier.health()
    cases = [(key(1), chunk(pool, 1)), (key(2, dtype="float16"), chunk(pool, 2, torch.float16, mla=True)),
             (key(3, model="team@corp/" + "m" * 200), chunk(pool, 3))]  # '@' and a key too long: both fit
    for k, obj in cases:
        assert tier.prefix_count([k]) == 0 and tier.get(k, pool.allocate) is None
        assert tier.put(k, obj)
    assert tier.prefix_count([k for k, _ in cases] + [key(4)]) == 3
    for k, obj in cases:
        back = tier.get(k, pool.allocate)
        assert back is not None and back.metadata == obj.metadata
        assert torch.equal(bits(back.tensor), bits(obj.tensor))
    assert not tier.is_down
    # upstream's own client reads what ours stored there
    wire = lm_keys.wire_key(cases[0][0]).decode()
    got = upstream(upstream_056, server.port, [{"op": "get", "key": wire, "out": str(tmp_path / "o")}])
    assert got[0]["shape"] == [2, 3, 16, 64] and (tmp_path / "o").read_bytes() == raw(cases[0][1])
    tier.close()
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_upstream_server_faults_we_survive(upstream_056, lm_factory):
    """Upstream's server stores a PUT cut short; our client then sees a reply it cannot
    trust (a miss, no exception) and goes on working."""
    server = lm_factory(upstream_tree=upstream_056)
    pool = HostMemoryPool(8 * MB)
    wire = lm_keys.wire_key(key(1))
    c = RawClient(server.port)
    c.send(P.pack_request(P.PUT, wire, 12288, 1, 3, (2, 3, 16, 64)) + b"\0" * 100)
    c.close()
    with RawClient(server.port) as probe:  # upstream stored it anyway
        assert probe.exists(wire)
    tier = LMServerBackend(server.url, retry_interval=60.0)
    assert tier.get(key(1), pool.allocate) is None
    assert tier._stats.misses["corrupt"] == 1 and not tier.is_down  # a bad entry, not an outage
    obj = chunk(pool, 5)
    assert tier.put(key(2), obj)
    back = tier.get(key(2), pool.allocate)
    assert back is not None and torch.equal(bits(back.tensor), bits(obj.tensor))
    tier.close()
