"""The doctor's tier checks reach each tier for real: a disk directory, a Redis server,
an lm:// server, host memory; OK on a working one, FAIL on a real mistake."""

import socket
import struct
import threading


from lmcache.doctor import lm_health, tiers
from lmcache.doctor.report import FAIL, OK, SKIP, WARN
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.testing.processes import free_port


def _config(**values):
    config = LMCacheEngineConfig()
    for k, v in values.items():
        setattr(config, k, v)
    return config


def test_disk_ok_probe_leaves_nothing_behind(tmp_path):
    cached = tmp_path / "some-chunk.kv"
    cached.write_bytes(b"x" * 100)  # a chunk of the real cache: must stay untouched
    found = tiers.disk(_config(local_disk=str(tmp_path), max_local_disk_size=0.001))
    assert found.status == OK and "probe written + read + deleted" in found.fact and "holds 1 chunk files" in found.fact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some-chunk.kv"] and cached.read_bytes() == b"x" * 100


def test_disk_under_a_regular_file_fails(tmp_path):
    # A real mistake that stops root too: local_disk points below a file (e.g. a config file's path).
    not_a_dir = tmp_path / "lmcache.yaml"
    not_a_dir.write_text("chunk_size: 256\n")
    found = tiers.disk(_config(local_disk=str(not_a_dir / "cache"), max_local_disk_size=1.0))
    assert found.status == FAIL and "ENOTDIR" in found.fact and "regular file" in found.fix


def test_disk_budget_over_the_free_space_warns(tmp_path):
    found = tiers.disk(_config(local_disk=str(tmp_path), max_local_disk_size=10.0**7))
    assert found.status == WARN and "larger than the disk" in found.fact


def test_host_memory_budget():
    assert tiers.host_memory(_config(max_local_cpu_size=0.5)).status == OK
    too_big = tiers.host_memory(_config(max_local_cpu_size=10.0**6))
    assert too_big.status == FAIL and "larger than the machine's memory" in too_big.fact
    assert tiers.host_memory(_config(local_cpu=False)).status == SKIP


def test_redis_ok(redis_url):
    found = tiers.remote(_config(remote_url=redis_url), timeout=2.0)
    assert found.status == OK and "ping" in found.fact and "probe set+get+delete" in found.fact


def test_redis_dead_port_fails():
    found = tiers.remote(_config(remote_url=f"redis://127.0.0.1:{free_port()}"), timeout=0.5)
    assert found.status == FAIL and "cannot reach the server" in found.fact


def test_redis_noeviction_with_a_limit_warns(redis_factory):
    server = redis_factory("--maxmemory", "64mb", "--maxmemory-policy", "noeviction")
    found = tiers.remote(_config(remote_url=server.url), timeout=2.0)
    assert found.status == WARN and "noeviction" in found.fact


class _LmServer:
    """A stand-in lm:// server that holds requests to upstream's rules: 186-byte headers,
    a key field that must parse as model@world@worker@hex@dtype (else the connection is
    dropped, as upstream's server does), a 36-byte reply with the code first."""

    def __init__(self, code=200):
        self.code, self.requests = code, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"lm://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def _key_parses(key: str) -> bool:
        parts = key.split("@")
        if len(parts) < 5 or not (parts[1].isdigit() and parts[2].isdigit()):
            return False
        try:
            int(parts[3], 16)
        except ValueError:
            return False
        return parts[4] in ("half", "bfloat16", "float", "double", "uint8")

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            while True:
                data = b""
                while len(data) < 186:
                    part = conn.recv(186 - len(data))
                    if not part:
                        return
                    data += part
                command = struct.unpack("9i", data[:36])[0]
                key = data[36:].decode().rstrip(" ")
                self.requests.append((command, key))
                if command != 5 or not self._key_parses(key):
                    return
                conn.sendall(struct.pack("9i", self.code, 0, 0, 0, 0, 0, 0, 0, 0))


def test_lm_health_ok():
    server = _LmServer()
    found = tiers.remote(_config(remote_url=server.url), timeout=2.0)
    assert found.status == OK and "HEALTH answered 200" in found.fact
    assert server.requests == [(5, lm_health.PROBE_KEY)] * 3


def test_lm_unhealthy_reply_fails():
    found = tiers.remote(_config(remote_url=_LmServer(code=400).url), timeout=2.0)
    assert found.status == FAIL and "code 400" in found.fact


def test_lm_dead_port_fails():
    found = tiers.remote(_config(remote_url=f"lm://127.0.0.1:{free_port()}"), timeout=0.5)
    assert found.status == FAIL and "HEALTH failed" in found.fact


def test_lm_probe_key_is_what_upstreams_server_parses():
    assert _LmServer._key_parses(lm_health.PROBE_KEY)
    assert len(lm_health.health_request()) == 186


def test_no_tier_at_all_warns():
    found = tiers.checks(_config(local_cpu=False), timeout=0.5)
    assert [f.status for f in found if f.check == "tiers.all"] == [WARN]
