"""LMCache's figures in vLLM's connector-stats protocol.

vLLM moves a `KVConnectorStats` from the scheduler (EngineCore) to the API-server
process as `to_dict()` (msgpack, so plain data only), rebuilds it there with
`build_kv_connector_stats(data)`, folds a logging interval's objects with
`aggregate`, logs `reduce()` as "KV Transfer metrics: ..." and hands each payload
to the Prometheus side (prom.py).

The payload describes itself:

    {"counters": {key: {labels: n}}, "gauges": {key: {labels: x}},
     "samples": {key: {labels: [seconds, ...]}}}

`labels` is the metric's label values joined by "|" ("" when it has none).
Counters add up, gauges keep the latest value, samples are histogram observations.
METRICS names every key: its Prometheus name (upstream LMCache's where upstream has
one), its kind, labels and help text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
_SECTIONS = {COUNTER: "counters", GAUGE: "gauges", HISTOGRAM: "samples"}
LABEL_SEP = "|"

_LOOKUP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MetricSpec(NamedTuple):
    prom_name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


METRICS: dict[str, MetricSpec] = {
    "lookup_requests": MetricSpec("lmcache:num_lookup_requests", COUNTER, "Lookups the scheduler asked of LMCache"),
    "lookup_tokens": MetricSpec("lmcache:num_lookup_tokens", COUNTER, "Prompt tokens looked up in LMCache"),
    "lookup_hit_tokens": MetricSpec("lmcache:num_lookup_hits", COUNTER,
                                    "Tokens LMCache held at lookup time (prefix hits)"),
    "lookup_requests_by_kind": MetricSpec("lmcache:num_lookup_requests_by_kind", COUNTER,
                                          "Lookups by kind of request: text (only), multimodal, lora, salted "
                                          "(a request of several kinds counts under each)", ("kind",)),
    "lookup_tokens_by_kind": MetricSpec("lmcache:num_lookup_tokens_by_kind", COUNTER,
                                        "Prompt tokens looked up, by kind of request", ("kind",)),
    "lookup_hit_tokens_by_kind": MetricSpec("lmcache:num_lookup_hits_by_kind", COUNTER,
                                            "Tokens LMCache held at lookup time, by kind of request", ("kind",)),
    "lookup_hit_rate": MetricSpec("lmcache:lookup_hit_rate", GAUGE,
                                  "Hit tokens / looked-up tokens over the last reporting interval"),
    "retrieve_requests": MetricSpec("lmcache:num_retrieve_requests", COUNTER, "Requests that loaded KV from LMCache"),
    "requested_tokens": MetricSpec("lmcache:num_requested_tokens", COUNTER, "Tokens vLLM asked LMCache to load"),
    "loaded_tokens": MetricSpec("lmcache:num_hit_tokens", COUNTER, "Tokens loaded from LMCache into vLLM's KV cache"),
    "load_failed_tokens": MetricSpec("lmcache:num_load_failed_tokens", COUNTER,
                                     "Tokens promised by a lookup that could not be loaded (vLLM recomputed them)"),
    "loaded_bytes": MetricSpec("lmcache:load_bytes", COUNTER, "Bytes of KV loaded from LMCache (all ranks)"),
    "store_requests": MetricSpec("lmcache:num_store_requests", COUNTER, "Requests whose KV was stored"),
    "stored_tokens": MetricSpec("lmcache:num_stored_tokens", COUNTER, "Tokens newly stored in LMCache"),
    "stored_bytes": MetricSpec("lmcache:store_bytes", COUNTER, "Bytes of KV newly stored in LMCache (all ranks)"),
    "tier_hit_tokens": MetricSpec("lmcache:tier_hit_tokens", COUNTER, "Loaded tokens by the tier that held them",
                                  ("tier",)),
    "evictions": MetricSpec("lmcache:evictions", COUNTER, "Chunks evicted to make room (all ranks)", ("tier",)),
    "tier_errors": MetricSpec("lmcache:tier_errors", COUNTER,
                              "Tier faults (corrupt data, refused chunk, tier down, write dropped), each a miss (all ranks)",
                              ("tier", "cause")),
    "skipped_saves": MetricSpec("lmcache:skipped_saves", COUNTER,
                                "Chunks not saved: queue_full (disk/remote writer), no_memory (host budget), "
                                "failed (the store raised) (all ranks)", ("reason",)),
    "local_cache_usage": MetricSpec("lmcache:local_cache_usage", GAUGE, "Bytes held by the CPU tier (all ranks)"),
    "local_storage_usage": MetricSpec("lmcache:local_storage_usage", GAUGE,
                                      "Bytes held by the local disk tier (all ranks)"),
    "held_requests": MetricSpec("lmcache:num_requests_held_for_save", GAUGE,
                                "Finished requests whose blocks vLLM keeps until their async save is done"),
    "lookup_seconds": MetricSpec("lmcache:time_to_lookup", HISTOGRAM, "Time of one lookup (seconds)",
                                 buckets=_LOOKUP_BUCKETS),
    "load_seconds": MetricSpec("lmcache:time_to_retrieve", HISTOGRAM,
                               "Time of one step's batched load (seconds)", buckets=_TRANSFER_BUCKETS),
    "store_seconds": MetricSpec("lmcache:time_to_store", HISTOGRAM,
                                "Time of one step's batched store (seconds)", buckets=_TRANSFER_BUCKETS),
}


def label_key(*values: str) -> str:
    return LABEL_SEP.join(values)


@dataclass
class LMCacheConnectorStats(KVConnectorStats):
    def __post_init__(self):
        if not isinstance(self.data, dict) or not all(s in self.data for s in _SECTIONS.values()):
            data = self.data if isinstance(self.data, dict) else {}
            self.reset()
            self._merge(data)

    def reset(self):
        self.data = {section: {} for section in _SECTIONS.values()}

    # -- recording ----------------------------------------------------------------
    def inc(self, key: str, n: int | float, *labels: str) -> None:
        if n:
            bucket = self._bucket(key, COUNTER)
            label = label_key(*labels)
            bucket[label] = bucket.get(label, 0) + n

    def set(self, key: str, value: int | float, *labels: str) -> None:
        self._bucket(key, GAUGE)[label_key(*labels)] = value

    def observe(self, key: str, values, *labels: str) -> None:
        values = [float(v) for v in values]
        if values:
            self._bucket(key, HISTOGRAM).setdefault(label_key(*labels), []).extend(values)

    def _bucket(self, key: str, kind: str) -> dict:
        spec = METRICS.get(key)
        if spec is None or spec.kind != kind:
            raise KeyError(f"{key!r} is not a known LMCache {kind} (known: {', '.join(METRICS)})")
        return self.data[_SECTIONS[kind]].setdefault(key, {})

    # -- vLLM's protocol ------------------------------------------------------------
    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if other is not None and not other.is_empty():
            self._merge(other.data)
        return self

    def _merge(self, data: dict[str, Any]) -> None:
        for key, by_label in (data.get("counters") or {}).items():
            for label, n in by_label.items():
                self._bucket(key, COUNTER)
                self.data["counters"][key][label] = self.data["counters"][key].get(label, 0) + n
        for key, by_label in (data.get("gauges") or {}).items():
            self._bucket(key, GAUGE).update(by_label)
        for key, by_label in (data.get("samples") or {}).items():
            bucket = self._bucket(key, HISTOGRAM)
            for label, values in by_label.items():
                bucket.setdefault(label, []).extend(values)

    def is_empty(self) -> bool:
        return not any(self.data.get(section) for section in _SECTIONS.values())

    def counter(self, key: str, *labels: str) -> int | float:
        return self.data["counters"].get(key, {}).get(label_key(*labels), 0)

    def reduce(self) -> dict[str, int | float]:
        """One interval in the log line: counters and gauges as they are (labelled ones
        as key[label]), lookup hit rate in percent, histograms as count and mean ms."""
        out: dict[str, int | float] = {}
        for key, by_label in self.data["counters"].items():
            for label, n in sorted(by_label.items()):
                out[f"{key}[{label}]" if label else key] = n
        tokens = self.counter("lookup_tokens")
        if tokens:
            out["lookup_hit_rate_pct"] = round(100.0 * self.counter("lookup_hit_tokens") / tokens, 1)
        for key, by_label in self.data["gauges"].items():
            if key == "lookup_hit_rate":
                continue
            for label, value in sorted(by_label.items()):
                out[f"{key}[{label}]" if label else key] = value
        for key, by_label in self.data["samples"].items():
            for label, values in sorted(by_label.items()):
                name = f"{key}[{label}]" if label else key
                out[f"{name}_count"] = len(values)
                out[f"{name.replace('_seconds', '')}_avg_ms"] = round(1000.0 * sum(values) / len(values), 3)
        return out
