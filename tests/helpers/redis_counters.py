"""What a real Redis server counts itself: socket reads it processed (one per round trip of
a pipeline) and calls of one command, from INFO. Ask on a connection made beforehand: a new
one's handshake would be reads too."""

from __future__ import annotations


def round_trips_and_calls(client, command: str) -> tuple[int, int]:
    reads = int(client.info("stats")["total_reads_processed"])
    calls = int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))
    return reads, calls
