"""The per-family series cap (--max-series) in build_snapshot, and podnet_pod_info."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.metrics import model as m
from exporter.metrics.raw import CgroupCounters, RawData
from exporter.metrics.snapshot import CAPPED_FAMILIES, ExporterState, build_snapshot, cap_series
from exporter.pods.identity import Identity
from exporter.pods.pods import PodMeta

Labels = tuple[str, ...]

NOW = 1_700_000_000.0
DROPPED = m.SERIES_DROPPED.name


def ident(i: int) -> Identity:
    return Identity("ns", f"pod-{i:04d}", "app", f"wl-{i % 7}", "Deployment", f"uid-{i:04d}")


def no_peer(peer: bytes, owner: Identity) -> tuple[str, str, str]:
    return "", "", "external"


def raw_for(pods: list[int]) -> tuple[RawData, dict[int, Identity]]:
    """Each pod i (cgroup id i + 1) has bytes, connections, a flow and an RTT histogram."""
    raw = RawData()
    ids: dict[int, Identity] = {}
    for i in pods:
        cg = i + 1
        ids[cg] = ident(i)
        raw.cgroups[cg] = CgroupCounters(sent=i + 1, received=1, opened=[1, 0], closed=[1, 0])
        raw.flows[(cg, ("", "", "external"))] = (i + 1, 1)
        raw.rtt[cg] = {130: (1, 1000)}
    return raw, ids


def build(
    pods: list[int],
    cap: int | None,
    previous: m.Snapshot | None = None,
    state: ExporterState | None = None,
) -> m.Snapshot:
    raw, ids = raw_for(pods)
    return build_snapshot(raw, ids, state or ExporterState(), NOW, max_series=cap, previous=previous)


def series(snap: m.Snapshot, spec: m.MetricSpec) -> set[tuple[str, ...]]:
    if spec.kind is m.Kind.HISTOGRAM:
        return {h.labels for h in snap.histograms.get(spec.name, ())}
    return {s.labels for s in snap.samples.get(spec.name, ())}


def dropped(snap: m.Snapshot) -> dict[str, float]:
    return {s.labels[0]: s.value for s in snap.samples.get(DROPPED, ())}


def pods_of(snap: m.Snapshot, spec: m.MetricSpec) -> set[str]:
    return {labels[1] for labels in series(snap, spec)}


# ---- cap_series: the choice --------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "cap", "exported", "kept", "n_dropped"),
    [
        # Under or at the cap: everything, nothing dropped.
        ("abc", 3, "", "abc", 0),
        ("abc", 5, "", "abc", 0),
        # Nothing exported before: the smallest label sets.
        ("dcba", 2, "", "ab", 2),
        # Exported before wins over smaller new ones.
        ("abcd", 2, "d", "ad", 2),
        ("abcd", 2, "cd", "cd", 2),
        # Exported series that vanished free their room for new ones.
        ("abcd", 2, "xy", "ab", 2),
        ("abcd", 3, "dz", "abd", 1),
        # More exported than the cap (the cap was lowered): the smallest of them.
        ("abcd", 2, "bcd", "bc", 2),
        ("abcd", 1, "abcd", "a", 3),
    ],
)
def test_cap_series_table(names: str, cap: int, exported: str, kept: str, n_dropped: int) -> None:
    series_in: dict[Labels, int] = {(n,): ord(n) for n in names}
    prev: set[Labels] = {(e,) for e in exported}
    out, n = cap_series(series_in, cap, prev)
    assert set(out) == {(k,) for k in kept}
    assert n == n_dropped
    assert all(out[k] == series_in[k] for k in out), "values travel with their labels"


@settings(max_examples=200, deadline=None)
@given(
    names=st.sets(st.text(alphabet="abcdefgh", min_size=1, max_size=3), max_size=40),
    exported=st.sets(st.text(alphabet="abcdefgh", min_size=1, max_size=3), max_size=40),
    cap=st.integers(min_value=1, max_value=20),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_cap_series_properties(names: set[str], exported: set[str], cap: int, seed: int) -> None:
    order = sorted(names)
    random.Random(seed).shuffle(order)
    series_in: dict[Labels, int] = {(n,): 0 for n in order}
    prev: set[Labels] = {(e,) for e in exported}
    out, n = cap_series(series_in, cap, prev)
    assert len(out) == min(cap, len(series_in))
    assert n == len(series_in) - len(out)
    assert set(out) <= set(series_in)
    still = set(series_in) & prev
    if len(still) <= cap:
        assert still <= set(out), "an exported series is never displaced by a new one"
    else:
        assert set(out) <= still
    # Deterministic: the same answer whatever the insertion order.
    again, _ = cap_series(dict(sorted(series_in.items())), cap, prev)
    assert set(again) == set(out)


# ---- build_snapshot with a cap --------------------------------------------------------------


@pytest.mark.parametrize(
    ("pods", "cap", "per_family", "flow_dropped"),
    [
        (10, None, 10, 0),
        (10, 10, 10, 10),  # pod families exactly at the cap; flows (2 per pod) over it
        (10, 20, 10, 0),  # flows exactly at the cap
        (10, 4, 4, 20 - 4),
        (25, 1, 1, 50 - 1),
    ],
)
def test_cap_per_family(pods: int, cap: int | None, per_family: int, flow_dropped: int) -> None:
    snap = build(list(range(pods)), cap)
    for spec in (m.TCP_SENT, m.TCP_RECEIVED, m.TCP_RTT):
        assert len(series(snap, spec)) == per_family, spec.name
    assert len(series(snap, m.FLOW_BYTES)) == min(2 * pods, cap or 2 * pods)
    d = dropped(snap)
    assert d[m.FLOW_BYTES.exposed_name] == flow_dropped
    assert d[m.TCP_SENT.exposed_name] == pods - per_family
    assert d[m.TCP_RTT.exposed_name] == pods - per_family
    # Every capped family has a drop counter, 0 when nothing was dropped.
    assert set(d) == {s.exposed_name for s in CAPPED_FAMILIES}


def test_drop_counter_is_a_running_total() -> None:
    snap = build(list(range(10)), 3)
    assert dropped(snap)[m.TCP_SENT.exposed_name] == 7
    snap = build(list(range(10)), 3, previous=snap)
    assert dropped(snap)[m.TCP_SENT.exposed_name] == 14
    snap = build(list(range(2)), 3, previous=snap)  # under the cap: the total stays
    assert dropped(snap)[m.TCP_SENT.exposed_name] == 14


def test_existing_series_never_flap_out_for_new_ones() -> None:
    # Pods 50..59 are exported; pods 0..9 (smaller labels) arrive later and must wait.
    snap = build(list(range(50, 60)), 10)
    assert pods_of(snap, m.TCP_SENT) == {f"pod-{i:04d}" for i in range(50, 60)}
    snap = build(list(range(60)), 10, previous=snap)
    assert pods_of(snap, m.TCP_SENT) == {f"pod-{i:04d}" for i in range(50, 60)}
    assert pods_of(snap, m.TCP_RTT) == {f"pod-{i:04d}" for i in range(50, 60)}
    # Two old pods go away: the two smallest waiting pods take their room.
    snap = build([*range(52, 60), *range(50)], 10, previous=snap)
    assert pods_of(snap, m.TCP_SENT) == {f"pod-{i:04d}" for i in [*range(52, 60), 0, 1]}


def test_self_metrics_are_not_capped() -> None:
    state = ExporterState(programs={f"prog{i}": True for i in range(5)}, errors={"a": 1, "b": 2})
    snap = build(list(range(3)), 1, state=state)
    assert len(snap.samples[m.PROGRAM_ATTACHED.name]) == 5
    assert len(snap.samples[m.ERRORS.name]) == 2
    assert len(snap.samples[DROPPED]) == len(CAPPED_FAMILIES)


@settings(max_examples=60, deadline=None)
@given(
    polls=st.lists(st.sets(st.integers(min_value=0, max_value=40), max_size=30), min_size=1, max_size=6),
    cap=st.integers(min_value=1, max_value=25),
)
def test_cap_over_successive_polls(polls: list[set[int]], cap: int) -> None:
    previous: m.Snapshot | None = None
    totals = dict.fromkeys((s.exposed_name for s in CAPPED_FAMILIES), 0)
    for pods in polls:
        order = list(pods)
        random.Random(len(order)).shuffle(order)
        full = build(order, None)
        snap = build(order, cap, previous=previous)
        for spec in CAPPED_FAMILIES:
            want = series(full, spec)
            got = series(snap, spec)
            assert len(got) <= cap, spec.name
            assert got <= want
            assert len(got) == min(cap, len(want))
            totals[spec.exposed_name] += len(want) - len(got)
            if previous is not None:
                # Exported last poll and still there: still exported.
                assert series(previous, spec) & want <= got, spec.name
            # Values are untouched by the cap.
            if spec.kind is not m.Kind.HISTOGRAM:
                full_values = {s.labels: s.value for s in full.samples.get(spec.name, ())}
                assert all(s.value == full_values[s.labels] for s in snap.samples.get(spec.name, ()))
        assert dropped(snap) == totals
        previous = snap


# ---- podnet_pod_info --------------------------------------------------------------------------


def meta(name: str, uid: str, ips: tuple[str, ...] = ("10.0.0.9",), host: bool = False) -> PodMeta:
    return PodMeta(uid, "shop", name, "node-a", "web", "Deployment", ips, host, ())


def test_pod_info_one_row_per_pod() -> None:
    pods = [
        meta("web-1", "u1"),
        meta("web-2", "u2", ("10.0.0.10", "fd00::10")),  # dual stack: the primary IP
        meta("agent", "u3", (), host=True),  # hostNetwork: no pod IP of its own
    ]
    snap = build_snapshot(RawData(), {}, ExporterState(), NOW, pods=pods)
    rows = {s.labels: s.value for s in snap.samples[m.POD_INFO.name]}
    assert rows == {
        ("shop", "web-1", "web", "Deployment", "node-a", "10.0.0.9"): 1,
        ("shop", "web-2", "web", "Deployment", "node-a", "10.0.0.10"): 1,
        ("shop", "agent", "web", "Deployment", "node-a", ""): 1,
    }
    assert all(len(labels) == len(m.POD_INFO.labels) for labels in rows)


def test_pod_info_is_never_more_than_one() -> None:
    # A StatefulSet pod being replaced: two UIDs, one name, for a moment.
    pods = [meta("db-0", "old"), meta("db-0", "new")]
    snap = build_snapshot(RawData(), {}, ExporterState(), NOW, pods=pods)
    assert [s.value for s in snap.samples[m.POD_INFO.name]] == [1]


def test_pod_info_is_capped() -> None:
    pods = [meta(f"web-{i}", f"u{i}", (f"10.0.1.{i}",)) for i in range(30)]
    snap = build_snapshot(RawData(), {}, ExporterState(), NOW, pods=pods, max_series=12)
    assert len(snap.samples[m.POD_INFO.name]) == 12
    assert dropped(snap)[m.POD_INFO.exposed_name] == 18


def test_no_pods_no_pod_info() -> None:
    snap = build_snapshot(RawData(), {}, ExporterState(), NOW)
    assert m.POD_INFO.name not in snap.samples
