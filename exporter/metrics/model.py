"""The metric model: what podnet exports, and the immutable snapshot a poll produces.

`/metrics` and OTLP only ever read a Snapshot; the poller is the only writer.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from exporter.metrics.histogram import HIST_INDEX_OFFSET, HIST_SCALE


class Kind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"
    INFO = "info"


POD_LABELS: tuple[str, ...] = ("namespace", "pod", "container", "workload", "workload_kind")
PEER_LABELS: tuple[str, ...] = ("peer_namespace", "peer_workload", "peer_kind")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    """Prometheus family name, without the `_total` a counter gets on exposition."""
    kind: Kind
    help: str
    labels: tuple[str, ...]
    unit: str = ""
    """Prometheus base unit, also the last word of `name` (bytes, seconds)."""
    otel_name: str = ""
    otel_unit: str = ""

    @property
    def exposed_name(self) -> str:
        return self.name + "_total" if self.kind is Kind.COUNTER else self.name


def _pod(
    name: str,
    kind: Kind,
    help: str,
    extra: tuple[str, ...] = (),
    unit: str = "",
    otel: str = "",
    otel_unit: str = "",
) -> MetricSpec:
    return MetricSpec(name, kind, help, POD_LABELS + extra, unit, otel, otel_unit)


TCP_SENT = _pod(
    "podnet_tcp_sent_bytes",
    Kind.COUNTER,
    "Bytes the pod's applications handed to TCP sockets.",
    unit="bytes",
    otel="podnet.tcp.sent",
    otel_unit="By",
)
TCP_RECEIVED = _pod(
    "podnet_tcp_received_bytes",
    Kind.COUNTER,
    "Bytes the pod's applications read from TCP sockets.",
    unit="bytes",
    otel="podnet.tcp.received",
    otel_unit="By",
)
FLOW_BYTES = _pod(
    "podnet_flow_bytes",
    Kind.COUNTER,
    "TCP payload bytes by peer workload (node or external peers have empty peer labels).",
    ("direction", *PEER_LABELS),
    unit="bytes",
    otel="podnet.flow",
    otel_unit="By",
)
TCP_RTT = _pod(
    "podnet_tcp_rtt_seconds",
    Kind.HISTOGRAM,
    "Smoothed RTT of the pod's TCP sockets, sampled at most once per millisecond per socket when the "
    "application sends or receives.",
    unit="seconds",
    otel="podnet.tcp.rtt",
    otel_unit="s",
)
TCP_CONNECT = _pod(
    "podnet_tcp_connect_duration_seconds",
    Kind.HISTOGRAM,
    "Time from an outbound connect() to the connection being established.",
    unit="seconds",
    otel="podnet.tcp.connect.duration",
    otel_unit="s",
)
TCP_OPENED = _pod(
    "podnet_tcp_connections_opened",
    Kind.COUNTER,
    "TCP connections established.",
    ("direction",),
    otel="podnet.tcp.connections.opened",
    otel_unit="{connection}",
)
TCP_CLOSED = _pod(
    "podnet_tcp_connections_closed",
    Kind.COUNTER,
    "TCP connections closed (only those podnet saw established).",
    ("direction",),
    otel="podnet.tcp.connections.closed",
    otel_unit="{connection}",
)
TCP_FAILED = _pod(
    "podnet_tcp_connections_failed",
    Kind.COUNTER,
    "Outbound TCP connects that never established, by reason.",
    ("reason",),
    otel="podnet.tcp.connections.failed",
    otel_unit="{connection}",
)
TCP_ACTIVE = _pod(
    "podnet_tcp_active_connections",
    Kind.GAUGE,
    "TCP connections open now (established since podnet started, not yet closed).",
    ("direction",),
    otel="podnet.tcp.active_connections",
    otel_unit="{connection}",
)
TCP_RETRANSMITS = _pod(
    "podnet_tcp_retransmits",
    Kind.COUNTER,
    "TCP segments retransmitted.",
    otel="podnet.tcp.retransmits",
    otel_unit="{segment}",
)
TCP_RESETS = _pod(
    "podnet_tcp_resets",
    Kind.COUNTER,
    "TCP resets sent and received.",
    ("direction",),
    otel="podnet.tcp.resets",
    otel_unit="{reset}",
)

REQUESTS = _pod(
    "podnet_requests",
    Kind.COUNTER,
    "Requests served (role=server) and made (role=client): HTTP/2 and gRPC streams, and turns of "
    "other TCP conversations.",
    ("role", "protocol", "method", "status_class", "grpc_status"),
    otel="podnet.requests",
    otel_unit="{request}",
)
REQUEST_DURATION = _pod(
    "podnet_request_duration_seconds",
    Kind.HISTOGRAM,
    "Time from a request's first byte (HTTP/2: its HEADERS) to its response's first byte (HEADERS).",
    ("role", "protocol"),
    unit="seconds",
    otel="podnet.request.duration",
    otel_unit="s",
)

POD_FAMILIES: tuple[MetricSpec, ...] = (
    TCP_SENT,
    TCP_RECEIVED,
    FLOW_BYTES,
    TCP_RTT,
    TCP_CONNECT,
    TCP_OPENED,
    TCP_CLOSED,
    TCP_FAILED,
    TCP_ACTIVE,
    TCP_RETRANSMITS,
    TCP_RESETS,
    REQUESTS,
    REQUEST_DURATION,
)

POD_INFO_LABELS: tuple[str, ...] = ("namespace", "pod", "workload", "workload_kind", "node", "pod_ip")
POD_INFO = MetricSpec(
    "podnet_pod_info",
    Kind.GAUGE,
    "Pods in the metadata store; always 1. Join on namespace and pod for node or pod IP.",
    POD_INFO_LABELS,
    otel_name="podnet.pod.info",
    otel_unit="{pod}",
)
# Per pod, not per container: kept out of POD_FAMILIES, whose label sets start with POD_LABELS.
INFO_FAMILIES: tuple[MetricSpec, ...] = (POD_INFO,)

# Self-metrics: the exporter's own health.
BUILD_INFO = MetricSpec(
    "podnet_exporter_build_info",
    Kind.GAUGE,
    "podnet build and runtime versions, and which data path runs (tp_btf, raw_tracepoint); always 1.",
    ("version", "python", "bcc", "kernel", "data_path"),
)
POLL_DURATION = MetricSpec(
    "podnet_exporter_poll_duration_seconds",
    Kind.GAUGE,
    "Duration of the last poll's map reads and pod resolution (taken before its snapshot is built).",
    (),
    unit="seconds",
)
POLLS = MetricSpec("podnet_exporter_polls", Kind.COUNTER, "Polls completed.", ())
ERRORS = MetricSpec(
    "podnet_exporter_errors", Kind.COUNTER, "Runtime errors survived, by where they happened.", ("stage",)
)
LAST_POLL = MetricSpec(
    "podnet_exporter_last_poll_timestamp_seconds",
    Kind.GAUGE,
    "Unix time the last poll completed.",
    (),
    unit="seconds",
)
PROGRAM_ATTACHED = MetricSpec(
    "podnet_exporter_program_attached",
    Kind.GAUGE,
    "1 when the eBPF program on this hook is attached, 0 when unavailable.",
    ("program",),
)
MAP_UPDATE_FAILURES = MetricSpec(
    "podnet_exporter_map_update_failures",
    Kind.COUNTER,
    "Kernel map inserts that failed (map full): those events are not counted.",
    ("map",),
)
MAP_ENTRIES = MetricSpec(
    "podnet_exporter_map_entries", Kind.GAUGE, "Entries in each kernel map at the last poll.", ("map",)
)
UNRESOLVED = MetricSpec(
    "podnet_exporter_unresolved_cgroups",
    Kind.GAUGE,
    "Cgroup ids seen in the maps whose cgroup path could not be found.",
    (),
)
PROG_RUN_TIME = MetricSpec(
    "podnet_exporter_bpf_run_seconds",
    Kind.COUNTER,
    "Time spent in each eBPF program (needs sysctl kernel.bpf_stats_enabled=1).",
    ("program",),
    unit="seconds",
)
PROG_RUN_COUNT = MetricSpec(
    "podnet_exporter_bpf_runs",
    Kind.COUNTER,
    "Runs of each eBPF program (needs sysctl kernel.bpf_stats_enabled=1).",
    ("program",),
)
OTLP_EXPORTS = MetricSpec(
    "podnet_exporter_otlp_exports", Kind.COUNTER, "OTLP pushes, by result.", ("result",)
)
OTLP_LAST_SUCCESS = MetricSpec(
    "podnet_exporter_otlp_last_success_timestamp_seconds",
    Kind.GAUGE,
    "Unix time of the last successful OTLP push (0: none yet).",
    (),
    unit="seconds",
)
RETIRED_DROPPED = MetricSpec(
    "podnet_exporter_retired_series_dropped",
    Kind.COUNTER,
    "Dead containers whose totals could not be kept (retired store full).",
    (),
)
PODS_KNOWN = MetricSpec("podnet_exporter_pods", Kind.GAUGE, "Pods in the metadata store.", ())
METADATA_UP = MetricSpec(
    "podnet_exporter_metadata_source_up",
    Kind.GAUGE,
    "1 when the pod metadata source's last list/watch (or file read) succeeded, else 0.",
    ("source",),
)
METADATA_LAST_SYNC = MetricSpec(
    "podnet_exporter_metadata_last_sync_timestamp_seconds",
    Kind.GAUGE,
    "Unix time the pod metadata was last known to match its source (0: never).",
    ("source",),
    unit="seconds",
)
METADATA_RELISTS = MetricSpec(
    "podnet_exporter_metadata_relists",
    Kind.COUNTER,
    "Full reads of the pod metadata source (API lists or pods file loads, the first included).",
    ("source",),
)
METADATA_ERRORS = MetricSpec(
    "podnet_exporter_metadata_errors",
    Kind.COUNTER,
    "Failed requests, dropped watches, bad files and malformed pods of the metadata source.",
    ("source",),
)
SERIES_DROPPED = MetricSpec(
    "podnet_exporter_series_dropped",
    Kind.COUNTER,
    "Label sets left out of a poll's snapshot because their family was at --max-series, summed over polls.",
    ("metric",),
)
HTTP_REQUESTS = MetricSpec(
    "podnet_exporter_http_requests",
    Kind.COUNTER,
    "HTTP requests answered, by handler and status code (401: credentials refused), as of the last poll.",
    ("handler", "code"),
)
TLS_LIBRARIES = MetricSpec(
    "podnet_exporter_tls_libraries",
    Kind.GAUGE,
    "TLS libraries found in processes (--tls openssl), by state: attached (uprobes in place), failing "
    "(could not be probed: see the log), dropped (over the limit at the last scan).",
    ("state",),
)

SELF_FAMILIES: tuple[MetricSpec, ...] = (
    BUILD_INFO,
    POLL_DURATION,
    POLLS,
    ERRORS,
    LAST_POLL,
    PROGRAM_ATTACHED,
    MAP_UPDATE_FAILURES,
    MAP_ENTRIES,
    UNRESOLVED,
    PROG_RUN_TIME,
    PROG_RUN_COUNT,
    PODS_KNOWN,
    OTLP_EXPORTS,
    OTLP_LAST_SUCCESS,
    RETIRED_DROPPED,
    SERIES_DROPPED,
    METADATA_UP,
    METADATA_LAST_SYNC,
    METADATA_RELISTS,
    METADATA_ERRORS,
    HTTP_REQUESTS,
    TLS_LIBRARIES,
)
ALL_FAMILIES: tuple[MetricSpec, ...] = POD_FAMILIES + INFO_FAMILIES + SELF_FAMILIES


@dataclass(frozen=True)
class Sample:
    labels: tuple[str, ...]
    value: float


@dataclass(frozen=True)
class HistSample:
    labels: tuple[str, ...]
    slots: tuple[tuple[int, int], ...]
    """(kernel slot, count), ascending, zero counts left out. Slot i is the exponential
    bucket (2^((i-120)/4), 2^((i-119)/4)] seconds."""
    count: int
    sum: float
    """Seconds."""


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    samples: Mapping[str, tuple[Sample, ...]]
    histograms: Mapping[str, tuple[HistSample, ...]]
    pod_uids: Mapping[tuple[str, str], str] = field(default_factory=lambda: MappingProxyType({}))
    """(namespace, pod) -> pod UID, for exporters that carry the UID (OTLP)."""
    counters_since: float = 0.0
    """Unix time at which the cumulative counters of this snapshot started; 0.0 when unknown.
    Those of the pod families (POD_FAMILIES), which outlive an exporter restart: it moves only
    when they really restart from zero. Self-metrics count from the process start."""

    @staticmethod
    def build(
        taken_at: float,
        samples: Mapping[str, tuple[Sample, ...]],
        histograms: Mapping[str, tuple[HistSample, ...]],
        pod_uids: Mapping[tuple[str, str], str] | None = None,
        *,
        counters_since: float = 0.0,
    ) -> Snapshot:
        return Snapshot(
            taken_at,
            MappingProxyType(dict(samples)),
            MappingProxyType(dict(histograms)),
            MappingProxyType(dict(pod_uids or {})),
            counters_since,
        )


EMPTY_SNAPSHOT = Snapshot.build(0.0, {}, {})


# ---- histogram conversion (pure) ------------------------------------------------------


def downscale_index(slot: int, scale: int) -> int:
    """OpenTelemetry exponential bucket index at `scale` (0..2) holding kernel `slot`:
    merging 2^(2-scale) neighbours is exact, no re-bucketing estimate."""
    return (slot - HIST_INDEX_OFFSET) >> (HIST_SCALE - scale)


@dataclass(frozen=True)
class BucketLayout:
    """Fixed Prometheus `le` bounds: 2^(k/2^scale) seconds for k in [lo, hi]."""

    scale: int = 0
    lo_exp: int = -17
    """2^-17 s (7.6 us): the lowest bound."""
    hi_exp: int = 5
    """2^5 s (32 s): the highest finite bound."""
    bounds: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        n = 2**self.scale
        bounds = tuple(2.0 ** (k / n) for k in range(self.lo_exp * n, self.hi_exp * n + 1))
        object.__setattr__(self, "bounds", bounds)

    def cumulative(self, slots: tuple[tuple[int, int], ...]) -> list[tuple[float, int]]:
        """(le, cumulative count) for every bound, then +Inf."""
        n = 2**self.scale
        first = self.lo_exp * n
        per_bucket = [0] * len(self.bounds)
        overflow = 0
        for slot, count in slots:
            # Bucket with index k has upper bound 2^((k+1)/n): bound position k+1-first.
            pos = downscale_index(slot, self.scale) + 1 - first
            if pos < 0:
                pos = 0
            if pos >= len(per_bucket):
                overflow += count
            else:
                per_bucket[pos] += count
        out: list[tuple[float, int]] = []
        running = 0
        for bound, c in zip(self.bounds, per_bucket, strict=True):
            running += c
            out.append((bound, running))
        out.append((math.inf, running + overflow))
        return out
