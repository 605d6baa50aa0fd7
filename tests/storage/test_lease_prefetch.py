"""A prefetching lease (lmcache.v1.leases): the lookup answers at once, the slow reads
run on the prefetch thread, the load waits for them; a release or renewal meanwhile
leaves nothing held."""

from __future__ import annotations

import threading

import torch

from lmcache.v1.leases import LeaseTable
from lmcache.v1.memory import MemoryFormat, MemoryObj


class SlowTier:
    """get() of a key not in `fast` blocks until `gate` is set; counts references."""

    def __init__(self, keys, fast=(), missing=()):
        self.objs = {k: MemoryObj(torch.zeros(2, 1, 4, 8), MemoryFormat.KV_2LTD) for k in keys}
        self.fast, self.missing = set(fast), set(missing)
        self.gate = threading.Event()
        self.reads = []

    def get(self, key):
        if key not in self.fast:
            assert self.gate.wait(10)
        self.reads.append(key)
        if key in self.missing:
            return None
        obj = self.objs[key]
        obj.ref_count_up()
        return obj

    def release(self, obj):
        obj.ref_count_down()

    def in_use(self):
        return [k for k, o in self.objs.items() if o.in_use]


def prefix_in(fast):
    """A resident_prefix over a tier whose keys in `fast` are in host memory."""
    def count(keys):
        n = 0
        while n < len(keys) and keys[n] in fast:
            n += 1
        return n
    return count


def test_the_lookup_answers_before_the_slow_reads_and_the_load_waits_for_them():
    tier = SlowTier("abcd", fast="ab")
    leases = LeaseTable(tier.get, tier.release, ttl=60)
    assert leases.acquire("L", list("abcd"), resident_prefix=prefix_in(tier.fast)) == 4
    assert tier.reads == ["a", "b"] and not leases.wait("L", timeout=0.05)  # c, d not read yet
    tier.gate.set()
    assert leases.wait("L", timeout=10)
    assert tier.reads == list("abcd") and leases.held_chunks == 4 and leases.prefetched == 2
    assert all(leases.take(k) is tier.objs[k] for k in "abcd")
    for k in "abcd":
        tier.release(tier.objs[k])
    leases.release("L")
    assert tier.in_use() == []


def test_a_chunk_the_prefetch_cannot_read_ends_the_lease_there():
    tier = SlowTier("abcd", fast="a", missing="c")
    tier.gate.set()
    leases = LeaseTable(tier.get, tier.release, ttl=60)
    assert leases.acquire("L", list("abcd"), resident_prefix=prefix_in(tier.fast)) == 4  # optimistic
    assert leases.wait("L", timeout=10)
    assert leases.held_chunks == 2 and leases.prefetch_stopped == 1  # a, b; never d
    assert "d" not in tier.reads
    leases.release("L")
    assert tier.in_use() == []


def test_a_lease_released_or_renewed_during_its_prefetch_holds_nothing_after():
    tier = SlowTier("abcde")
    leases = LeaseTable(tier.get, tier.release, ttl=60)
    slow = prefix_in(())
    leases.acquire("L", list("ab"), resident_prefix=slow)
    leases.acquire("M", list("cd"), resident_prefix=slow)
    leases.acquire("M", list("c"), resident_prefix=slow)  # renewed: the new prefix replaces the old
    leases.release("L")
    leases.acquire("N", list("e"), resident_prefix=slow)  # queued behind the others (one thread, in order)
    tier.gate.set()
    assert leases.wait("N", timeout=10) and leases.wait("M", timeout=10) and leases.wait("L", timeout=0)
    assert leases.held_chunks == 2 and {leases.take(k) is not None for k in "ce"} == {True}
    assert leases.take("a") is None and leases.take("d") is None
    for k in "ce":
        tier.release(tier.objs[k])
    leases.release("M")
    leases.release("N")
    assert leases.held_chunks == 0 and tier.in_use() == []


def test_the_prefetch_reads_its_chunks_in_one_get_many_call():
    tier = SlowTier("abcde", fast="a", missing="d")
    tier.gate.set()
    calls = []

    def get_many(keys):  # as StorageManager.get_many: the prefix it could read
        calls.append(list(keys))
        out = []
        for key in keys:
            obj = tier.get(key)
            if obj is None:
                break
            out.append(obj)
        return out

    leases = LeaseTable(tier.get, tier.release, ttl=60, get_many=get_many)
    assert leases.acquire("L", list("abcde"), resident_prefix=prefix_in(tier.fast)) == 5  # optimistic
    assert leases.wait("L", timeout=10)
    # one call for the host-memory prefix (the lookup's), one for every chunk the prefetch reads
    assert calls == [["a"], list("bcde")]
    assert tier.reads == list("abcd")  # nothing asked again after the miss
    assert leases.held_chunks == 3 and leases.prefetched == 2 and leases.prefetch_stopped == 1
    leases.release("L")
    assert tier.in_use() == []
