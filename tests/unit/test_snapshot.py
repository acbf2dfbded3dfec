"""Tests for exporter.metrics.snapshot.build_snapshot: raw kernel data + identities -> Snapshot."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.metrics import model as m
from exporter.metrics.ledger import LOOPBACK
from exporter.metrics.raw import CgroupCounters, RawData
from exporter.metrics.snapshot import ExporterState, build_snapshot, request_labels
from exporter.pods.identity import Identity
from exporter.pods.metadata import MetadataSourceState
from exporter.pods.pods import PodMeta

UID_A = "5f1d3c1e-8a2b-4c3d-9e4f-0123456789ab"
UID_B = "9a9b9c9d-0000-4111-8222-333344445555"
UID_C = "c0ffee00-1111-4222-8333-444455556666"

WEB_NGINX = Identity("shop", "web-7c9f8d6b5-x2x4q", "nginx", "web", "Deployment", UID_A)
WEB_ENVOY = Identity("shop", "web-7c9f8d6b5-x2x4q", "envoy", "web", "Deployment", UID_A)
WEB_SANDBOX = Identity("shop", "web-7c9f8d6b5-x2x4q", "", "web", "Deployment", UID_A)
DB = Identity("data", "db-0", "postgres", "db", "StatefulSet", UID_B)
UNKNOWN_POD = Identity("", UID_C, "3efb8417ec5b", "", "", UID_C)
HOST_NGINX = Identity("", "", "nginx.service", "", "")

NOW = 1_700_000_000.5


def v4(addr: str) -> bytes:
    """A flow key's peer: IPv4 as v4-mapped IPv6, as the kernel stores it."""
    return ipaddress.IPv6Address("::ffff:" + addr).packed


def v6(addr: str) -> bytes:
    return ipaddress.IPv6Address(addr).packed


EXTERNAL = ("", "", "external")


def build(raw: RawData, identities: dict[int, Identity], state: ExporterState | None = None) -> m.Snapshot:
    return build_snapshot(raw, identities, state or ExporterState(), NOW)


def values(snap: m.Snapshot, spec: m.MetricSpec) -> dict[tuple[str, ...], float]:
    out = {s.labels: s.value for s in snap.samples.get(spec.name, ())}
    assert len(out) == len(snap.samples.get(spec.name, ())), "duplicate label sets"
    return out


def hists(snap: m.Snapshot, spec: m.MetricSpec) -> dict[tuple[str, ...], m.HistSample]:
    return {h.labels: h for h in snap.histograms.get(spec.name, ())}


# ---- pod counters ----------------------------------------------------------------------


def test_bytes_sum_across_cgroups_sharing_a_label_set() -> None:
    raw = RawData()
    raw.cgroups[11] = CgroupCounters(sent=100, received=10)
    raw.cgroups[12] = CgroupCounters(sent=5, received=7)  # same pod+container, another cgroup
    raw.cgroups[13] = CgroupCounters(sent=1000, received=2000)
    snap = build(raw, {11: WEB_NGINX, 12: WEB_NGINX, 13: DB})
    assert values(snap, m.TCP_SENT) == {WEB_NGINX.labels: 105, DB.labels: 1000}
    assert values(snap, m.TCP_RECEIVED) == {WEB_NGINX.labels: 17, DB.labels: 2000}


def test_containers_of_one_pod_stay_apart() -> None:
    raw = RawData()
    raw.cgroups[1] = CgroupCounters(sent=1)
    raw.cgroups[2] = CgroupCounters(sent=2)
    raw.cgroups[3] = CgroupCounters(sent=4)
    snap = build(raw, {1: WEB_NGINX, 2: WEB_ENVOY, 3: WEB_SANDBOX})
    assert values(snap, m.TCP_SENT) == {WEB_NGINX.labels: 1, WEB_ENVOY.labels: 2, WEB_SANDBOX.labels: 4}


def test_cgroups_without_identity_are_skipped_everywhere() -> None:
    raw = RawData()
    raw.cgroups[1] = CgroupCounters(sent=1, received=1, opened=[1, 1], retransmits=3)
    raw.cgroups[99] = CgroupCounters(sent=50, received=60, opened=[5, 5], failed=[1, 0, 0, 0], retransmits=9)
    raw.flows[(99, EXTERNAL)] = (7, 8)
    raw.rtt[99][130] = (1, 1000)
    raw.connect[99][130] = (1, 1000)
    snap = build(raw, {1: HOST_NGINX})
    assert values(snap, m.TCP_SENT) == {HOST_NGINX.labels: 1}
    assert values(snap, m.TCP_RETRANSMITS) == {HOST_NGINX.labels: 3}
    assert m.TCP_FAILED.name not in snap.samples
    assert m.FLOW_BYTES.name not in snap.samples
    assert snap.histograms == {}


def test_host_and_unknown_pod_identities() -> None:
    raw = RawData()
    raw.cgroups[1] = CgroupCounters(sent=1)
    raw.cgroups[2] = CgroupCounters(sent=2)
    snap = build(raw, {1: HOST_NGINX, 2: UNKNOWN_POD})
    assert values(snap, m.TCP_SENT) == {
        ("", "", "nginx.service", "", ""): 1,
        ("", UID_C, "3efb8417ec5b", "", ""): 2,
    }


def test_connections_per_direction() -> None:
    raw = RawData()
    raw.cgroups[1] = CgroupCounters(opened=[3, 0], closed=[1, 0], active=[2, 0])
    raw.cgroups[2] = CgroupCounters(opened=[1, 4], closed=[1, 4], active=[0, 0])
    snap = build(raw, {1: WEB_NGINX, 2: WEB_NGINX})
    out, inb = (*WEB_NGINX.labels, "outbound"), (*WEB_NGINX.labels, "inbound")
    assert values(snap, m.TCP_OPENED) == {out: 4, inb: 4}
    assert values(snap, m.TCP_CLOSED) == {out: 2, inb: 4}
    assert values(snap, m.TCP_ACTIVE) == {out: 2, inb: 0}


def test_direction_without_activity_is_left_out() -> None:
    raw = RawData()
    raw.cgroups[1] = CgroupCounters(opened=[0, 2], closed=[0, 1], active=[0, 1])
    snap = build(raw, {1: DB})
    assert set(values(snap, m.TCP_OPENED)) == {(*DB.labels, "inbound")}


def test_negative_active_count_is_clamped_per_cgroup() -> None:
    # Per-CPU +1/-1 on different CPUs can sum below zero for one cgroup transiently.
    raw = RawData()
    raw.cgroups[1] = CgroupCounters(opened=[1, 0], active=[-1, 0])
    raw.cgroups[2] = CgroupCounters(opened=[1, 0], active=[3, 0])
    snap = build(raw, {1: DB, 2: DB})
    assert values(snap, m.TCP_ACTIVE) == {(*DB.labels, "outbound"): 3}


def test_failures_by_reason() -> None:
    raw = RawData()
    raw.cgroups[1] = CgroupCounters(failed=[2, 0, 1, 0])
    raw.cgroups[2] = CgroupCounters(failed=[1, 5, 0, 3])
    raw.cgroups[3] = CgroupCounters(sent=1)  # no failures: no failure series
    snap = build(raw, {1: WEB_NGINX, 2: WEB_NGINX, 3: DB})
    assert values(snap, m.TCP_FAILED) == {
        (*WEB_NGINX.labels, "refused"): 3,
        (*WEB_NGINX.labels, "timeout"): 5,
        (*WEB_NGINX.labels, "reset"): 1,
        (*WEB_NGINX.labels, "other"): 3,
    }


def test_retransmits_and_resets() -> None:
    raw = RawData()
    raw.cgroups[1] = CgroupCounters(retransmits=4, resets_sent=1, resets_received=2)
    raw.cgroups[2] = CgroupCounters(resets_received=1)
    snap = build(raw, {1: DB, 2: DB})
    assert values(snap, m.TCP_RETRANSMITS) == {DB.labels: 4}
    assert values(snap, m.TCP_RESETS) == {(*DB.labels, "sent"): 1, (*DB.labels, "received"): 3}


# ---- flows ---------------------------------------------------------------------------


def test_flows_sum_per_peer_workload() -> None:
    raw = RawData()
    # Flows arrive classified (exporter.metrics.ledger); cgroups sharing labels add up.
    raw.flows[(1, ("data", "db", "pod"))] = (120, 1200)
    raw.flows[(2, ("data", "db", "pod"))] = (1, 2)  # second cgroup with the same labels
    raw.flows[(1, ("", "", "node"))] = (3, 4)
    raw.flows[(1, EXTERNAL)] = (12, 14)
    snap = build(raw, {1: WEB_NGINX, 2: WEB_NGINX})
    pl = WEB_NGINX.labels
    assert values(snap, m.FLOW_BYTES) == {
        (*pl, "sent", "data", "db", "pod"): 121,
        (*pl, "received", "data", "db", "pod"): 1202,
        (*pl, "sent", "", "", "node"): 3,
        (*pl, "received", "", "", "node"): 4,
        (*pl, "sent", "", "", "external"): 12,
        (*pl, "received", "", "", "external"): 14,
    }


@pytest.mark.parametrize(
    ("owner", "peer"),
    [(WEB_NGINX, ("shop", "web", "pod")), (HOST_NGINX, ("", "", "node")), (UNKNOWN_POD, ("", "", "pod"))],
)
def test_loopback_flows_name_their_owner(owner: Identity, peer: tuple[str, str, str]) -> None:
    raw = RawData()
    raw.flows[(1, LOOPBACK)] = (5, 6)
    snap = build(raw, {1: owner})
    assert values(snap, m.FLOW_BYTES) == {
        (*owner.labels, "sent", *peer): 5,
        (*owner.labels, "received", *peer): 6,
    }


def test_flow_labels_match_the_family() -> None:
    raw = RawData()
    raw.flows[(1, EXTERNAL)] = (1, 1)
    snap = build(raw, {1: DB})
    for s in snap.samples[m.FLOW_BYTES.name]:
        assert len(s.labels) == len(m.FLOW_BYTES.labels)
        assert s.labels[len(m.POD_LABELS)] in ("sent", "received")


# ---- histograms -----------------------------------------------------------------------


def test_histograms_sum_per_slot_and_convert_ns_to_seconds() -> None:
    raw = RawData()
    raw.rtt[1] = {100: (2, 2_000), 104: (1, 5_000)}
    raw.rtt[2] = {100: (3, 1_000), 110: (1, 7_000_000)}  # same labels as cgroup 1
    raw.rtt[3] = {90: (4, 400)}
    raw.connect[1] = {130: (1, 1_500_000_000)}
    snap = build(raw, {1: WEB_NGINX, 2: WEB_NGINX, 3: DB})
    rtt = hists(snap, m.TCP_RTT)
    assert set(rtt) == {WEB_NGINX.labels, DB.labels}
    web = rtt[WEB_NGINX.labels]
    assert web.slots == ((100, 5), (104, 1), (110, 1))
    assert web.count == 7
    assert web.sum == pytest.approx((2_000 + 5_000 + 1_000 + 7_000_000) / 1e9)
    assert rtt[DB.labels].slots == ((90, 4),)
    assert rtt[DB.labels].sum == pytest.approx(400e-9)
    conn = hists(snap, m.TCP_CONNECT)
    assert set(conn) == {WEB_NGINX.labels}
    assert conn[WEB_NGINX.labels].sum == pytest.approx(1.5)
    assert conn[WEB_NGINX.labels].count == 1


def test_histogram_slots_are_ascending_without_zero_counts() -> None:
    raw = RawData()
    raw.rtt[1] = {150: (1, 1), 3: (2, 2), 77: (0, 0), 120: (5, 5)}
    snap = build(raw, {1: DB})
    (h,) = snap.histograms[m.TCP_RTT.name]
    assert h.slots == ((3, 2), (120, 5), (150, 1))
    assert h.count == 8


slots_strategy = st.dictionaries(
    st.integers(min_value=0, max_value=163),
    st.tuples(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=10**15)),
    max_size=20,
)


@settings(deadline=None)
@given(st.lists(slots_strategy, min_size=1, max_size=5))
def test_histogram_merge_property(per_cgroup: list[dict[int, tuple[int, int]]]) -> None:
    raw = RawData()
    for i, slots in enumerate(per_cgroup):
        raw.rtt[i + 1] = dict(slots)
    snap = build(raw, {i + 1: DB for i in range(len(per_cgroup))})
    expected: dict[int, int] = {}
    for slots in per_cgroup:
        for slot, (count, _) in slots.items():
            expected[slot] = expected.get(slot, 0) + count
    total_ns = sum(s for slots in per_cgroup for _, s in slots.values())
    (h,) = snap.histograms[m.TCP_RTT.name]
    assert h.slots == tuple(sorted((k, v) for k, v in expected.items() if v))
    assert h.count == sum(expected.values())
    assert h.sum == pytest.approx(total_ns / 1e9)


# ---- self-metrics and metadata ---------------------------------------------------------


def test_self_metrics_present() -> None:
    raw = RawData()
    raw.map_failures = {"tcp_flow_bytes": 3, "tcp_bytes_by_cgroup": 0}
    raw.map_entries = {"tcp_flow_bytes": 17, "tcp_socks_open": 2}
    state = ExporterState(
        build=("0.1.0", "3.11.2", "0.26.0", "6.1.0-18-amd64", "raw_tracepoint"),
        poll_seconds=0.25,
        polls=42,
        errors={"pods_file": 2, "node_addresses": 1},
        programs={"sock_send_length": True, "tcp_probe": False},
        unresolved=5,
        pods=12,
        bpf_stats={"tcp_probe": (2_500_000_000, 1000)},
    )
    snap = build(raw, {}, state=state)
    assert values(snap, m.BUILD_INFO) == {
        ("0.1.0", "3.11.2", "0.26.0", "6.1.0-18-amd64", "raw_tracepoint"): 1
    }
    assert values(snap, m.POLL_DURATION) == {(): 0.25}
    assert values(snap, m.POLLS) == {(): 42}
    assert values(snap, m.LAST_POLL) == {(): NOW}
    assert values(snap, m.ERRORS) == {("pods_file",): 2, ("node_addresses",): 1}
    assert values(snap, m.PROGRAM_ATTACHED) == {("sock_send_length",): 1, ("tcp_probe",): 0}
    assert values(snap, m.MAP_UPDATE_FAILURES) == {("tcp_flow_bytes",): 3, ("tcp_bytes_by_cgroup",): 0}
    assert values(snap, m.MAP_ENTRIES) == {("tcp_flow_bytes",): 17, ("tcp_socks_open",): 2}
    assert values(snap, m.UNRESOLVED) == {(): 5}
    assert values(snap, m.PODS_KNOWN) == {(): 12}
    assert values(snap, m.PROG_RUN_TIME) == {("tcp_probe",): pytest.approx(2.5)}
    assert values(snap, m.PROG_RUN_COUNT) == {("tcp_probe",): 1000}
    assert snap.taken_at == NOW


def test_self_metrics_present_on_an_empty_poll() -> None:
    snap = build(RawData(), {})
    for spec in (m.BUILD_INFO, m.POLL_DURATION, m.POLLS, m.LAST_POLL, m.UNRESOLVED, m.PODS_KNOWN):
        assert spec.name in snap.samples, spec.name
    for spec in m.POD_FAMILIES:
        assert spec.name not in snap.samples
        assert spec.name not in snap.histograms


def test_every_sample_matches_its_family() -> None:
    raw = RawData()
    raw.cgroups[1] = CgroupCounters(
        sent=1,
        received=1,
        opened=[1, 1],
        closed=[1, 1],
        active=[1, 1],
        failed=[1, 1, 1, 1],
        retransmits=1,
        resets_sent=1,
        resets_received=1,
    )
    raw.flows[(1, EXTERNAL)] = (1, 1)
    raw.rtt[1] = {120: (1, 1)}
    raw.connect[1] = {120: (1, 1)}
    raw.requests[1] = {(1, 2, 1, 2, 0): {120: (1, 1)}}
    state = ExporterState(
        errors={"poll": 1},
        programs={"x": True},
        bpf_stats={"x": (1, 1)},
        otlp=(1, 1, 1.0),
        retired_dropped=1,
        metadata=(MetadataSourceState("kubernetes", True, 1.0, 1, 0),),
        http={("metrics", "200"): 3, ("metrics", "401"): 1},
        tls=(2, 1, 0),
    )
    raw.map_failures = {"m": 1}
    raw.map_entries = {"m": 1}
    pod = PodMeta(UID_A, "shop", WEB_NGINX.pod, "node-1", "web", "Deployment", ("10.1.0.5",), False, ())
    snap = build_snapshot(raw, {1: WEB_NGINX}, state, NOW, pods=[pod])
    specs = {s.name: s for s in m.ALL_FAMILIES}
    assert set(snap.samples) | set(snap.histograms) == set(specs), "every family filled"
    for name, samples in snap.samples.items():
        assert specs[name].kind is not m.Kind.HISTOGRAM
        for s in samples:
            assert len(s.labels) == len(specs[name].labels), name
        assert len({s.labels for s in samples}) == len(samples)
    for name, hs in snap.histograms.items():
        assert specs[name].kind is m.Kind.HISTOGRAM
        for h in hs:
            assert len(h.labels) == len(specs[name].labels), name


def test_pod_uids_mapping() -> None:
    raw = RawData()
    raw.cgroups[1] = CgroupCounters(sent=1)
    ids = {1: WEB_NGINX, 2: WEB_ENVOY, 3: DB, 4: UNKNOWN_POD, 5: HOST_NGINX}
    snap = build(raw, ids)
    assert dict(snap.pod_uids) == {
        ("shop", "web-7c9f8d6b5-x2x4q"): UID_A,
        ("data", "db-0"): UID_B,
        ("", UID_C): UID_C,
    }


def test_snapshot_is_immutable() -> None:
    raw = RawData()
    raw.cgroups[1] = CgroupCounters(sent=1)
    snap = build(raw, {1: DB})
    with pytest.raises(TypeError):
        snap.samples["x"] = ()  # type: ignore[index]
    assert isinstance(snap.samples[m.TCP_SENT.name], tuple)


@pytest.mark.parametrize(
    ("codes", "labels"),
    [
        ((1, 1, 0, 0, 0), ("server", "other", "", "", "")),
        ((2, 2, 1, 2, 0), ("client", "http", "GET", "2xx", "")),
        ((1, 2, 0, 4, 0), ("server", "http", "other", "4xx", "")),
        ((1, 3, 10, 5, 0), ("server", "http2", "other", "5xx", "")),
        ((1, 3, 2, 2, 3), ("server", "http2", "POST", "2xx", "")),  # only gRPC has a gRPC status
        ((2, 4, 2, 2, 1), ("client", "grpc", "POST", "2xx", "0")),
        ((2, 4, 2, 2, 17), ("client", "grpc", "POST", "2xx", "16")),
        ((2, 4, 2, 0, 0), ("client", "grpc", "POST", "", "")),
        ((2, 4, 2, 2, 18), ("client", "grpc", "POST", "2xx", "")),  # out of range: no label
        ((9, 9, 99, 9, 99), ("", "", "", "", "")),
    ],
)
def test_request_labels(codes: tuple[int, int, int, int, int], labels: tuple[str, ...]) -> None:
    assert request_labels(*codes) == labels
