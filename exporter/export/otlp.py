"""OTLP push: the poller's latest Snapshot, sent to an OpenTelemetry backend every interval.

How the SDK is used, and why this way
-------------------------------------
The kernel already aggregated everything: counters are running totals and latency histograms are
exponential histograms at scale 2. The installed opentelemetry-sdk (1.45) has no ``MetricProducer`` /
``metric_producers`` hook, and a MeterProvider can only export what its instruments aggregated itself:
observable counters would pass totals through, but there is no asynchronous histogram, so the kernel's
buckets would have to be replayed into a synchronous one and re-bucketed. ``PeriodicExportingMetricReader``
also drops the exporter's result, which the failure counter and delta temporality need.

So this module plays the role of a metric producer: it converts a Snapshot into the SDK's own data model
(``opentelemetry.sdk.metrics.export`` Sum/Gauge/ExponentialHistogram/Histogram points, an SDK
``Resource`` and ``InstrumentationScope``) and hands that ``MetricsData`` to the SDK's OTLP exporters
(gRPC or HTTP/protobuf), which encode it, retry with backoff within the timeout and report the result.
A small daemon thread replaces the periodic reader, so exporting never runs on the asyncio loop.

Naming and attributes
---------------------
Each family is sent under its OpenTelemetry name and unit (``MetricSpec.otel_name``/``otel_unit``; for
self-metrics, derived from the Prometheus name by :func:`otel_identity`), chosen so that a backend applying
the OpenTelemetry-to-Prometheus rules lands on the names /metrics exposes (tests/otel_names.py implements
those rules; the unit tests check every family against them).
Pod labels become semantic-convention attributes: ``k8s.namespace.name``, ``k8s.pod.name``, ``k8s.pod.uid``,
``k8s.container.name`` and, by workload kind, ``k8s.deployment.name`` / ``k8s.statefulset.name`` /
``k8s.daemonset.name`` / ``k8s.job.name`` / ``k8s.cronjob.name`` / ``k8s.replicaset.name`` (a bare Pod
gets none: ``k8s.pod.name`` already names it; a kind without a convention gets ``k8s.workload.name`` and
``k8s.workload.kind``). Empty values are left out. Two cases where the pod labels are not pod names:
a pod whose metadata is not known yet carries its UID in the pod label and a short container id in the
container label, sent as ``k8s.pod.uid`` and ``container.id``; a host (non-pod) process carries its
cgroup leaf (``nginx.service``) in the container label, sent as ``podnet.host.cgroup``.

The peer of a flow is a *different* pod than the one the resource and the ``k8s.*`` attributes describe,
so its labels cannot reuse the ``k8s.*`` keys; they are namespaced under ``podnet.peer.``:
``podnet.peer.k8s.namespace.name``, ``podnet.peer.k8s.workload.name`` and ``podnet.peer.kind``
(pod, node or external). Other labels (direction, reason, ...) keep their names.

Temporality, failures and memory
--------------------------------
Cumulative (the default) sends the kernel's running totals, so an export after an outage carries exact
totals and nothing needs to be queued. Their start time is when those totals started: the snapshot's
``counters_since`` for the pod families, which outlive an exporter restart (it moves only when the
counters really restart from zero, and a backend sees a reset exactly then); the pusher's start for the
self-metrics, and for everything while ``counters_since`` is unknown (0). Delta ("delta", and the
spec's "lowmemory", which means the same for podnet's monotonic sums and histograms) sends the change
since the last export that *delivered* each series; a failed export moves nothing, so the next
successful one covers the whole gap. A series without a baseline yet starts where its cumulative value
does (the start time above). When ``counters_since`` moves, the pod families' baseline is dropped: their
totals restarted, and the next points carry them whole from the new start. Series that did not change
are left out of a delta export; gauges always carry their current value. The only state kept is that
baseline, one entry per series of the latest snapshot. Exports never queue snapshots: each one reads
the latest.

A large snapshot goes out as several requests of at most MAX_POINTS_PER_REQUEST points, one after the
other; the first failure ends the export (counted once). With delta, the series of the requests that did
get through move their baseline, so nothing is sent twice.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, cast
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Buckets,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.sdk.version import __version__ as sdk_version

from exporter import __version__
from exporter.export.otlp_config import OtlpConfig
from exporter.metrics import model as m
from exporter.metrics.histogram import HIST_SCALE

__all__ = [
    "OtlpPusher",
    "build_resource",
    "otel_identity",
    "point_attributes",
    "snapshot_metrics",
]

log = logging.getLogger(__name__)

SERVICE_NAME: Final = "podnet-exporter"
SCOPE_NAME: Final = "podnet"

_SINCE_FAMILIES: Final = frozenset(spec.name for spec in m.POD_FAMILIES)
"""Families whose totals start at ``Snapshot.counters_since``: the pod families, kept across restarts.
The self-metrics (polls, errors, OTLP exports, ...) are the process's own and start with it."""

MAX_POINTS_PER_REQUEST: Final = 2000
"""Data points per OTLP request. Collectors reject gRPC messages over 4 MiB by default; a point with its
k8s attributes and histogram buckets is a few hundred bytes, so 2000 stay far below that."""

# The SDK's exporters log every retry at WARNING and every failure at ERROR (with a traceback for some
# gRPC codes). Their records are captured as the reason for podnet's one line per failed interval and
# otherwise only shown when podnet's OTLP logger is at DEBUG.
_SDK_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.common._internal",
    "opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder",
)
_REASON_MAX: Final = 400

# The SDK's point classes type min/max as float, but its encoder passes them to the protobuf
# constructor, where None leaves the optional field unset: the kernel does not track extremes, and a
# made-up 0 would be read as a real minimum.
_UNSET: Final = cast(float, None)

# ---- names ------------------------------------------------------------------------------------------

# Prometheus base unit of a self-metric (MetricSpec.unit) -> OpenTelemetry unit.
_PROMETHEUS_UNITS: Final[Mapping[str, str]] = {"seconds": "s", "bytes": "By"}
# Prometheus prefix -> OpenTelemetry namespace; longest first.
_NAMESPACES: Final = (("podnet_exporter_", "podnet.exporter."), ("podnet_", "podnet."))


def otel_identity(spec: m.MetricSpec) -> tuple[str, str]:
    """(OpenTelemetry name, unit) of a family. Self-metrics have no otel_name: theirs is the Prometheus
    name without the unit word, with the podnet_exporter_ prefix as the podnet.exporter. namespace
    (podnet_exporter_poll_duration_seconds -> podnet.exporter.poll_duration, s). Words after the
    namespace keep their underscores, as in podnet.tcp.active_connections."""
    if spec.otel_name:
        return spec.otel_name, spec.otel_unit
    stem = spec.name
    if spec.unit and stem.endswith("_" + spec.unit):
        stem = stem[: -len(spec.unit) - 1]
    for prefix, namespace in _NAMESPACES:
        if stem.startswith(prefix):
            stem = namespace + stem[len(prefix) :]
            break
    return stem, _PROMETHEUS_UNITS.get(spec.unit, spec.unit)


# ---- attributes ---------------------------------------------------------------------------------------

_WORKLOAD_KEYS: Final[Mapping[str, str]] = {
    "Deployment": "k8s.deployment.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "Job": "k8s.job.name",
    "CronJob": "k8s.cronjob.name",
    "ReplicaSet": "k8s.replicaset.name",
}
_LABEL_KEYS: Final[Mapping[str, str]] = {
    "peer_namespace": "podnet.peer.k8s.namespace.name",
    "peer_workload": "podnet.peer.k8s.workload.name",
    "peer_kind": "podnet.peer.kind",
}
_N_POD: Final = len(m.POD_LABELS)


def _pod_attributes(labels: Sequence[str], pod_uids: Mapping[tuple[str, str], str]) -> dict[str, str]:
    namespace, pod, container, workload, kind = labels[:_N_POD]
    uid = pod_uids.get((namespace, pod), "")
    attrs: dict[str, str] = {}
    if not pod:
        if container:
            attrs["podnet.host.cgroup"] = container
        return attrs
    if not namespace and uid == pod:
        # Metadata not known yet: the pod label holds the UID and the container label a short id.
        attrs["k8s.pod.uid"] = uid
        if container:
            attrs["container.id"] = container
        return attrs
    pairs = [
        ("k8s.namespace.name", namespace),
        ("k8s.pod.name", pod),
        ("k8s.pod.uid", uid),
        ("k8s.container.name", container),
    ]
    if kind != "Pod":
        key = _WORKLOAD_KEYS.get(kind)
        if key is not None:
            pairs.append((key, workload))
        else:
            pairs += [("k8s.workload.name", workload), ("k8s.workload.kind", kind)]
    attrs.update((k, v) for k, v in pairs if v)
    return attrs


def point_attributes(
    spec: m.MetricSpec, labels: Sequence[str], pod_uids: Mapping[tuple[str, str], str]
) -> dict[str, str]:
    """OTLP attributes of one series: pod labels as k8s.* semantic conventions, peer labels under
    podnet.peer., other labels as they are; empty values left out."""
    start = 0
    attrs: dict[str, str] = {}
    if spec.labels[:_N_POD] == m.POD_LABELS:
        attrs = _pod_attributes(labels, pod_uids)
        start = _N_POD
    for name, value in zip(spec.labels[start:], labels[start:], strict=True):
        if value:
            attrs[_LABEL_KEYS.get(name, name)] = value
    return attrs


def build_resource(node_name: str, cluster_name: str, extra: Sequence[tuple[str, str]] = ()) -> Resource:
    """The exporter's resource. Precedence, lowest first: podnet's defaults (service.*, telemetry.sdk.*),
    OTEL_RESOURCE_ATTRIBUTES pairs (``extra``), then the node and cluster podnet was told."""
    attrs: dict[str, str] = {
        "service.name": SERVICE_NAME,
        "service.version": __version__,
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": sdk_version,
    }
    attrs.update(extra)
    if node_name:
        attrs["k8s.node.name"] = node_name
    if cluster_name:
        attrs["k8s.cluster.name"] = cluster_name
    return Resource(attrs)


# ---- snapshot -> SDK data model --------------------------------------------------------------------

SeriesKey = tuple[str, tuple[str, ...]]
"""(family name, label values): one time series."""
_Delivered = tuple[SeriesKey, int, m.Sample | m.HistSample]
"""A delta baseline entry: the cumulative sample a point was computed from, and its time (ns)."""


@dataclass
class _Family:
    spec: m.MetricSpec
    points: list[NumberDataPoint | HistogramDataPoint | ExponentialHistogramDataPoint] = field(
        default_factory=list
    )
    delivered: list[_Delivered] = field(default_factory=list)
    """Parallel to points in delta mode, empty otherwise."""


def _number(unit: str, value: float) -> int | float:
    # Seconds are fractional; everything else podnet counts is whole, and as_int keeps totals above
    # 2^53 exact. The choice is per family so a series never switches between int and double.
    if unit != "s" and float(value).is_integer():
        return int(value)
    return float(value)


def _exponential_point(
    attrs: dict[str, str], start_ns: int, time_ns: int, hs: m.HistSample
) -> ExponentialHistogramDataPoint:
    # Kernel slot i is exactly bucket (i - 120) at scale 2: carried over one to one.
    offset = m.downscale_index(hs.slots[0][0], HIST_SCALE) if hs.slots else 0
    counts = [0] * (hs.slots[-1][0] - hs.slots[0][0] + 1) if hs.slots else []
    for slot, count in hs.slots:
        counts[m.downscale_index(slot, HIST_SCALE) - offset] = count
    return ExponentialHistogramDataPoint(
        attributes=attrs,
        start_time_unix_nano=start_ns,
        time_unix_nano=time_ns,
        count=hs.count,
        sum=hs.sum,
        scale=HIST_SCALE,
        zero_count=0,
        positive=Buckets(offset=offset, bucket_counts=counts),
        negative=Buckets(offset=0, bucket_counts=[]),
        flags=0,
        min=_UNSET,
        max=_UNSET,
    )


def _explicit_point(
    attrs: dict[str, str], start_ns: int, time_ns: int, hs: m.HistSample, layout: m.BucketLayout
) -> HistogramDataPoint:
    cumulative = layout.cumulative(hs.slots)
    per_bucket = [c - (cumulative[i - 1][1] if i else 0) for i, (_, c) in enumerate(cumulative)]
    return HistogramDataPoint(
        attributes=attrs,
        start_time_unix_nano=start_ns,
        time_unix_nano=time_ns,
        count=hs.count,
        sum=hs.sum,
        bucket_counts=per_bucket,
        explicit_bounds=list(layout.bounds),
        min=_UNSET,
        max=_UNSET,
    )


def _sample_delta(prev: m.Sample, cur: m.Sample) -> m.Sample:
    # A decrease means the kernel entry restarted (evicted and recreated): all of it is new.
    return m.Sample(cur.labels, cur.value - prev.value if cur.value >= prev.value else cur.value)


def _hist_delta(prev: m.HistSample, cur: m.HistSample) -> m.HistSample:
    before = dict(prev.slots)
    slots = tuple((s, c - before.get(s, 0)) for s, c in cur.slots)
    if cur.count < prev.count or any(c < 0 for _, c in slots) or len(before.keys() - dict(cur.slots)) > 0:
        return cur  # restarted, as above
    return m.HistSample(
        cur.labels, tuple(sc for sc in slots if sc[1]), cur.count - prev.count, cur.sum - prev.sum
    )


def snapshot_metrics(
    snap: m.Snapshot,
    *,
    start_ns: int,
    histogram: str = "exponential",
    layout: m.BucketLayout | None = None,
    baseline: Mapping[SeriesKey, tuple[int, m.Sample | m.HistSample]] | None = None,
) -> list[_Family]:
    """The snapshot's families as SDK data points (pure). Cumulative when ``baseline`` is None; delta
    otherwise, against the baseline's entries, leaving out series that did not change. Points without a
    baseline start at ``snap.counters_since`` for the pod families when it is known (> 0), else at
    ``start_ns`` (the exporter's start)."""
    time_ns = int(snap.taken_at * 1e9)
    since_ns = int(snap.counters_since * 1e9) if snap.counters_since > 0 else start_ns
    start_ns = min(start_ns, time_ns)
    since_ns = min(since_ns, time_ns)
    layout = layout or m.BucketLayout()
    families: list[_Family] = []
    for spec in m.ALL_FAMILIES:
        fam = _Family(spec)
        unit = otel_identity(spec)[1]
        delta = baseline is not None and spec.kind is not m.Kind.GAUGE
        series: Sequence[m.Sample | m.HistSample] = (
            snap.histograms.get(spec.name, ())
            if spec.kind is m.Kind.HISTOGRAM
            else snap.samples.get(spec.name, ())
        )
        family_start = since_ns if spec.name in _SINCE_FAMILIES else start_ns
        for cur in series:
            key = (spec.name, cur.labels)
            point_start, sample = family_start, cur
            if delta:
                assert baseline is not None
                prev = baseline.get(key)
                if prev is not None:
                    point_start = prev[0]
                    if isinstance(cur, m.HistSample):
                        assert isinstance(prev[1], m.HistSample)
                        sample = _hist_delta(prev[1], cur)
                    else:
                        assert isinstance(prev[1], m.Sample)
                        sample = _sample_delta(prev[1], cur)
                if (sample.count if isinstance(sample, m.HistSample) else sample.value) == 0:
                    continue  # unchanged: the next point's interval starts at the same baseline
                fam.delivered.append((key, time_ns, cur))
            attrs = point_attributes(spec, cur.labels, snap.pod_uids)
            if isinstance(sample, m.HistSample):
                if histogram == "explicit":
                    fam.points.append(_explicit_point(attrs, point_start, time_ns, sample, layout))
                else:
                    fam.points.append(_exponential_point(attrs, point_start, time_ns, sample))
            elif spec.kind is m.Kind.GAUGE:
                fam.points.append(NumberDataPoint(attrs, 0, time_ns, _number(unit, sample.value)))
            else:
                fam.points.append(NumberDataPoint(attrs, point_start, time_ns, _number(unit, sample.value)))
        if fam.points:
            families.append(fam)
    return families


def _metric(spec: m.MetricSpec, points: Sequence[object], temporality: AggregationTemporality) -> Metric:
    name, unit = otel_identity(spec)
    data: Sum | Gauge | Histogram | ExponentialHistogram
    if spec.kind is m.Kind.GAUGE or spec.kind is m.Kind.INFO:
        data = Gauge(cast(Sequence[NumberDataPoint], points))
    elif spec.kind is m.Kind.COUNTER:
        data = Sum(cast(Sequence[NumberDataPoint], points), temporality, is_monotonic=True)
    elif points and isinstance(points[0], HistogramDataPoint):
        data = Histogram(cast(Sequence[HistogramDataPoint], points), temporality)
    else:
        data = ExponentialHistogram(cast(Sequence[ExponentialHistogramDataPoint], points), temporality)
    return Metric(name=name, description=spec.help, unit=unit, data=data)


def _requests(
    families: Sequence[_Family],
    resource: Resource,
    scope: InstrumentationScope,
    temporality: AggregationTemporality,
    max_points: int,
) -> Iterator[tuple[MetricsData, list[_Delivered]]]:
    """Split into MetricsData of at most max_points points each (a family may span requests)."""
    metrics: list[Metric] = []
    delivered: list[_Delivered] = []
    n = 0

    def request() -> MetricsData:
        return MetricsData([ResourceMetrics(resource, [ScopeMetrics(scope, metrics, "")], "")])

    for fam in families:
        i = 0
        while i < len(fam.points):
            take = min(len(fam.points) - i, max_points - n)
            metrics.append(_metric(fam.spec, fam.points[i : i + take], temporality))
            delivered += fam.delivered[i : i + take]
            n += take
            i += take
            if n == max_points:
                yield request(), delivered
                metrics, delivered, n = [], [], 0
    if metrics:
        yield request(), delivered


# ---- the SDK exporters ---------------------------------------------------------------------------


def _make_exporter(cfg: OtlpConfig) -> MetricExporter:
    # Every setting is passed explicitly: OtlpConfig already applied the OTEL_* variables with podnet's
    # precedence, and the SDK would otherwise read some of them again.
    if cfg.protocol == "grpc":
        import grpc  # grpcio comes with the gRPC exporter

        # An http:// URL means plaintext in the OTLP spec, as --otlp-insecure does; https:// means TLS
        # (the SDK enforces that), verified with the configured CA or the system roots.
        insecure = cfg.insecure or urlsplit(cfg.endpoint).scheme.lower() == "http"
        credentials = None
        if not insecure:
            root = None
            if cfg.certificate:
                with open(cfg.certificate, "rb") as f:
                    root = f.read()
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
        return GrpcMetricExporter(
            endpoint=cfg.endpoint,
            insecure=insecure,
            credentials=credentials,
            headers=cfg.headers,
            timeout=cfg.timeout,
            compression=grpc.Compression.Gzip
            if cfg.compression == "gzip"
            else grpc.Compression.NoCompression,
        )
    return HttpMetricExporter(
        endpoint=cfg.endpoint,
        certificate_file=cfg.certificate,
        headers=dict(cfg.headers),
        timeout=cfg.timeout,
        compression=HttpCompression.Gzip if cfg.compression == "gzip" else HttpCompression.NoCompression,
    )


class _SdkLogCapture(logging.Filter):
    """Attached to the SDK exporter loggers while one export runs: keeps the first and last problem the
    exporting thread logged (the reason in podnet's own line: the HTTP exporter's last word is a generic
    "timeout, max retries or shutdown", its first names the error) and lets records through, demoted to
    DEBUG, only when podnet's OTLP logger is at DEBUG."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.first = ""
        self.last = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and record.levelno >= logging.WARNING:
            self.last = (record.getMessage().splitlines() or [""])[0][:_REASON_MAX]
            self.first = self.first or self.last
        if not log.isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True

    @property
    def reason(self) -> str:
        return self.last if self.first == self.last else f"{self.last} (first attempt: {self.first})"


@contextlib.contextmanager
def _captured_sdk_logs() -> Iterator[_SdkLogCapture]:
    capture = _SdkLogCapture()
    for name in _SDK_LOGGERS:
        # First in line: the gRPC exporter's own DuplicateFilter drops a message repeated within 20 s,
        # which would leave every failed interval after the first without a reason.
        logging.getLogger(name).filters.insert(0, capture)
    try:
        yield capture
    finally:
        for name in _SDK_LOGGERS:
            logging.getLogger(name).removeFilter(capture)


# ---- the pusher -------------------------------------------------------------------------------------


class OtlpPusher:
    """Pushes the latest Snapshot over OTLP every ``cfg.interval`` seconds from its own thread.

    Thread-safe. Holds no queue: each export reads ``get_snapshot()`` afresh. ``histogram_scale`` is the
    resolution of explicit-bucket histograms (the /metrics one); exponential ones always carry the
    kernel's scale 2.
    """

    def __init__(
        self,
        cfg: OtlpConfig,
        *,
        node_name: str,
        cluster_name: str,
        get_snapshot: Callable[[], m.Snapshot],
        histogram_scale: int = 0,
    ) -> None:
        self._cfg = cfg
        self._get_snapshot = get_snapshot
        self._resource = build_resource(node_name, cluster_name, cfg.resource_attributes)
        self._scope = InstrumentationScope(SCOPE_NAME, __version__)
        self._layout = m.BucketLayout(scale=histogram_scale)
        self._delta = cfg.temporality in ("delta", "lowmemory")
        self._temporality = AggregationTemporality.DELTA if self._delta else AggregationTemporality.CUMULATIVE
        self._start_ns = time.time_ns()
        self._exporter = _make_exporter(cfg)

        self._export_lock = threading.Lock()
        """Held for a whole export: the SDK exporters must not be called concurrently."""
        # Guarded by _export_lock:
        self._baseline: dict[SeriesKey, tuple[int, m.Sample | m.HistSample]] = {}
        self._counters_since: float | None = None
        """counters_since of the last snapshot sent: the pod families' baseline belongs to it."""
        self._last_delivered_at = 0.0
        self._failing = 0
        self._closed = False

        self._stats_lock = threading.Lock()
        self._ok = 0
        self._failed = 0
        self._last_success = 0.0

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stats(self) -> tuple[int, int, float]:
        """(exports that succeeded, exports that failed, unix time of the last success or 0). An export
        is one interval's attempt, however many requests and retries it took; an interval with nothing
        new to send (no poll since the last delivered snapshot) counts as neither."""
        with self._stats_lock:
            return self._ok, self._failed, self._last_success

    def start(self) -> None:
        """Start the export thread; returns at once."""
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError("OtlpPusher.start() called twice or after shutdown()")
        self._thread = threading.Thread(target=self._run, name="podnet-otlp", daemon=True)
        self._thread.start()
        log.info(
            "pushing OTLP (%s) to %s every %gs, %s temporality, %s histograms",
            self._cfg.protocol,
            self._cfg.shown_endpoint,
            self._cfg.interval,
            "delta" if self._delta else "cumulative",
            self._cfg.histogram,
        )

    def export_now(self) -> bool:
        """Export the latest snapshot once (blocking, at most about cfg.timeout per request). True when
        the backend has it, or when there was nothing new to send."""
        with self._export_lock:
            if self._closed:
                return False
            return self._export_locked()

    def shutdown(self) -> None:
        """Stop the thread, export the latest snapshot once more (unless it was delivered already) and
        close the exporter. Blocking, so call it through asyncio.to_thread: it takes up to cfg.timeout
        for the final export, plus up to cfg.timeout more when it lands while an export is in flight.
        Idempotent; export_now() returns False afterwards."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._cfg.timeout + 1.0)
        with self._export_lock:
            if self._closed:
                return
            self._export_locked()
            self._closed = True
            with _captured_sdk_logs():
                self._exporter.shutdown()

    def _run(self) -> None:
        interval = self._cfg.interval
        next_at = time.monotonic() + interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self.export_now()
            # Ticks missed while an export overran are skipped, never caught up: the next export sends
            # the latest snapshot, which covers them.
            next_at = max(next_at + interval, time.monotonic())

    def _export_locked(self) -> bool:
        try:
            snap = self._get_snapshot()
            if snap.taken_at <= 0 or snap.taken_at == self._last_delivered_at:
                return True  # no poll yet, or this snapshot was delivered whole already
            ok, reason = self._send(snap)
            if ok:
                self._last_delivered_at = snap.taken_at
        except Exception as e:  # the export thread must survive anything
            ok, reason = False, f"{type(e).__name__}: {e}"
        with self._stats_lock:
            if ok:
                self._ok += 1
                self._last_success = time.time()
            else:
                self._failed += 1
        if ok:
            if self._failing:
                log.info(
                    "OTLP export to %s works again after %d failed exports",
                    self._cfg.shown_endpoint,
                    self._failing,
                )
            self._failing = 0
        else:
            self._failing += 1
            log.warning(
                "OTLP export to %s failed (%d in a row): %s; the next export sends the latest values",
                self._cfg.shown_endpoint,
                self._failing,
                self._cfg.redact(reason) if reason else "no reason given by the exporter",
            )
        return ok

    def _send(self, snap: m.Snapshot) -> tuple[bool, str]:
        if self._counters_since is not None and snap.counters_since != self._counters_since:
            # The pod counters restarted from zero: deltas against the old totals would be negative (or
            # short). Their next points carry the new totals whole, from the new start.
            for key in [k for k in self._baseline if k[0] in _SINCE_FAMILIES]:
                del self._baseline[key]
        self._counters_since = snap.counters_since
        families = snapshot_metrics(
            snap,
            start_ns=self._start_ns,
            histogram=self._cfg.histogram,
            layout=self._layout,
            baseline=self._baseline if self._delta else None,
        )
        if self._delta:
            # Bounded by the snapshot: a series that left it can no longer be reported anyway.
            live = {(name, s.labels) for name, ss in snap.samples.items() for s in ss}
            live.update((name, h.labels) for name, hs in snap.histograms.items() for h in hs)
            for key in self._baseline.keys() - live:
                del self._baseline[key]
        timeout_ms = self._cfg.timeout * 1000
        for data, delivered in _requests(
            families, self._resource, self._scope, self._temporality, MAX_POINTS_PER_REQUEST
        ):
            with _captured_sdk_logs() as capture:
                result = self._exporter.export(data, timeout_millis=timeout_ms)
            if result is not MetricExportResult.SUCCESS:
                # The rest would most likely fail the same way; with cumulative values the next export
                # sends them all again, with delta their baseline did not move.
                return False, capture.reason
            for key, time_ns, sample in delivered:
                self._baseline[key] = (time_ns, sample)
        return True, ""
