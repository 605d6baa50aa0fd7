"""What the server holds: the tiers over the arena, and what each client holds of it.

The host tier is the engine's own StorageManager with the arena as its pool (LRU
eviction, the disk/remote tiers below it, promotion of their hits), so the server
and the in-process engine share one implementation of the tiers. Per client the
server remembers the slots it allocated but has not committed and the slots it has
pinned; when the client's connection ends (it exited, crashed or was killed) both
are given back, so a dead vLLM leaks nothing.
"""

from __future__ import annotations

import logging
import threading

import torch

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory import MemoryFormat
from lmcache.v1.mp.arena import Arena, ArenaPool, SlotObj
from lmcache.v1.mp.event_log import EventLog
from lmcache.v1.mp.protocol import ProtocolError
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.storage_backend.storage_manager import StorageManager
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger("lmcache.server")

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int8)}
FORMATS = {f.value: f for f in MemoryFormat}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_key(text: str) -> CacheEngineKey:
    try:
        return CacheEngineKey.from_string(text)
    except ValueError as exc:
        raise ProtocolError(str(exc)[:200]) from None


class ClientState:
    """Slots one connection holds: allocated (being written) and pinned (being read)."""

    def __init__(self, name: str):
        self.name = name
        self.allocated: dict[int, SlotObj] = {}
        self.pinned: dict[int, list] = {}  # offset -> [obj, pins]


class SharedCache:
    def __init__(self, config: LMCacheEngineConfig, arena: Arena):
        self.arena = arena
        self.pool = ArenaPool(arena)
        self.stats = EngineStats()
        self.events = EventLog()  # what the tiers store and lose, for the clients' KV events
        self.stats.add_observer(self.events.record)
        self.storage = StorageManager(config, self.stats, pool=self.pool)
        self._lock = threading.Lock()  # per-client tables, request counts
        self.clients: set[ClientState] = set()
        self.requests: dict[str, int] = {}  # op -> messages served (requests and one-way)

    def count_request(self, op: str) -> None:
        with self._lock:
            self.requests[op] = self.requests.get(op, 0) + 1

    # -- connections -------------------------------------------------------------
    def connect(self, name: str) -> ClientState:
        client = ClientState(name)
        with self._lock:
            self.clients.add(client)
        return client

    def disconnect(self, client: ClientState) -> tuple[int, int]:
        """Give back everything the client held; (slots freed, pins released)."""
        with self._lock:
            self.clients.discard(client)
            allocated, client.allocated = list(client.allocated.values()), {}
            pinned, client.pinned = list(client.pinned.values()), {}
        for obj in allocated:
            obj.free()
        pins = 0
        for obj, count in pinned:
            for _ in range(count):
                self.storage.release(obj)
            pins += count
        return len(allocated), pins

    # -- requests ----------------------------------------------------------------
    def lookup(self, keys: list[str]) -> int:
        return self.storage.lookup_prefix([parse_key(k) for k in keys])

    def resident(self, keys: list[str]) -> int:
        return self.storage.host_prefix([parse_key(k) for k in keys])

    def contains(self, keys: list[str]) -> list[bool]:
        return [self.storage.contains_local(parse_key(k)) for k in keys]

    def alloc(self, client: ClientState, shape, dtype: str, fmt: str) -> SlotObj | None:
        if dtype not in DTYPES:
            raise ProtocolError(f"dtype {str(dtype)[:30]!r} is not accepted; accepted: {', '.join(DTYPES)}")
        if fmt not in FORMATS:
            raise ProtocolError(f"format {str(fmt)[:30]!r} is not accepted; accepted: {', '.join(FORMATS)}")
        if (not isinstance(shape, list) or len(shape) != 4
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 1 << 31 for d in shape)):
            raise ProtocolError("shape: 4 positive integers are expected")
        try:
            size = torch.Size(shape)
            nbytes = size.numel() * DTYPES[dtype].itemsize
            if nbytes > self.pool.budget_bytes:
                return None
            obj = self.storage.allocate(size, DTYPES[dtype], FORMATS[fmt])
        except ValueError as exc:
            raise ProtocolError(str(exc)[:200]) from None
        if obj is not None:
            with self._lock:
                client.allocated[obj.offset] = obj
        return obj

    def reserve(self, client: ClientState, keys: list[str], shapes: list, dtype: str, fmt: str) -> list[int]:
        """Per key: -1 if a tier holds it already, else a slot allocated for the client;
        the list ends where memory runs out."""
        if not isinstance(shapes, list) or len(shapes) != len(keys):
            raise ProtocolError("shapes: one shape per key is expected")
        out = []
        for key, shape in zip(keys, shapes):
            if self.storage.contains_local(parse_key(key)):
                out.append(-1)
                continue
            obj = self.alloc(client, shape, dtype, fmt)
            if obj is None:
                break
            out.append(obj.offset)
        return out

    def commit(self, client: ClientState, offset: int, key: str) -> None:
        parsed = parse_key(key)
        with self._lock:
            obj = client.allocated.pop(offset, None)
        if obj is None:
            raise ProtocolError(f"commit of slot {offset}, which this client has not allocated")
        self.storage.put(parsed, obj)

    def free(self, client: ClientState, offset: int) -> None:
        with self._lock:
            obj = client.allocated.pop(offset, None)
        if obj is None:
            raise ProtocolError(f"free of slot {offset}, which this client has not allocated")
        obj.free()

    def pin(self, client: ClientState, keys: list[str]) -> list[SlotObj]:
        """The prefix of `keys` some tier holds, each pinned for the client until unpinned."""
        objs = self.storage.get_many([parse_key(k) for k in keys])  # lower tiers: one batched read
        got = []
        for i, obj in enumerate(objs):
            if not isinstance(obj, SlotObj):  # cannot happen: every object comes from the arena
                for unused in objs[i:]:
                    self.storage.release(unused)
                break
            with self._lock:
                entry = client.pinned.setdefault(obj.offset, [obj, 0])
                if entry[0] is not obj:  # a stale entry would mean a slot reused while pinned
                    raise RuntimeError(f"slot {obj.offset} pinned twice as different objects")
                entry[1] += 1
            got.append(obj)
        return got

    def unpin(self, client: ClientState, offsets: list[int]) -> None:
        for offset in offsets:
            with self._lock:
                entry = client.pinned.get(offset)
                if entry is None:
                    raise ProtocolError(f"unpin of slot {offset}, which this client has not pinned")
                entry[1] -= 1
                if entry[1] == 0:
                    del client.pinned[offset]
            self.storage.release(entry[0])

    # -- observability -----------------------------------------------------------
    def status(self) -> dict:
        with self._lock:
            allocated = sum(len(c.allocated) for c in self.clients)
            pinned = sum(sum(e[1] for e in c.pinned.values()) for c in self.clients)
            clients = len(self.clients)
            requests = dict(self.requests)
        cpu = self.storage.cpu
        return {
            "clients": clients,
            "l1_bytes": self.pool.budget_bytes,
            "l1_used_bytes": self.pool.used_bytes,
            "l1_chunks": len(cpu) if cpu is not None else 0,
            "l1_chunk_bytes": cpu.used_bytes if cpu is not None else 0,
            "slots_being_written": allocated,
            "pins": pinned,
            "l2": [t.name for t in (self.storage.disk, self.storage.remote) if t is not None],
            "stats": self.stats.as_dict(),
            "requests": requests,
        }

    def close(self) -> None:
        self.storage.close()
