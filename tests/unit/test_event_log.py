"""The server's event log: numbered events, a bounded past, and a reader that fell
behind (or asks with another server's number) is told that it lost events."""

from __future__ import annotations

from lmcache.v1.mp.event_log import EventLog
from lmcache.v1.token_database import CacheEngineKey


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("m", 1, 0, f"{i:04x}", "bfloat16", "kv")


def test_events_are_numbered_and_read_from_any_number_within_reach():
    log = EventLog(capacity=8)
    for i in range(5):
        log.record("cpu", True, key(i))
    log.record("disk", False, None)
    assert log.next == 6
    events, after, lost = log.since(3)
    assert events == [["cpu", True, key(3).to_string()], ["cpu", True, key(4).to_string()], ["disk", False, None]]
    assert (after, lost) == (6, False)
    assert log.since(6) == ([], 6, False)
    events, after, lost = log.since(0, limit=2)
    assert [e[2] for e in events] == [key(0).to_string(), key(1).to_string()] and (after, lost) == (2, False)


def test_a_reader_behind_the_logs_reach_is_told_it_lost_events():
    log = EventLog(capacity=4)
    for i in range(10):
        log.record("cpu", i % 2 == 0, key(i))
    events, after, lost = log.since(2)
    assert lost and after == 10
    assert [e[2] for e in events] == [key(i).to_string() for i in range(6, 10)]  # from the oldest kept


def test_a_number_past_the_end_is_another_servers_and_counts_as_lost():
    log = EventLog()
    log.record("cpu", True, key(1))
    assert log.since(500) == ([], 1, True)
