"""The engine's storage when the host tier is the server's (StorageManager's interface).

allocate -> a slot of the server's arena, mapped here (the connector gathers into it);
put      -> commit the slot under its key (one-way; the server now owns it);
lookup_prefix -> the server's answer over all its tiers;
get      -> the slot pinned for this process and mapped here; release -> unpinned.
A chunk pinned here once is pinned once on the server, whoever reads it here (a lease,
a load); the last release unpins it. Disk and remote tiers are the server's; so are the
chunk events (sync_events: the server's tiers' events for this engine's keys).

While the server is down every call is a miss: allocate returns None (the store is
dropped), lookups find nothing, and no call waits longer than the request timeout.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Callable

import torch

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory import MemoryFormat
from lmcache.v1.mp.arena import Arena, SlotObj
from lmcache.v1.mp.client import Connection, RequestFailed, ServerLink
from lmcache.v1.mp.server_events import ServerEvents
from lmcache.v1.mp.shared_cache import DTYPES, FORMATS, dtype_name
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.storage_backend.storage_manager import ALREADY_HELD
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger("lmcache.v1.mp")

TIER = "server"


def _offset(slot) -> int | None:
    try:
        return int(slot[0])
    except (TypeError, ValueError, IndexError):
        return None


class ServerStorage:
    cpu = disk = remote = None  # the server's tiers are not this process's

    def __init__(self, config: LMCacheEngineConfig, stats: EngineStats, host: str, port: int,
                 fallbacks: tuple[tuple[str, int], ...] = (), owns: Callable[[CacheEngineKey], bool] | None = None):
        """`owns`: which keys are this engine's (its chunk events); default none."""
        self.config = config
        self.stats = stats
        link = functools.partial(ServerLink, host, port, stats, timeout=config.remote_timeout,
                                 connect_timeout=config.remote_connect_timeout,
                                 retry_interval=min(config.remote_retry_interval, 2.0), fallbacks=fallbacks)
        self.link = link()
        # the lease prefetch's pins, which may wait for the server's L2 reads: connected on first use
        self.background_link = link(twin_of=self.link, role="prefetch")
        self.events = ServerEvents(self.link, stats, owns or (lambda key: False))
        self._pinned: dict[CacheEngineKey, tuple[SlotObj, Connection]] = {}
        self._keys: dict[int, CacheEngineKey] = {}  # id(pinned obj) -> key
        self._lock = threading.Lock()
        self._full_logged = False

    def _call(self, op: str, link: ServerLink | None = None, **fields) -> tuple[dict | None, Connection | None]:
        link = link or self.link
        conn = link.connection()
        if conn is None:
            return None, None
        try:
            return conn.call(op, **fields), conn
        except RequestFailed as exc:
            link.failed(conn, exc)
            return None, None

    def _arena(self, conn: Connection) -> Arena:
        """The connection's arena, registered for device copies the first time this process
        copies through it (only workers do: a scheduler's lookups never start a device context)."""
        arena = conn.arena
        if arena.host_registered is None:
            arena.register_host_memory()
            logger.info("LMCache: the lmcache server's shared memory (%.3g GB) is %s", arena.size / 1024**3,
                        "registered as pinned memory for device copies" if arena.host_registered else
                        "pageable here (the platform registers no host memory)")
        return arena

    # -- memory -------------------------------------------------------------------
    def allocate(self, shape, dtype: torch.dtype, fmt: MemoryFormat) -> SlotObj | None:
        shape = torch.Size(shape)
        reply, conn = self._call("alloc", shape=list(shape), dtype=dtype_name(dtype), fmt=fmt.value)
        if reply is None:
            return None
        offset = reply.get("offset")
        if offset is None:
            if not self._full_logged:
                self._full_logged = True
                logger.warning("lmcache server %s has no free slot (all pinned or being written): stores beyond "
                               "it are dropped", self.link.address)
            return None
        try:
            tensor = self._arena(conn).view(int(offset), shape, dtype)
        except (ValueError, TypeError) as exc:
            logger.warning("lmcache server %s gave slot %r: %s", self.link.address, offset, exc)
            return None
        conn.gave_out()
        return SlotObj(tensor, fmt, conn, int(offset))

    def reserve(self, keys: list[CacheEngineKey], shapes: list, dtype: torch.dtype, fmt: MemoryFormat) -> list:
        """StorageManager.reserve in one round trip: the server answers, per key, -1
        (cached already) or a slot's offset, and stops where its memory runs out."""
        shapes = [torch.Size(s) for s in shapes]
        reply, conn = self._call("reserve", keys=[k.to_string() for k in keys], shapes=[list(s) for s in shapes],
                                 dtype=dtype_name(dtype), fmt=fmt.value)
        if reply is None:
            return []
        out: list = []
        for offset, shape in zip(reply.get("slots") or [], shapes):
            if offset == -1:
                out.append(ALREADY_HELD)
                continue
            try:
                tensor = self._arena(conn).view(int(offset), shape, dtype)
            except (ValueError, TypeError) as exc:
                logger.warning("lmcache server %s gave slot %r: %s", self.link.address, offset, exc)
                conn.post("free", offset=offset)
                break
            conn.gave_out()
            out.append(SlotObj(tensor, fmt, conn, int(offset)))
        if len(out) < len(keys) and not self._full_logged:
            self._full_logged = True
            logger.warning("lmcache server %s has no free slot (all pinned or being written): stores beyond "
                           "it are dropped", self.link.address)
        return out

    # -- lookup -------------------------------------------------------------------
    def lookup_prefix(self, keys: list[CacheEngineKey]) -> int:
        if not keys:
            return 0
        reply, _ = self._call("lookup", keys=[k.to_string() for k in keys])
        return int(reply["found"]) if reply is not None else 0

    def contains_local(self, key: CacheEngineKey) -> bool:
        if key in self._pinned:
            return True
        reply, _ = self._call("contains", keys=[key.to_string()])
        return bool(reply["held"][0]) if reply is not None else False

    def host_prefix(self, keys: list[CacheEngineKey]) -> int:
        """How many of `keys`, from the first, are in the server's host memory (a pin needs no
        disk/remote read there): one round trip."""
        n = 0
        while n < len(keys) and keys[n] in self._pinned:
            n += 1
        if n == len(keys):
            return n
        reply, _ = self._call("resident", keys=[k.to_string() for k in keys[n:]])
        return n + int(reply["found"]) if reply is not None else n

    def pins(self) -> dict[str, int]:
        with self._lock:
            return {"server": len(self._pinned)}

    # -- load ---------------------------------------------------------------------
    def get(self, key: CacheEngineKey) -> SlotObj | None:
        got = self.get_many([key])
        return got[0] if got else None

    def get_many(self, keys: list[CacheEngineKey]) -> list[SlotObj]:
        """The prefix of `keys` the server holds, each with a reader reference (release())."""
        return self._pin_prefix(keys, self.link)

    def get_many_in_background(self, keys: list[CacheEngineKey]) -> list[SlotObj]:
        """get_many for the lease prefetch thread, over a connection of its own: the server's
        L2 reads its pins wait for never hold up the step's round trips."""
        return self._pin_prefix(keys, self.background_link)

    def _pin_prefix(self, keys: list[CacheEngineKey], link: ServerLink) -> list[SlotObj]:
        out: list[SlotObj] = []
        with self._lock:
            while len(out) < len(keys) and keys[len(out)] in self._pinned:
                obj = self._pinned[keys[len(out)]][0]
                obj.ref_count_up()
                out.append(obj)
        if len(out) == len(keys):
            return out
        wanted = keys[len(out):]
        reply, conn = self._call("pin", link, keys=[k.to_string() for k in wanted])
        if reply is None:
            return out
        slots = reply.get("slots") or []
        give_back = []  # offsets pinned by this reply that nobody here will use
        for i, (key, slot) in enumerate(zip(wanted, slots)):
            obj = self._view(conn, slot)
            with self._lock:
                held = self._pinned.get(key)
                if held is None and obj is None:  # unusable: the prefix ends here
                    give_back.extend(_offset(s) for s in slots[i:])
                    break
                if held is not None:  # pinned meanwhile by another thread: use that one
                    give_back.append(_offset(slot))
                    obj = held[0]
                else:
                    self._pinned[key] = (obj, conn)
                    self._keys[id(obj)] = key
                    conn.gave_out()
                obj.ref_count_up()
            out.append(obj)
            self.stats.tier_hit(TIER, obj.num_tokens)
        give_back = [o for o in give_back if o is not None]
        if give_back:
            conn.post("unpin", offsets=give_back)
        if len(out) < len(keys):
            self.stats.miss("absent")
        return out

    def _view(self, conn: Connection, slot) -> SlotObj | None:
        try:
            offset, shape, dtype, fmt = slot
            return SlotObj(self._arena(conn).view(int(offset), shape, DTYPES[dtype]), FORMATS[fmt], None, int(offset))
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("lmcache server %s described slot %r badly (%s): not used", self.link.address, slot, exc)
            return None

    def release(self, obj: SlotObj) -> None:
        obj.ref_count_down()
        with self._lock:
            if obj.in_use:
                return
            key = self._keys.pop(id(obj), None)
            held = self._pinned.get(key) if key is not None else None
            if held is None or held[0] is not obj:
                return
            del self._pinned[key]
        conn = held[1]
        conn.post("unpin", offsets=[obj.offset])
        conn.took_back()

    # -- store --------------------------------------------------------------------
    def put(self, key: CacheEngineKey, obj: SlotObj) -> None:
        """Commit a filled slot under `key`; the server owns it from now on."""
        conn = obj.detach()
        if conn is None:
            return
        if not conn.post("commit", offset=obj.offset, key=key.to_string()):
            self.stats.miss("dropped", tier=TIER)
        conn.took_back()

    def put_many(self, keys: list[CacheEngineKey], objs: list[SlotObj]) -> None:
        """put() of each (commits are one-way messages: nothing to batch here)."""
        for key, obj in zip(keys, objs):
            self.put(key, obj)

    def flush(self, timeout: float | None = None) -> bool:
        """Commits are one-way; a round trip after them means the server has them all
        (it reads a connection in order), so other processes find them from now on."""
        conn = self.link.current()  # never a new connection just for this
        if conn is None:
            return True
        try:
            conn.call("ping")
        except RequestFailed as exc:
            self.link.failed(conn, exc)
        return True

    def sync_events(self) -> None:
        """Tell this engine's observers what the server's tiers stored and lost since the
        last call (server_events.py): one round trip."""
        self.events.sync()

    def close(self, timeout: float = 30.0) -> None:
        self.flush()
        self.link.close()  # the server gives back whatever this process still held
        self.background_link.close()
        with self._lock:
            self._pinned.clear()
            self._keys.clear()
