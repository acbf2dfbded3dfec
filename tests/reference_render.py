"""The reference exposition: a snapshot rendered by prometheus_client's own generic writers,
through a collector in a registry of its own. exporter.export.prometheus.render_fast must
match it byte for byte (tests/unit/test_render_fast.py); it is 20-30 times slower, so the
exporter never uses it.

OpenMetrics gets a `_created` sample, `Snapshot.counters_since`, for each counter and
histogram series of the pod families when that is known (> 0), where prometheus_client's own
Counter and Histogram put theirs (after the value, after `_sum`); the text format gets none:
there prometheus_client would write them as extra `<name>_created` gauge families, which
podnet's /metrics never had."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from exporter.metrics import model as m


def metric_families(snap: m.Snapshot, layout: m.BucketLayout, *, created: bool = False) -> Iterator[Metric]:
    """Every family of the catalogue with the snapshot's samples, as prometheus_client metrics;
    with `created`, the `_created` samples of the pod families' counters and histograms."""
    for spec in m.ALL_FAMILIES:
        since = (
            snap.counters_since if created and snap.counters_since > 0 and spec in m.POD_FAMILIES else None
        )
        if spec.kind is m.Kind.HISTOGRAM:
            h = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels, unit=spec.unit)
            for hs in snap.histograms.get(spec.name, ()):
                buckets = [(_le(b), float(c)) for b, c in layout.cumulative(hs.slots)]
                h.add_metric(list(hs.labels), buckets, hs.sum)
                if since is not None:  # HistogramMetricFamily.add_metric takes no `created`
                    h.samples.append(
                        Sample(h.name + "_created", dict(zip(spec.labels, hs.labels, strict=True)), since)
                    )
            yield h
            continue
        samples = snap.samples.get(spec.name, ())
        fam: CounterMetricFamily | GaugeMetricFamily
        if spec.kind is m.Kind.COUNTER:
            counter = CounterMetricFamily(spec.name, spec.help, labels=spec.labels, unit=spec.unit)
            for s in samples:
                counter.add_metric(list(s.labels), s.value, created=since)
            yield counter
            continue
        fam = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels, unit=spec.unit)
        for s in samples:
            fam.add_metric(list(s.labels), s.value)
        yield fam


def _le(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(bound)


class _SnapshotCollector(Collector):
    def __init__(self, snap: m.Snapshot, layout: m.BucketLayout, *, created: bool) -> None:
        self.snap = snap
        self.layout = layout
        self.created = created

    def collect(self) -> Iterator[Metric]:
        return metric_families(self.snap, self.layout, created=self.created)


def render_with_client(snap: m.Snapshot, layout: m.BucketLayout) -> tuple[bytes, bytes]:
    """(text, OpenMetrics) of the snapshot's families by prometheus_client's writers."""
    text = CollectorRegistry(auto_describe=False)
    text.register(_SnapshotCollector(snap, layout, created=False))
    om = CollectorRegistry(auto_describe=False)
    om.register(_SnapshotCollector(snap, layout, created=True))
    return generate_latest(text), generate_openmetrics(om)  # type: ignore[no-untyped-call]
