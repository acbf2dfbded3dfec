"""Prometheus exposition of snapshots: text format, OpenMetrics, gzip; rendered once per
snapshot so a scrape only copies bytes."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from exporter import model as m

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def metric_families(snap: m.Snapshot, layout: m.BucketLayout) -> Iterator[Metric]:
    for spec in m.ALL_FAMILIES:
        if spec.kind is m.Kind.HISTOGRAM:
            h = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels, unit=spec.unit)
            for hs in snap.histograms.get(spec.name, ()):
                buckets = [(_le(b), float(c)) for b, c in layout.cumulative(hs.slots)]
                h.add_metric(list(hs.labels), buckets, hs.sum)
            yield h
            continue
        samples = snap.samples.get(spec.name, ())
        fam: CounterMetricFamily | GaugeMetricFamily
        if spec.kind is m.Kind.COUNTER:
            fam = CounterMetricFamily(spec.name, spec.help, labels=spec.labels, unit=spec.unit)
        else:
            fam = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels, unit=spec.unit)
        for s in samples:
            fam.add_metric(list(s.labels), s.value)
        yield fam


def _le(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(bound)


class _SnapshotCollector(Collector):
    def __init__(self, layout: m.BucketLayout) -> None:
        self.layout = layout
        self.snapshot = m.EMPTY_SNAPSHOT

    def collect(self) -> Iterator[Metric]:
        # Reads only the pinned snapshot: never a map, never the API.
        return metric_families(self.snapshot, self.layout)


@dataclass(frozen=True)
class Rendered:
    snapshot: m.Snapshot
    text: bytes
    text_gzip: bytes
    openmetrics: bytes
    openmetrics_gzip: bytes = field(repr=False, default=b"")


class Exposition:
    """Owns the registry (ours, never the process-global one) and renders snapshots."""

    def __init__(self, layout: m.BucketLayout) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _SnapshotCollector(layout)
        self.registry.register(self._collector)
        self._lock = threading.Lock()

    def render(self, snap: m.Snapshot) -> Rendered:
        with self._lock:
            self._collector.snapshot = snap
            text = generate_latest(self.registry)
            om = generate_openmetrics(self.registry)  # type: ignore[no-untyped-call]
        # Level 1: a scrape is compressed once per poll, not once per request, and level 1
        # gets most of the gain on label-heavy text.
        return Rendered(snap, text, gzip.compress(text, 1), om, gzip.compress(om, 1))
