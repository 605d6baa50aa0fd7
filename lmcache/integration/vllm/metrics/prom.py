"""LMCache's series on vLLM's /metrics.

`LMCachePromMetrics` is what our connector's `build_prom_metrics` returns: vLLM
builds it once in the API-server process with the metric classes it chooses
(prometheus_client's, or Ray's wrappers) and its label names (model_name, engine),
then calls `observe(payload, engine_idx)` with every `LMCacheConnectorStats.to_dict()`.

`StandaloneProm` serves users of vLLM's built-in "LMCacheConnectorV1" wrapper, which
forwards none of these hooks: with PROMETHEUS_MULTIPROC_DIR set, the scheduler
process records the same series with prometheus_client itself, and vLLM's /metrics
(which reads that directory in multiprocess mode) shows them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

from lmcache.integration.vllm.metrics.stats import COUNTER, GAUGE, HISTOGRAM, LABEL_SEP, METRICS

logger = logging.getLogger(__name__)


class LMCachePromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames: list[str], per_engine_labelvalues: dict[int, list]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics: dict[str, Any] = {}
        self._bound: dict[tuple[str, int, str], Any] = {}
        for key, spec in METRICS.items():
            kwargs: dict[str, Any] = dict(name=spec.prom_name, documentation=spec.help,
                                          labelnames=list(labelnames) + list(spec.labels))
            if spec.kind == COUNTER:
                self._metrics[key] = self._counter_cls(**kwargs)
            elif spec.kind == GAUGE:
                self._metrics[key] = self._gauge_cls(multiprocess_mode="mostrecent", **kwargs)
            else:
                self._metrics[key] = self._histogram_cls(buckets=list(spec.buckets), **kwargs)
            if not spec.labels:  # unlabelled series show (at 0) before the first figure
                for engine_idx in per_engine_labelvalues:
                    self._series(key, engine_idx, "")

    def _series(self, key: str, engine_idx: int, label: str):
        bound = self._bound.get((key, engine_idx, label))
        if bound is None:
            values = list(self.per_engine_labelvalues[engine_idx])
            if METRICS[key].labels:
                values += label.split(LABEL_SEP)
            bound = self._metrics[key].labels(*values)
            self._bound[(key, engine_idx, label)] = bound
        return bound

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for section, kind in (("counters", COUNTER), ("gauges", GAUGE), ("samples", HISTOGRAM)):
            for key, by_label in (transfer_stats_data.get(section) or {}).items():
                spec = METRICS.get(key)
                if spec is None or spec.kind != kind:
                    logger.debug("LMCache metrics: ignoring unknown %s %r", kind, key)
                    continue
                for label, value in by_label.items():
                    series = self._series(key, engine_idx, label)
                    if kind == COUNTER:
                        series.inc(value)
                    elif kind == GAUGE:
                        series.set(value)
                    else:
                        for v in value:
                            series.observe(v)


class StandaloneProm:
    """prometheus_client metrics recorded in the scheduler process (multiprocess mode)."""

    def __init__(self, vllm_config):
        from prometheus_client import Counter, Gauge, Histogram

        model = vllm_config.model_config
        name = getattr(model, "served_model_name", None) or getattr(model, "model", "")
        if isinstance(name, (list, tuple)):
            name = name[0]
        self._prom = LMCachePromMetrics(
            vllm_config, {Gauge: Gauge, Counter: Counter, Histogram: Histogram},
            ["model_name", "engine"], {0: [str(name), "0"]},
        )

    @staticmethod
    def wanted(reports_to_vllm: bool) -> bool:
        """Only where vLLM's own hooks cannot carry our figures (vLLM's wrapper, not our
        connector class, drives the connector), with a multiprocess directory set."""
        return not reports_to_vllm and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

    def observe(self, payload: dict[str, Any]) -> None:
        self._prom.observe(payload, 0)

