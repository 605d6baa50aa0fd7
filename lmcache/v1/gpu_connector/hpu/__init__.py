"""The HPU (Gaudi) device's fast paths: batched transfers in a bounded set of shapes.

One entry for the generic connector: `HpuTransfers` (static_transfers.py), built once
per registered layout with the bucket sizes of `buckets.py` (config `hpu_slot_buckets`).
"""

from lmcache.v1.gpu_connector.hpu.buckets import SlotBuckets, parse_slot_buckets, slot_buckets
from lmcache.v1.gpu_connector.hpu.static_transfers import HpuTransfers

__all__ = ["HpuTransfers", "SlotBuckets", "parse_slot_buckets", "slot_buckets"]
