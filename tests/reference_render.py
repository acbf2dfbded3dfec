"""The reference exposition: a snapshot rendered by prometheus_client's own generic writers,
through a collector in a registry of its own. exporter.export.prometheus.render_fast must
match it byte for byte (tests/unit/test_render_fast.py); it is 20-30 times slower, so the
exporter never uses it."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from exporter.metrics import model as m


def metric_families(snap: m.Snapshot, layout: m.BucketLayout) -> Iterator[Metric]:
    """Every family of the catalogue with the snapshot's samples, as prometheus_client metrics."""
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
    def __init__(self, snap: m.Snapshot, layout: m.BucketLayout) -> None:
        self.snap = snap
        self.layout = layout

    def collect(self) -> Iterator[Metric]:
        return metric_families(self.snap, self.layout)


def render_with_client(snap: m.Snapshot, layout: m.BucketLayout) -> tuple[bytes, bytes]:
    """(text, OpenMetrics) of the snapshot's families by prometheus_client's writers."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap, layout))
    return generate_latest(registry), generate_openmetrics(registry)  # type: ignore[no-untyped-call]
