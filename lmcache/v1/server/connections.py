"""Who may connect, and how many: the server's connection table.

Each open connection is in one phase: IDLE (between requests), HEADER (part of a
request header received) or BUSY (a request being served). At --max-clients, a
newcomer displaces the connection that has been IDLE or stuck in HEADER the
longest (silent connections, or 185 of 186 header bytes, can no longer lock real
clients out); only if every connection is busy is the newcomer refused.

An allow-list (--allow CIDR, repeatable) closes connections from any other address
at once; without one, every peer that can reach the port may connect.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

logger = logging.getLogger("lmcache.v1.server")

IDLE, HEADER, BUSY = "idle", "header", "busy"


class Conn:
    __slots__ = ("sock", "peer", "phase", "since", "dropped")

    def __init__(self, sock: socket.socket, peer: str):
        self.sock, self.peer = sock, peer
        self.phase = IDLE
        self.since = time.monotonic()  # when it entered its phase
        self.dropped = False


def parse_networks(cidrs) -> tuple:
    """ip_network objects; ValueError naming the bad entry."""
    nets = []
    for text in cidrs:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"--allow {text!r} is not an address or network (e.g. 10.0.0.0/8, 192.168.1.7, fd00::/8)")
    return tuple(nets)


def peer_address(address: str):
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback_host(host: str) -> bool:
    try:
        return peer_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class ConnectionTable:
    def __init__(self, max_clients: int, allow: tuple = ()):
        self.max_clients = max_clients
        self.allow = allow
        self._conns: dict[int, Conn] = {}  # id(socket) -> Conn
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns.values() if not c.dropped)

    def allowed(self, address: str) -> bool:
        if not self.allow:
            return True
        try:
            ip = peer_address(address)
        except ValueError:
            return False
        return any(ip.version == net.version and ip in net for net in self.allow)

    def admit(self, sock: socket.socket, client_address) -> Conn | None:
        """Register a new connection, displacing the longest-quiet one at the cap; None: refuse it."""
        peer = "%s:%s" % client_address[:2]
        if not self.allowed(client_address[0]):
            logger.warning("client %s refused: not in --allow", peer)
            return None
        victim = None
        with self._lock:
            open_now = sum(1 for c in self._conns.values() if not c.dropped)
            if open_now >= self.max_clients:
                quiet = [c for c in self._conns.values() if not c.dropped and c.phase != BUSY]
                if not quiet:
                    logger.warning("client %s refused: %d connections open, all busy (--max-clients)", peer, open_now)
                    return None
                victim = min(quiet, key=lambda c: c.since)
                victim.dropped = True
            conn = Conn(sock, peer)
            self._conns[id(sock)] = conn
        if victim is not None:
            logger.warning("client %s (%s for %.1f s) dropped to make room for %s (--max-clients %d)", victim.peer,
                           victim.phase, time.monotonic() - victim.since, peer, self.max_clients)
            shut(victim.sock)
        return conn

    def get(self, sock: socket.socket) -> Conn | None:
        with self._lock:
            return self._conns.get(id(sock))

    def remove(self, conn: Conn) -> None:
        with self._lock:
            if self._conns.get(id(conn.sock)) is conn:
                del self._conns[id(conn.sock)]

    def enter(self, conn: Conn, phase: str) -> bool:
        """Move to a phase; False if the connection was dropped meanwhile (stop serving it)."""
        with self._lock:
            conn.phase = phase
            conn.since = time.monotonic()
            return not conn.dropped

    def shut_all(self) -> None:
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            shut(conn.sock)


def shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
