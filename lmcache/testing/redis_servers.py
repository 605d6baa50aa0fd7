"""Real redis-servers on 127.0.0.1 at free ports, for the tests and the benchmarks:
one server (RedisServer), a Redis Cluster (RedisClusterGroup: masters with replicas,
`redis-cli --cluster create`) and a sentinel group (SentinelGroup: 1 master, 1
replica, 3 sentinels). Started and stopped by PID; members may be SIGKILLed and
restarted. The pytest fixtures are in tests/helpers/redis_fixtures.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from lmcache.testing.processes import free_port, kill_and_reap




class RedisServer:
    def __init__(self, workdir: str, port: int | None = None, extra_args: tuple[str, ...] = (),
                 sentinel_conf: str | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.sentinel_conf = sentinel_conf  # a sentinel: this (writable) config file, no data options
        self.proc: subprocess.Popen | None = None
        os.makedirs(workdir, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server; scripts/setup_env.sh installs it)")
        log = open(os.path.join(self.workdir, f"redis-{self.port}.log"), "ab")
        lead = [self.sentinel_conf, "--sentinel"] if self.sentinel_conf else []
        data = [] if self.sentinel_conf else ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [exe, *lead, "--port", str(self.port), "--bind", "127.0.0.1", *data,
             "--dir", self.workdir, "--daemonize", "no", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        log.close()
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client(socket_timeout=0.5).ping():
                    return self
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING; see {self.workdir}")
            time.sleep(0.02)

    def stop(self) -> None:
        kill_and_reap(self.proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL by PID (what it held in memory is lost), then reap it."""
        self.stop()

    @property
    def password(self) -> str | None:
        args = list(self.extra_args)
        return args[args.index("--requirepass") + 1] if "--requirepass" in args else None

    def client(self, socket_timeout: float = 2.0):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=socket_timeout)


def _info(server: RedisServer, section: str) -> dict:
    import redis

    try:
        return server.client(socket_timeout=0.5).info(section)
    except (redis.RedisError, OSError):
        return {}


def cluster_state(server: RedisServer) -> str | None:
    """CLUSTER INFO's cluster_state of a node ("ok", "fail"), None if it does not answer."""
    import redis

    try:
        text = server.client(socket_timeout=0.5).execute_command("CLUSTER INFO")
    except (redis.RedisError, OSError):
        return None
    if isinstance(text, dict):
        return text.get("cluster_state")
    text = text.decode() if isinstance(text, bytes) else str(text)
    fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
    return fields.get("cluster_state")


def _wait(what: str, done, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class RedisClusterGroup:
    """A Redis Cluster on 127.0.0.1: `masters` masters with `replicas` replicas each.
    A master that stops answering for `node_timeout_ms` is failed over to its replica;
    the other shards keep serving (cluster-require-full-coverage no)."""

    def __init__(self, workdir: str, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000):
        self.masters, self.replicas = masters, replicas
        self.workdir, self.node_timeout_ms = workdir, node_timeout_ms
        self._taken: set[int] = set()
        self.nodes = [self._node(i) for i in range(masters * (1 + replicas))]

    def _port(self) -> int:
        while True:  # distinct within the group (a node's port and its bus port)
            port = free_port()
            if port not in self._taken:
                self._taken.add(port)
                return port

    def _node(self, i: int) -> RedisServer:
        port = self._port()
        args = ("--cluster-enabled", "yes", "--cluster-port", str(self._port()),
                "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-require-full-coverage", "no", "--cluster-replica-validity-factor", "0",
                "--repl-diskless-sync-delay", "0")
        return RedisServer(os.path.join(self.workdir, f"node{i}"), port=port, extra_args=args)

    def _start_node(self, i: int) -> None:
        """Start node i; if its port was taken meanwhile (by another process), once more on new ports."""
        try:
            self.nodes[i].start()
        except RuntimeError:
            self.nodes[i] = self._node(i)
            self.nodes[i].start()

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def start(self) -> "RedisClusterGroup":
        try:
            for i in range(len(self.nodes)):
                self._start_node(i)
            cmd = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                   "--cluster-replicas", str(self.replicas), "--cluster-yes"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def running_masters(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.running and _info(n, "replication").get("role") == "master"]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every slot served by a running master, every running replica in sync."""
        def healthy():
            live = [n for n in self.nodes if n.running]
            if any(_info(n, "cluster").get("cluster_enabled") != 1 for n in live):
                return False
            states = [cluster_state(n) for n in live]
            replicas = [_info(n, "replication") for n in live]
            return (all(s == "ok" for s in states) and len(self.running_masters()) == self.masters
                    and all(r.get("master_link_status") == "up" for r in replicas if r.get("role") == "slave"))
        _wait("the cluster to be healthy", healthy, timeout)

    def flushall(self) -> None:
        for node in self.running_masters():
            node.client().flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelGroup:
    """One master, one replica, three sentinels watching them as `service`."""

    def __init__(self, workdir: str, service: str = "redismaster", down_after_ms: int = 1000):
        self.service = service
        fast_sync = ("--repl-diskless-sync-delay", "0")
        self.master = RedisServer(os.path.join(workdir, "master"), extra_args=fast_sync)
        self.replica = RedisServer(os.path.join(workdir, "replica"),
                                   extra_args=("--replicaof", "127.0.0.1", str(self.master.port), *fast_sync))
        self.sentinels = []
        for i in range(3):
            sdir = os.path.join(workdir, f"sentinel{i}")
            os.makedirs(sdir, exist_ok=True)
            conf = os.path.join(sdir, "sentinel.conf")
            with open(conf, "w") as f:
                f.write(f"sentinel monitor {service} 127.0.0.1 {self.master.port} 2\n"
                        f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                        f"sentinel failover-timeout {service} 10000\n")
            self.sentinels.append(RedisServer(sdir, sentinel_conf=conf))

    @property
    def url(self) -> str:
        return "redis-sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{self.service}"

    @property
    def data_nodes(self) -> list[RedisServer]:
        return [self.master, self.replica]

    def current_master(self) -> RedisServer:
        def known():
            return [n for n in self.data_nodes if n.running and _info(n, "replication").get("role") == "master"]
        _wait("a master", lambda: len(known()) == 1, 30)
        return known()[0]

    def start(self) -> "SentinelGroup":
        try:
            self.master.start()
            self.replica.start()
            _wait("the replica to sync",
                  lambda: _info(self.replica, "replication").get("master_link_status") == "up", 30)
            for sentinel in self.sentinels:
                sentinel.start()
            self.wait_sentinels_agree()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_sentinels_agree(self, timeout: float = 30.0) -> None:
        """Every sentinel names the running master and knows the other sentinels."""
        def agree():
            master = [n for n in self.data_nodes if n.running and _info(n, "replication").get("role") == "master"]
            if len(master) != 1:
                return False
            for s in self.sentinels:
                try:
                    state = s.client(socket_timeout=0.5).sentinel_master(self.service)
                except Exception:  # noqa: BLE001 - not ready yet
                    return False
                if int(state["port"]) != master[0].port or int(state.get("num-other-sentinels", 0)) < 2:
                    return False
            return True
        _wait("the sentinels to agree on the master", agree, timeout)

    def stop(self) -> None:
        for node in (*self.sentinels, self.replica, self.master):
            node.stop()
