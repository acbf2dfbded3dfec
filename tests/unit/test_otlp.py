"""Tests for exporter.export.otlp: names, attributes, and snapshots pushed through OtlpPusher to real OTLP
receivers (gRPC and HTTP/protobuf on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics.export import (
    ExponentialHistogramDataPoint,
    HistogramDataPoint,
    MetricsData,
    NumberDataPoint,
)
from opentelemetry.sdk.version import __version__ as sdk_version

from exporter import __version__
from exporter.export import otlp
from exporter.export.otlp import (
    OtlpPusher,
    otel_identity,
    point_attributes,
    snapshot_metrics,
)
from exporter.export.otlp_config import OtlpConfig
from exporter.metrics import model as m
from exporter.metrics.histogram import HIST_INDEX_OFFSET

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import otlp_receivers as rx  # lives in tests/, shared with the kernel tests
from otel_names import prometheus_name  # lives in tests/: the exporter never needs it

PROTOCOLS = ("grpc", "http/protobuf")
CUMULATIVE, DELTA = 2, 1  # AggregationTemporality in the protobuf

WEB = ("shop", "web-7c9f8d6b5-x2x4q", "nginx", "web", "Deployment")
DB = ("shop", "db-0", "postgres", "db", "StatefulSet")
WEB_UID = "5f1d3c1e-8a2b-4c3d-9e4f-0123456789ab"
DB_UID = "0c4e9a11-2b3d-4e5f-8a9b-abcdefabcdef"
UIDS = {(WEB[0], WEB[1]): WEB_UID, (DB[0], DB[1]): DB_UID}
WEB_ATTRS = {
    "k8s.namespace.name": "shop",
    "k8s.pod.name": WEB[1],
    "k8s.pod.uid": WEB_UID,
    "k8s.container.name": "nginx",
    "k8s.deployment.name": "web",
}
RTT_SLOTS = ((97, 3), (100, 5), (104, 1))  # 19 ms .. 74 ms


def retained_series(pusher: OtlpPusher) -> int:
    """Series of state the pusher keeps between exports (its delta baseline)."""
    with pusher._export_lock:
        return len(pusher._baseline)


def cfg(endpoint: str, protocol: str, **changes: Any) -> OtlpConfig:
    base = OtlpConfig(
        endpoint=endpoint,
        protocol=protocol,
        interval=0.2,
        timeout=0.5,
        headers=(("x-scope-orgid", "tenant-1"),),
        insecure=True,
        compression=None,
        certificate=None,
        histogram="exponential",
        temporality="cumulative",
        resource_attributes=(("deployment.environment", "test"), ("k8s.cluster.name", "from-env")),
    )
    return dataclasses.replace(base, **changes)


def snapshot(
    taken_at: float,
    sent: float = 1000.0,
    received: float = 250.0,
    rtt: tuple[tuple[int, int], ...] = RTT_SLOTS,
    rtt_sum: float = 0.031,
    extra: dict[str, tuple[m.Sample, ...]] | None = None,
    since: float = 0.0,
) -> m.Snapshot:
    samples: dict[str, tuple[m.Sample, ...]] = {
        m.TCP_SENT.name: (m.Sample(DB, 7.0), m.Sample(WEB, sent)),
        m.TCP_RECEIVED.name: (m.Sample(DB, 3.0), m.Sample(WEB, received)),
        m.FLOW_BYTES.name: (
            m.Sample((*WEB, "sent", "shop", "db", "pod"), 600.0),
            m.Sample((*WEB, "sent", "", "", "external"), 400.0),
        ),
        m.TCP_ACTIVE.name: (m.Sample((*WEB, "outbound"), 2.0),),
        m.TCP_FAILED.name: (m.Sample((*WEB, "refused"), 1.0),),
        m.POLLS.name: (m.Sample((), 12.0),),
        m.POLL_DURATION.name: (m.Sample((), 0.0125),),
        m.ERRORS.name: (m.Sample(("pods",), 2.0),),
    }
    samples.update(extra or {})
    hists = {m.TCP_RTT.name: (m.HistSample(WEB, rtt, sum(c for _, c in rtt), rtt_sum),)}
    return m.Snapshot.build(taken_at, samples, hists, UIDS, counters_since=since)


class Holder:
    """The latest snapshot, as the poller publishes it."""

    def __init__(self, snap: m.Snapshot) -> None:
        self._lock = threading.Lock()
        self._snap = snap

    def set(self, snap: m.Snapshot) -> None:
        with self._lock:
            self._snap = snap

    def get(self) -> m.Snapshot:
        with self._lock:
            return self._snap


@pytest.fixture(params=PROTOCOLS)
def receiver(request: pytest.FixtureRequest) -> Iterator[rx.Receiver]:
    r = rx.make_receiver(request.param)
    try:
        yield r
    finally:
        rx.close_receiver(r)


def protocol_of(r: rx.Receiver) -> str:
    return "grpc" if isinstance(r, rx.GrpcReceiver) else "http/protobuf"


@pytest.fixture
def make_pusher(receiver: rx.Receiver) -> Iterator[Callable[..., OtlpPusher]]:
    made: list[OtlpPusher] = []

    def make(get: Callable[[], m.Snapshot], **changes: Any) -> OtlpPusher:
        p = OtlpPusher(
            cfg(receiver.endpoint, protocol_of(receiver), **changes),
            node_name="node-a",
            cluster_name="prod-eu",
            get_snapshot=get,
        )
        made.append(p)
        return p

    yield make
    for p in made:
        p.shutdown()


def only(records: list[rx.Record], name: str, **attrs: object) -> rx.Record:
    found = [r for r in records if r.name == name and all(r.attributes.get(k) == v for k, v in attrs.items())]
    assert len(found) == 1, (name, attrs, found)
    return found[0]


def web(records: list[rx.Record], name: str) -> rx.Record:
    return only(records, name, **{"k8s.pod.name": WEB[1]})


# ---- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", m.POD_FAMILIES, ids=lambda s: s.name)
def test_prometheus_name_of_every_pod_family_is_its_exposed_name(spec: m.MetricSpec) -> None:
    assert spec.otel_name and spec.otel_unit
    assert prometheus_name(spec.otel_name, spec.otel_unit, spec.kind) == spec.exposed_name


@pytest.mark.parametrize("spec", m.SELF_FAMILIES, ids=lambda s: s.name)
def test_self_metric_names_round_trip(spec: m.MetricSpec) -> None:
    name, unit = otel_identity(spec)
    assert name.startswith("podnet.exporter.") and "_" not in name.split(".")[1]
    assert prometheus_name(name, unit, spec.kind) == spec.exposed_name


def test_otel_identity_examples() -> None:
    assert otel_identity(m.POLLS) == ("podnet.exporter.polls", "")
    assert otel_identity(m.POLL_DURATION) == ("podnet.exporter.poll_duration", "s")
    assert otel_identity(m.PROG_RUN_TIME) == ("podnet.exporter.bpf_run", "s")
    assert otel_identity(m.TCP_SENT) == ("podnet.tcp.sent", "By")


@pytest.mark.parametrize(
    ("otel_name", "unit", "kind", "expected"),
    [
        ("podnet.tcp.sent", "By", m.Kind.COUNTER, "podnet_tcp_sent_bytes_total"),
        ("podnet.tcp.rtt", "s", m.Kind.HISTOGRAM, "podnet_tcp_rtt_seconds"),
        (
            "podnet.tcp.connections.opened",
            "{connection}",
            m.Kind.COUNTER,
            "podnet_tcp_connections_opened_total",
        ),
        ("http.server.request.duration", "ms", m.Kind.HISTOGRAM, "http_server_request_duration_milliseconds"),
        ("system.cpu.utilization", "1", m.Kind.GAUGE, "system_cpu_utilization_ratio"),
        ("system.cpu.time", "1", m.Kind.COUNTER, "system_cpu_time_total"),
        ("net.io.rate", "By/s", m.Kind.GAUGE, "net_io_rate_bytes_per_second"),
        ("requests.total", "", m.Kind.COUNTER, "requests_total"),
        ("latency_seconds", "s", m.Kind.GAUGE, "latency_seconds"),  # unit already there
        ("disk.free", "MiBy", m.Kind.GAUGE, "disk_free_mebibytes"),
        ("temp", "Cel", m.Kind.GAUGE, "temp_celsius"),
        ("weird-name..x", "{pkt}/s", m.Kind.COUNTER, "weird_name_x_per_second_total"),
        ("2xx.responses", "", m.Kind.COUNTER, "_2xx_responses_total"),
    ],
)
def test_prometheus_name_rules(otel_name: str, unit: str, kind: m.Kind, expected: str) -> None:
    assert prometheus_name(otel_name, unit, kind) == expected


# ---- attributes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("Deployment", {"k8s.deployment.name": "app"}),
        ("StatefulSet", {"k8s.statefulset.name": "app"}),
        ("DaemonSet", {"k8s.daemonset.name": "app"}),
        ("Job", {"k8s.job.name": "app"}),
        ("CronJob", {"k8s.cronjob.name": "app"}),
        ("ReplicaSet", {"k8s.replicaset.name": "app"}),
        ("Pod", {}),
        ("Rollout", {"k8s.workload.name": "app", "k8s.workload.kind": "Rollout"}),
    ],
)
def test_workload_attribute_by_kind(kind: str, expected: dict[str, str]) -> None:
    labels = ("ns", "app-1", "c", "app", kind)
    got = point_attributes(m.TCP_SENT, labels, {("ns", "app-1"): "uid-1"})
    base = {
        "k8s.namespace.name": "ns",
        "k8s.pod.name": "app-1",
        "k8s.pod.uid": "uid-1",
        "k8s.container.name": "c",
    }
    assert got == base | expected


def test_empty_labels_are_left_out_and_others_keep_their_names() -> None:
    got = point_attributes(m.TCP_FAILED, ("ns", "p", "", "", "Pod", "timeout"), {})
    assert got == {"k8s.namespace.name": "ns", "k8s.pod.name": "p", "reason": "timeout"}
    assert point_attributes(m.ERRORS, ("pods",), {}) == {"stage": "pods"}
    assert point_attributes(m.POLLS, (), {}) == {}


def test_flow_peer_attributes() -> None:
    pod_peer = point_attributes(m.FLOW_BYTES, (*WEB, "sent", "shop", "db", "pod"), UIDS)
    assert pod_peer == WEB_ATTRS | {
        "direction": "sent",
        "podnet.peer.k8s.namespace.name": "shop",
        "podnet.peer.k8s.workload.name": "db",
        "podnet.peer.kind": "pod",
    }
    external = point_attributes(m.FLOW_BYTES, (*WEB, "received", "", "", "external"), UIDS)
    assert external == WEB_ATTRS | {"direction": "received", "podnet.peer.kind": "external"}


def test_pods_without_metadata_and_host_processes() -> None:
    uid = "9d0c5b8e-1111-2222-3333-444455556666"
    unknown = point_attributes(m.TCP_SENT, ("", uid, "3efb8417ec5b", "", ""), {("", uid): uid})
    assert unknown == {"k8s.pod.uid": uid, "container.id": "3efb8417ec5b"}
    host = point_attributes(m.TCP_SENT, ("", "", "nginx.service", "", ""), {})
    assert host == {"podnet.host.cgroup": "nginx.service"}


def test_resource_precedence() -> None:
    res = otlp.build_resource("node-a", "prod-eu", (("k8s.cluster.name", "env"), ("team", "net")))
    attrs = dict(res.attributes)
    assert attrs["service.name"] == "podnet-exporter"
    assert attrs["service.version"] == __version__
    assert attrs["k8s.node.name"] == "node-a"
    assert attrs["k8s.cluster.name"] == "prod-eu"  # the flag wins over OTEL_RESOURCE_ATTRIBUTES
    assert attrs["team"] == "net"
    no_cluster = dict(otlp.build_resource("node-a", "", ()).attributes)
    assert "k8s.cluster.name" not in no_cluster
    from_env = dict(otlp.build_resource("node-a", "", (("k8s.cluster.name", "env"),)).attributes)
    assert from_env["k8s.cluster.name"] == "env"


# ---- pure conversion ---------------------------------------------------------------------------------

slot_sets = st.dictionaries(st.integers(0, 163), st.integers(1, 10**6), min_size=1, max_size=40).map(
    lambda d: tuple(sorted(d.items()))
)


@settings(max_examples=200, deadline=None)
@given(slot_sets)
def test_exponential_buckets_are_the_kernel_slots(slots: tuple[tuple[int, int], ...]) -> None:
    hs = m.HistSample(WEB, slots, sum(c for _, c in slots), 1.5)
    snap = m.Snapshot.build(100.0, {}, {m.TCP_RTT.name: (hs,)})
    (fam,) = snapshot_metrics(snap, start_ns=0)
    (point,) = fam.points
    assert isinstance(point, ExponentialHistogramDataPoint)
    assert point.scale == 2 and point.zero_count == 0 and point.count == hs.count
    got = {
        point.positive.offset + i + HIST_INDEX_OFFSET: c
        for i, c in enumerate(point.positive.bucket_counts)
        if c
    }
    assert got == dict(slots)
    assert point.positive.offset == slots[0][0] - HIST_INDEX_OFFSET
    assert len(point.positive.bucket_counts) == slots[-1][0] - slots[0][0] + 1


@settings(max_examples=100, deadline=None)
@given(slot_sets, st.integers(0, 2))
def test_explicit_buckets_follow_the_bucket_layout(slots: tuple[tuple[int, int], ...], scale: int) -> None:
    hs = m.HistSample(WEB, slots, sum(c for _, c in slots), 1.5)
    snap = m.Snapshot.build(100.0, {}, {m.TCP_RTT.name: (hs,)})
    layout = m.BucketLayout(scale=scale)
    (fam,) = snapshot_metrics(snap, start_ns=0, histogram="explicit", layout=layout)
    (point,) = fam.points
    assert isinstance(point, HistogramDataPoint)
    assert list(point.explicit_bounds) == list(layout.bounds)
    running = 0
    for (_, cumulative), count in zip(layout.cumulative(slots), point.bucket_counts, strict=True):
        running += count
        assert running == cumulative
    assert running == hs.count


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=8))
def test_delta_points_add_up_to_the_total(increments: list[int]) -> None:
    baseline: dict[otlp.SeriesKey, tuple[int, m.Sample | m.HistSample]] = {}
    total = delivered = 0
    for i, inc in enumerate(increments):
        total += inc
        snap = m.Snapshot.build(100.0 + i, {m.TCP_SENT.name: (m.Sample(WEB, float(total)),)}, {})
        for fam in snapshot_metrics(snap, start_ns=0, baseline=baseline):
            for point, (key, t, sample) in zip(fam.points, fam.delivered, strict=True):
                assert isinstance(point, NumberDataPoint)
                delivered += int(point.value)
                baseline[key] = (t, sample)
    assert delivered == total


def _starts(families: list[otlp._Family]) -> dict[str, set[int]]:
    return {fam.spec.name: {p.start_time_unix_nano for p in fam.points} for fam in families}


@pytest.mark.parametrize("delta", [False, True])
def test_points_start_when_the_pod_counters_started(delta: bool) -> None:
    # The pod counters outlive the exporter: they started at counters_since, before this process
    # (start_ns); the self-metrics count from the process start; gauges have no start.
    since, start_ns = 1_600_000_000.5, 1_700_000_000_000_000_000
    snap = snapshot(1_700_000_100.0, since=since)
    starts = _starts(snapshot_metrics(snap, start_ns=start_ns, baseline={} if delta else None))
    for name in (m.TCP_SENT.name, m.TCP_RECEIVED.name, m.FLOW_BYTES.name, m.TCP_FAILED.name, m.TCP_RTT.name):
        assert starts[name] == {1_600_000_000_500_000_000}, name
    assert starts[m.POLLS.name] == starts[m.ERRORS.name] == {start_ns}
    assert starts[m.TCP_ACTIVE.name] == starts[m.POLL_DURATION.name] == {0}
    # Unknown (0): the process start, as before.
    unknown = _starts(snapshot_metrics(snapshot(1_700_000_100.0), start_ns=start_ns))
    assert unknown[m.TCP_SENT.name] == unknown[m.TCP_RTT.name] == {start_ns}
    # Never after the point's own time.
    late = _starts(snapshot_metrics(snapshot(1_700_000_100.0, since=1_800_000_000.0), start_ns=start_ns))
    assert late[m.TCP_SENT.name] == {1_700_000_100_000_000_000}


# ---- pushed to real receivers ------------------------------------------------------------------------


def test_cumulative_export_values_names_attributes_resource(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]
) -> None:
    now = time.time()
    snap = snapshot(now)
    pusher = make_pusher(lambda: snap)
    t0 = time.time_ns()
    assert pusher.export_now()
    assert pusher.stats[:2] == (1, 0) and pusher.stats[2] >= now
    records = receiver.records()

    sent = web(records, "podnet.tcp.sent")
    assert (sent.kind, sent.unit, sent.temporality, sent.is_monotonic) == ("sum", "By", CUMULATIVE, True)
    assert sent.point.WhichOneof("value") == "as_int" and sent.point.as_int == 1000
    assert sent.attributes == WEB_ATTRS
    assert sent.description == m.TCP_SENT.help
    assert sent.point.time_unix_nano == int(now * 1e9)
    assert 0 < sent.point.start_time_unix_nano <= t0
    assert only(records, "podnet.tcp.sent", **{"k8s.statefulset.name": "db"}).value == 7
    assert web(records, "podnet.tcp.received").value == 250

    flow = only(records, "podnet.flow", **{"podnet.peer.kind": "pod"})
    assert (
        flow.value == 600 and flow.unit == "By" and flow.attributes["podnet.peer.k8s.workload.name"] == "db"
    )
    assert only(records, "podnet.flow", **{"podnet.peer.kind": "external"}).value == 400

    active = web(records, "podnet.tcp.active_connections")
    assert (active.kind, active.unit, active.value, active.attributes["direction"]) == (
        "gauge",
        "{connection}",
        2,
        "outbound",
    )
    failed = web(records, "podnet.tcp.connections.failed")
    assert failed.attributes["reason"] == "refused" and failed.unit == "{connection}"

    polls = only(records, "podnet.exporter.polls")
    assert (polls.kind, polls.value, polls.attributes) == ("sum", 12, {})
    duration = only(records, "podnet.exporter.poll_duration")
    assert (duration.kind, duration.unit, duration.point.as_double) == ("gauge", "s", 0.0125)
    assert only(records, "podnet.exporter.errors").attributes == {"stage": "pods"}

    assert {r.scope for r in records} == {"podnet"}
    assert records[0].resource == {
        "service.name": "podnet-exporter",
        "service.version": __version__,
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": sdk_version,
        "deployment.environment": "test",
        "k8s.node.name": "node-a",
        "k8s.cluster.name": "prod-eu",
    }
    # Every family with data is there, and nothing else.
    assert {r.name for r in records} == {
        "podnet.tcp.sent",
        "podnet.tcp.received",
        "podnet.flow",
        "podnet.tcp.active_connections",
        "podnet.tcp.connections.failed",
        "podnet.tcp.rtt",
        "podnet.exporter.polls",
        "podnet.exporter.poll_duration",
        "podnet.exporter.errors",
    }
    headers = receiver.headers[0]
    assert headers.get("x-scope-orgid") == "tenant-1"


def test_exponential_histogram_carries_the_kernel_buckets(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]
) -> None:
    snap = snapshot(time.time())
    assert make_pusher(lambda: snap).export_now()
    rtt = web(receiver.records(), "podnet.tcp.rtt")
    p = rtt.point
    assert (rtt.kind, rtt.unit, rtt.temporality) == ("exponential_histogram", "s", CUMULATIVE)
    assert (p.scale, p.zero_count, p.count, p.sum) == (2, 0, 9, 0.031)
    assert p.positive.offset == 97 - HIST_INDEX_OFFSET
    assert list(p.positive.bucket_counts) == [3, 0, 0, 5, 0, 0, 0, 1]
    assert not p.HasField("min") and not p.HasField("max")
    assert len(p.negative.bucket_counts) == 0
    assert rtt.attributes == WEB_ATTRS


def test_explicit_histogram_option(receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]) -> None:
    snap = snapshot(time.time())
    assert make_pusher(lambda: snap, histogram="explicit").export_now()
    rtt = web(receiver.records(), "podnet.tcp.rtt")
    p = rtt.point
    layout = m.BucketLayout()
    assert (rtt.kind, rtt.unit, p.count, p.sum) == ("histogram", "s", 9, 0.031)
    assert list(p.explicit_bounds) == list(layout.bounds)
    assert len(p.bucket_counts) == len(layout.bounds) + 1
    # Slot i covers (2^((i-120)/4), 2^((i-119)/4)] s; scale 0 bounds are powers of two, so slot 97
    # lands in (2^-6, 2^-5], slot 100 in (2^-5, 2^-4] and slot 104 in (2^-4, 2^-3].
    by_bound = dict(zip([*p.explicit_bounds, float("inf")], p.bucket_counts, strict=True))
    assert (by_bound[2.0**-5], by_bound[2.0**-4], by_bound[2.0**-3]) == (3, 5, 1)
    assert sum(p.bucket_counts) == 9
    assert not p.HasField("min") and not p.HasField("max")


def test_delta_temporality(receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]) -> None:
    t1 = time.time()
    holder = Holder(snapshot(t1))
    pusher = make_pusher(holder.get, temporality="delta")
    assert pusher.export_now()
    first = receiver.records()
    assert web(first, "podnet.tcp.sent").value == 1000  # everything since the start
    assert web(first, "podnet.tcp.sent").temporality == DELTA
    receiver.clear()

    t2 = t1 + 1
    grown = ((97, 3), (100, 7), (104, 1), (110, 2))
    holder.set(snapshot(t2, sent=1500, rtt=grown, rtt_sum=0.131))
    assert pusher.export_now()
    second = receiver.records()
    sent = web(second, "podnet.tcp.sent")
    assert sent.value == 500
    assert sent.point.start_time_unix_nano == int(t1 * 1e9)
    assert sent.point.time_unix_nano == int(t2 * 1e9)
    rtt = web(second, "podnet.tcp.rtt")
    assert rtt.temporality == DELTA and rtt.point.count == 4
    assert rtt.point.sum == pytest.approx(0.1)
    assert rtt.point.positive.offset == 100 - HIST_INDEX_OFFSET
    assert list(rtt.point.positive.bucket_counts) == [2] + [0] * 9 + [2]
    # Unchanged counters send nothing; gauges always send their value.
    assert not [r for r in second if r.name == "podnet.tcp.received"]
    assert web(second, "podnet.tcp.active_connections").value == 2
    receiver.clear()

    # A counter that went down restarted: all of its value is new.
    t3 = t2 + 1
    holder.set(snapshot(t3, sent=40, rtt=grown, rtt_sum=0.131))
    assert pusher.export_now()
    restarted = web(receiver.records(), "podnet.tcp.sent")
    assert restarted.value == 40 and restarted.point.start_time_unix_nano == int(t2 * 1e9)


def test_cumulative_start_is_counters_since_across_exporter_restarts(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]
) -> None:
    since = time.time() - 3600
    for restart in range(2):  # a second pusher: the exporter restarted, its counters did not
        snap = snapshot(time.time(), sent=1000.0 + restart, since=since)
        t0 = time.time_ns()
        assert make_pusher(lambda snap=snap: snap).export_now()
        records = receiver.records()
        assert web(records, "podnet.tcp.sent").value == 1000 + restart
        assert web(records, "podnet.tcp.sent").point.start_time_unix_nano == int(since * 1e9)
        assert web(records, "podnet.tcp.rtt").point.start_time_unix_nano == int(since * 1e9)
        # The process's own counters started with it.
        assert t0 - 10**9 < only(records, "podnet.exporter.polls").point.start_time_unix_nano <= t0
        receiver.clear()


def test_delta_drops_its_baseline_when_the_counters_restart(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]
) -> None:
    t1 = time.time()
    s1, s2 = t1 - 3600, t1 + 0.5
    holder = Holder(snapshot(t1, since=s1))
    pusher = make_pusher(holder.get, temporality="delta")
    assert pusher.export_now()
    first = web(receiver.records(), "podnet.tcp.sent")
    # First seen: everything since the counters started, not since this process did.
    assert first.value == 1000 and first.point.start_time_unix_nano == int(s1 * 1e9)
    receiver.clear()

    # The state was discarded at s2 and the counters restarted from zero; by t2 they grew past
    # their old values, so no decrease gives the reset away: only counters_since does.
    t2 = t1 + 1
    grown = ((97, 30), (100, 50), (104, 10))
    polls: dict[str, tuple[m.Sample, ...]] = {m.POLLS.name: (m.Sample((), 15.0),)}
    holder.set(snapshot(t2, sent=1500, received=260, rtt=grown, rtt_sum=0.5, extra=polls, since=s2))
    assert pusher.export_now()
    records = receiver.records()
    sent = web(records, "podnet.tcp.sent")
    assert sent.value == 1500 and sent.point.start_time_unix_nano == int(s2 * 1e9)
    assert web(records, "podnet.tcp.received").value == 260
    db_sent = only(records, "podnet.tcp.sent", **{"k8s.statefulset.name": "db"})
    assert db_sent.value == 7  # unchanged, but restarted: sent whole again
    rtt = web(records, "podnet.tcp.rtt")
    assert rtt.point.count == 90 and rtt.point.start_time_unix_nano == int(s2 * 1e9)
    # The process's own counters did not restart: their baseline stays.
    polls_point = only(records, "podnet.exporter.polls")
    assert polls_point.value == 3 and polls_point.point.start_time_unix_nano == int(t1 * 1e9)
    receiver.clear()

    # Then deltas again, against the new baseline.
    holder.set(snapshot(t2 + 1, sent=1600, received=260, rtt=grown, rtt_sum=0.5, extra=polls, since=s2))
    assert pusher.export_now()
    sent = web(receiver.records(), "podnet.tcp.sent")
    assert sent.value == 100 and sent.point.start_time_unix_nano == int(t2 * 1e9)


def test_delta_after_a_failed_export_covers_the_whole_gap(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]
) -> None:
    t1 = time.time()
    holder = Holder(snapshot(t1))
    pusher = make_pusher(holder.get, temporality="delta")
    assert pusher.export_now()
    receiver.fail = True
    holder.set(snapshot(t1 + 1, sent=1300))
    assert not pusher.export_now()
    receiver.fail = False
    receiver.clear()
    holder.set(snapshot(t1 + 2, sent=1700))
    assert pusher.export_now()
    sent = web(receiver.records(), "podnet.tcp.sent")
    assert sent.value == 700
    assert sent.point.start_time_unix_nano == int(t1 * 1e9)
    assert pusher.stats[:2] == (2, 1)


def test_lowmemory_temporality_is_delta(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]
) -> None:
    snap = snapshot(time.time())
    assert make_pusher(lambda: snap, temporality="lowmemory").export_now()
    records = receiver.records()
    assert web(records, "podnet.tcp.sent").temporality == DELTA
    assert web(records, "podnet.tcp.rtt").temporality == DELTA


def test_gzip_compression(receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]) -> None:
    snap = snapshot(time.time())
    assert make_pusher(lambda: snap, compression="gzip").export_now()
    assert web(receiver.records(), "podnet.tcp.sent").value == 1000
    if isinstance(receiver, rx.HttpReceiver):
        assert receiver.encodings == ["gzip"]


def test_large_snapshots_are_split_into_requests(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(otlp, "MAX_POINTS_PER_REQUEST", 7)
    pods = tuple(m.Sample(("ns", f"p{i}", "c", f"p{i}", "Pod"), float(i + 1)) for i in range(30))
    snap = m.Snapshot.build(time.time(), {m.TCP_SENT.name: pods, m.POLLS.name: (m.Sample((), 1.0),)}, {})
    assert make_pusher(lambda: snap).export_now()
    assert len(receiver.requests) == 5  # 31 points
    sent = [r for r in receiver.records() if r.name == "podnet.tcp.sent"]
    assert sorted(r.value for r in sent) == [float(i + 1) for i in range(30)]


def test_delta_with_a_partly_delivered_export_sends_nothing_twice(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(otlp, "MAX_POINTS_PER_REQUEST", 3)
    labels = [("ns", f"p{i}", "c", f"p{i}", "Pod") for i in range(6)]

    def snap(t: float, add: float) -> m.Snapshot:
        series = tuple(m.Sample(ls, 100.0 * (i + 1) + add) for i, ls in enumerate(labels))
        return m.Snapshot.build(t, {m.TCP_SENT.name: series}, {})

    t1 = time.time()
    holder = Holder(snap(t1, 0))
    pusher = make_pusher(holder.get, temporality="delta")
    receiver.accept_limit = 1  # the first request of the export gets through, the second fails
    assert not pusher.export_now()
    receiver.accept_limit = None
    holder.set(snap(t1 + 1, 10))
    assert pusher.export_now()
    delivered: dict[str, float] = {}
    for r in receiver.records():
        pod = str(r.attributes["k8s.pod.name"])
        delivered[pod] = delivered.get(pod, 0) + r.value
    assert delivered == {f"p{i}": 100.0 * (i + 1) + 10 for i in range(6)}
    assert len(receiver.requests) == 3
    assert pusher.stats[:2] == (1, 1)


def test_nothing_to_send_before_the_first_poll_or_twice(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]
) -> None:
    holder = Holder(m.EMPTY_SNAPSHOT)
    pusher = make_pusher(holder.get)
    assert pusher.export_now()
    assert receiver.attempts == 0
    holder.set(snapshot(time.time()))
    assert pusher.export_now() and pusher.export_now()
    assert receiver.attempts == 1
    assert pusher.stats[:2] == (1, 0)


def test_periodic_export_runs_off_the_caller_thread(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]
) -> None:
    start = time.time()
    threads: list[str] = []

    def get() -> m.Snapshot:
        threads.append(threading.current_thread().name)
        return snapshot(start + len(threads), sent=1000.0 * len(threads))

    pusher = make_pusher(get)
    pusher.start()
    receiver.wait_requests(3, timeout=10)
    assert set(threads) == {"podnet-otlp"}
    with pytest.raises(RuntimeError):
        pusher.start()


def test_outage_then_first_export_carries_the_latest_totals(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]
) -> None:
    start = time.time()
    holder = Holder(snapshot(start))
    pusher = make_pusher(holder.get, interval=0.2, timeout=0.3)
    pusher.start()
    receiver.wait_requests(1)
    receiver.stop()
    # Counters keep growing for 3 intervals while the backend is down.
    total = 1000.0
    for i in range(1, 7):
        total += 1111.0
        holder.set(snapshot(start + i, sent=total, received=total / 2))
        time.sleep(0.1)
    failed_before = pusher.stats[1]
    deadline = time.monotonic() + 10
    while pusher.stats[1] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pusher.stats[1] >= 3 and failed_before >= 1
    ok_before = pusher.stats[0]
    receiver.clear()
    receiver.start()
    receiver.wait_requests(1)
    first = receiver.records()
    assert web(first, "podnet.tcp.sent").value == total
    assert web(first, "podnet.tcp.received").value == total / 2
    deadline = time.monotonic() + 10
    while pusher.stats[0] == ok_before and time.monotonic() < deadline:
        time.sleep(0.05)
    ok, failed, last_success = pusher.stats
    assert ok == ok_before + 1 and failed >= 3 and last_success >= start


@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
def test_memory_does_not_grow_with_failed_intervals(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher], temporality: str
) -> None:
    start = time.time()
    holder = Holder(snapshot(start))
    pusher = make_pusher(holder.get, temporality=temporality, timeout=0.2)
    assert pusher.export_now()
    series = sum(len(v) for v in holder.get().samples.values()) + 1
    receiver.stop()

    def live(kind: type) -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, kind))

    sizes = []
    for i in range(1, 13):
        holder.set(snapshot(start + i, sent=1000.0 + i))
        assert not pusher.export_now()
        if i in (2, 12):
            sizes.append((retained_series(pusher), live(m.Snapshot), live(MetricsData)))
    assert pusher.stats[1] == 12
    assert sizes[0] == sizes[1], "state grew with failed intervals"
    assert sizes[1][0] <= series
    assert sizes[1][2] == 0  # no request kept for a later retry

    # A series that left the snapshot leaves the delta baseline too.
    receiver.start()
    holder.set(m.Snapshot.build(start + 20, {m.TCP_SENT.name: (m.Sample(WEB, 5000.0),)}, {}))
    assert pusher.export_now()
    assert retained_series(pusher) == (1 if temporality == "delta" else 0)


def test_one_log_line_per_failed_interval(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher], caplog: pytest.LogCaptureFixture
) -> None:
    start = time.time()
    holder = Holder(snapshot(start))
    pusher = make_pusher(holder.get, timeout=1.5)  # long enough for the SDK to retry once
    receiver.stop()
    caplog.set_level(logging.INFO)
    for i in range(3):
        holder.set(snapshot(start + i + 1))
        assert not pusher.export_now()
    ours = [r for r in caplog.records if r.name == "exporter.export.otlp"]
    assert [r.levelno for r in ours] == [logging.WARNING] * 3
    assert all(receiver.endpoint in r.getMessage() for r in ours)
    assert "Connection refused" in ours[-1].getMessage() or "UNAVAILABLE" in ours[-1].getMessage()
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]
    assert all(r.exc_info is None for r in caplog.records)

    caplog.clear()
    receiver.start()
    holder.set(snapshot(start + 10))
    assert pusher.export_now()
    assert [(r.levelno, "works again after 3" in r.getMessage()) for r in caplog.records] == [
        (logging.INFO, True)
    ]


def test_sdk_logs_show_at_debug(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher], caplog: pytest.LogCaptureFixture
) -> None:
    snap = snapshot(time.time())
    pusher = make_pusher(lambda: snap)
    receiver.stop()
    caplog.set_level(logging.DEBUG)
    assert not pusher.export_now()
    sdk = [r for r in caplog.records if r.name.startswith("opentelemetry")]
    assert sdk and all(r.levelno == logging.DEBUG for r in sdk)


def test_shutdown_flushes_once_and_is_final(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]
) -> None:
    holder = Holder(snapshot(time.time()))
    pusher = make_pusher(holder.get, interval=3600)
    pusher.start()
    holder.set(snapshot(time.time() + 1, sent=4242))
    pusher.shutdown()
    assert len(receiver.requests) == 1
    sent = web(receiver.records(), "podnet.tcp.sent")
    assert sent.value == 4242
    assert not pusher.export_now()
    pusher.shutdown()
    assert pusher.stats[:2] == (1, 0)
    with pytest.raises(RuntimeError):
        pusher.start()


def test_a_slow_backend_fails_within_the_timeout(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher]
) -> None:
    snap = snapshot(time.time())
    pusher = make_pusher(lambda: snap, timeout=0.3)
    receiver.delay = 1.0
    assert not pusher.export_now()
    assert pusher.stats[:2] == (0, 1)


def test_a_snapshot_getter_that_raises_counts_as_a_failed_export(
    receiver: rx.Receiver, make_pusher: Callable[..., OtlpPusher], caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> m.Snapshot:
        raise ValueError("no snapshot")

    pusher = make_pusher(broken)
    assert not pusher.export_now()
    assert pusher.stats[:2] == (0, 1)
    assert "ValueError: no snapshot" in caplog.text


def test_logs_never_show_credentials_or_header_values() -> None:
    from exporter.export.otlp_config import redact_urls

    secret = "s3cr3tTOKEN"
    config = cfg(
        f"https://user:{secret}@collector:4318/v1/metrics",
        "http/protobuf",
        headers=(("authorization", f"Bearer {secret}"),),
    )
    assert config.shown_endpoint == "https://***@collector:4318/v1/metrics"
    reason = f"401 from https://user:{secret}@collector:4318 for header Bearer {secret}"
    assert secret not in config.redact(reason)
    assert redact_urls("grpc://a:b@h:1 and http://h:2/x@y") == "grpc://***@h:1 and http://h:2/x@y"
