"""Tests for exporter.metrics.model: histogram slot arithmetic, Prometheus bucket layouts, metric specs."""

from __future__ import annotations

import itertools
import math
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.metrics import model as m
from exporter.metrics.histogram import HIST_INDEX_OFFSET, HIST_SCALE, HIST_SLOTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hist_bounds import slot_upper_bound  # lives in tests/, shared with the kernel tests

SCALES = (0, 1, 2)
ALL_SLOTS = range(HIST_SLOTS)


def slot_bounds_exp(slot: int) -> tuple[Fraction, Fraction]:
    """Exact base-2 exponents of a kernel slot's (lower, upper] interval, in seconds."""
    n = 2**HIST_SCALE
    return Fraction(slot - HIST_INDEX_OFFSET, n), Fraction(slot - HIST_INDEX_OFFSET + 1, n)


def bucket_bounds_exp(index: int, scale: int) -> tuple[Fraction, Fraction]:
    """Exact base-2 exponents of an exponential bucket's (lower, upper] interval at `scale`."""
    return Fraction(index, 2**scale), Fraction(index + 1, 2**scale)


# ---- slot_upper_bound -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("slot", "upper"),
    [
        (HIST_INDEX_OFFSET - 1, 1.0),  # (2^-1/4, 1] s
        (HIST_INDEX_OFFSET, 2.0**0.25),  # (1, 2^1/4] s
        (HIST_INDEX_OFFSET + 3, 2.0),  # (2^3/4, 2] s
        (HIST_INDEX_OFFSET - 5, 0.5),  # (2^-5/4, 2^-1] s
        (HIST_INDEX_OFFSET + 19, 32.0),  # highest default finite bound
        (HIST_INDEX_OFFSET - 69, 2.0**-17),  # lowest default finite bound
        (0, 2.0 ** (-119 / 4)),  # first kernel slot
        (HIST_SLOTS - 1, 2.0 ** ((HIST_SLOTS - HIST_INDEX_OFFSET) / 4)),  # last kernel slot
    ],
)
def test_slot_upper_bound_table(slot: int, upper: float) -> None:
    assert slot_upper_bound(slot) == pytest.approx(upper, rel=1e-12)


def test_slot_upper_bound_powers_of_two_are_exact() -> None:
    for k in range(-30, 12):
        assert slot_upper_bound(HIST_INDEX_OFFSET - 1 + 4 * k) == 2.0**k


def test_kernel_slots_cover_one_ns_to_about_17_minutes() -> None:
    # README: bounds are powers of 2^(1/4) seconds, from 1 ns to ~17 min (2^-30 s to 2^10 s;
    # the kernel puts everything longer into the last slot, bpf/podnet.h).
    first_lower = slot_upper_bound(0) / 2.0**0.25
    assert first_lower == 2.0**-30
    assert first_lower == pytest.approx(1e-9, rel=0.1)
    last_regular = 4 * 40 - 1  # PODNET_HIST_MAX_OCTAVE * 4 - 1
    assert slot_upper_bound(last_regular) == 2.0**10
    assert 16 * 60 <= slot_upper_bound(last_regular) <= 18 * 60


@settings(deadline=None)
@given(st.integers(min_value=-2000, max_value=2000))
def test_slot_upper_bound_is_strictly_increasing_by_a_quarter_octave(slot: int) -> None:
    lo, hi = slot_upper_bound(slot), slot_upper_bound(slot + 1)
    assert hi > lo or lo == hi == 0.0 or math.isinf(lo)
    if 1e-300 < lo < 1e300 and hi < 1e300:
        assert hi / lo == pytest.approx(2.0**0.25, rel=1e-12)


# ---- downscale_index -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slot", "scale", "index"),
    [
        (HIST_INDEX_OFFSET, 2, 0),
        (HIST_INDEX_OFFSET, 1, 0),
        (HIST_INDEX_OFFSET, 0, 0),
        (HIST_INDEX_OFFSET + 3, 0, 0),
        (HIST_INDEX_OFFSET + 4, 0, 1),
        (HIST_INDEX_OFFSET + 1, 1, 0),
        (HIST_INDEX_OFFSET + 2, 1, 1),
        (HIST_INDEX_OFFSET - 1, 0, -1),  # floor, not truncation towards zero
        (HIST_INDEX_OFFSET - 4, 0, -1),
        (HIST_INDEX_OFFSET - 5, 0, -2),
        (HIST_INDEX_OFFSET - 1, 1, -1),
        (HIST_INDEX_OFFSET - 3, 1, -2),
        (0, 2, -HIST_INDEX_OFFSET),
        (0, 0, -HIST_INDEX_OFFSET // 4),
    ],
)
def test_downscale_index_table(slot: int, scale: int, index: int) -> None:
    assert m.downscale_index(slot, scale) == index


def test_downscale_index_at_kernel_scale_is_the_identity_shift() -> None:
    for slot in ALL_SLOTS:
        assert m.downscale_index(slot, HIST_SCALE) == slot - HIST_INDEX_OFFSET


def _assert_slot_within_bucket(slot: int, scale: int) -> None:
    k = m.downscale_index(slot, scale)
    s_lo, s_hi = slot_bounds_exp(slot)
    b_lo, b_hi = bucket_bounds_exp(k, scale)
    assert b_lo <= s_lo < s_hi <= b_hi, (slot, scale, k)
    if max(abs(b_lo), abs(b_hi)) > 1000:
        return  # beyond float range; the exact comparison above holds regardless
    # The same in seconds, as floats (every exponent here is a dyadic rational: exact).
    assert 2.0 ** float(b_lo) <= 2.0 ** float(s_lo) < 2.0 ** float(s_hi) <= 2.0 ** float(b_hi)
    assert slot_upper_bound(slot) <= 2.0 ** float(b_hi)


@pytest.mark.parametrize("scale", SCALES)
def test_every_kernel_slot_lies_within_its_downscaled_bucket(scale: int) -> None:
    for slot in ALL_SLOTS:
        _assert_slot_within_bucket(slot, scale)


@settings(deadline=None)
@given(st.integers(min_value=-10_000, max_value=10_000), st.sampled_from(SCALES))
def test_downscale_interval_containment_property(slot: int, scale: int) -> None:
    _assert_slot_within_bucket(slot, scale)


@settings(deadline=None)
@given(st.integers(min_value=-10_000, max_value=10_000), st.sampled_from(SCALES))
def test_downscale_merges_exactly_2_to_the_2_minus_scale_neighbours(slot: int, scale: int) -> None:
    width = 2 ** (HIST_SCALE - scale)
    k = m.downscale_index(slot, scale)
    members = [s for s in range(slot - width, slot + width + 1) if m.downscale_index(s, scale) == k]
    assert len(members) == width
    assert members == list(range(members[0], members[0] + width))
    # Buckets are aligned: the first member is at an exact multiple of the merge width.
    assert (members[0] - HIST_INDEX_OFFSET) % width == 0


@settings(deadline=None)
@given(st.integers(min_value=-10_000, max_value=10_000), st.sampled_from(SCALES))
def test_downscale_is_monotonic(slot: int, scale: int) -> None:
    assert m.downscale_index(slot, scale) <= m.downscale_index(slot + 1, scale)


# ---- BucketLayout ----------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "count"), [(0, 23), (1, 45), (2, 89)])
def test_bucket_layout_bounds(scale: int, count: int) -> None:
    layout = m.BucketLayout(scale)
    assert len(layout.bounds) == count
    assert layout.bounds[0] == 2.0**-17
    assert layout.bounds[-1] == 32.0
    assert list(layout.bounds) == sorted(set(layout.bounds))
    for i, b in enumerate(layout.bounds):
        assert b == 2.0 ** ((-17 * 2**scale + i) / 2**scale)


def test_default_layout_is_powers_of_two_from_2_to_the_minus_17_to_32_seconds() -> None:
    layout = m.BucketLayout()
    assert layout.scale == 0
    assert layout.bounds == tuple(2.0**k for k in range(-17, 6))


def test_bucket_layout_is_frozen() -> None:
    layout = m.BucketLayout(1)
    with pytest.raises(AttributeError):
        layout.scale = 2  # type: ignore[misc]


def test_cumulative_of_nothing_is_all_zero() -> None:
    layout = m.BucketLayout(0)
    out = layout.cumulative(())
    assert [b for b, _ in out] == [*layout.bounds, math.inf]
    assert all(c == 0 for _, c in out)


def _expected_position(layout: m.BucketLayout, slot: int) -> int | None:
    """Index of the first bound >= the slot's upper bound (the lowest bound for anything
    below it); None when above the highest bound (only +Inf)."""
    upper = slot_upper_bound(slot)
    for i, b in enumerate(layout.bounds):
        if b >= upper:
            return i
    return None


@pytest.mark.parametrize(
    ("scale", "slot", "le"),
    [
        (0, HIST_INDEX_OFFSET, 2.0),  # (1, 1.19] s -> le 2
        (0, HIST_INDEX_OFFSET - 1, 1.0),  # (0.84, 1] s -> le 1
        (0, HIST_INDEX_OFFSET + 3, 2.0),  # (1.68, 2] s -> le 2
        (0, HIST_INDEX_OFFSET + 4, 4.0),
        (1, HIST_INDEX_OFFSET, 2.0**0.5),
        (1, HIST_INDEX_OFFSET + 1, 2.0**0.5),
        (1, HIST_INDEX_OFFSET + 2, 2.0),
        (2, HIST_INDEX_OFFSET, 2.0**0.25),
        (0, HIST_INDEX_OFFSET + 19, 32.0),  # (2^4.75, 32] s: the highest finite bound
        (0, HIST_INDEX_OFFSET - 69, 2.0**-17),  # (.., 2^-17] s: the lowest bound
        (0, 0, 2.0**-17),  # 1 ns: below the lowest bound -> first bucket
        (2, 0, 2.0**-17),
        (0, HIST_INDEX_OFFSET + 20, math.inf),  # (32, 38] s: above the highest -> +Inf only
        (2, HIST_SLOTS - 1, math.inf),
    ],
)
def test_cumulative_single_slot_table(scale: int, slot: int, le: float) -> None:
    out = m.BucketLayout(scale).cumulative(((slot, 7),))
    for bound, cum in out:
        assert cum == (7 if bound >= le else 0), (bound, cum)


slot_lists = st.lists(
    st.tuples(st.integers(min_value=0, max_value=HIST_SLOTS - 1), st.integers(min_value=0, max_value=10**12)),
    max_size=40,
)


@settings(deadline=None)
@given(st.sampled_from(SCALES), slot_lists)
def test_cumulative_properties(scale: int, slots: list[tuple[int, int]]) -> None:
    layout = m.BucketLayout(scale)
    out = layout.cumulative(tuple(slots))
    bounds = [b for b, _ in out]
    counts = [c for _, c in out]
    assert bounds == [*layout.bounds, math.inf]
    assert all(a <= b for a, b in itertools.pairwise(counts)), "not non-decreasing"
    assert counts[-1] == sum(c for _, c in slots)
    assert counts[0] >= 0
    # Each cumulative count is exactly what lands at or below that bound.
    for i, (bound, cum) in enumerate(out[:-1]):
        expected = 0
        for slot, c in slots:
            pos = _expected_position(layout, slot)
            if pos is not None and pos <= i:
                expected += c
        assert cum == expected, (bound, i)


@settings(deadline=None)
@given(st.sampled_from(SCALES), st.integers(min_value=0, max_value=HIST_SLOTS - 1))
def test_slot_lands_in_first_bound_at_or_above_its_upper_bound(scale: int, slot: int) -> None:
    layout = m.BucketLayout(scale)
    out = layout.cumulative(((slot, 1),))
    pos = _expected_position(layout, slot)
    finite = [c for _, c in out[:-1]]
    if pos is None:
        assert slot_upper_bound(slot) > layout.bounds[-1]
        assert finite == [0] * len(finite)
    else:
        assert finite == [0] * pos + [1] * (len(finite) - pos)
        if slot_upper_bound(slot) > layout.bounds[0]:
            # Exact: the bound is the slot's merged bucket's upper bound, not estimated.
            k = m.downscale_index(slot, scale)
            assert layout.bounds[pos] == 2.0 ** ((k + 1) / 2**scale)
    assert out[-1] == (math.inf, 1)


@settings(deadline=None)
@given(slot_lists)
def test_scales_agree_on_shared_bounds(slots: list[tuple[int, int]]) -> None:
    per_scale = [dict(m.BucketLayout(s).cumulative(tuple(slots))) for s in SCALES]
    shared = set(m.BucketLayout(0).bounds)
    assert shared == set(m.BucketLayout(0).bounds) & set(m.BucketLayout(1).bounds)
    assert shared <= set(m.BucketLayout(2).bounds)
    for bound in [*shared, math.inf]:
        assert per_scale[0][bound] == per_scale[1][bound] == per_scale[2][bound], bound


def test_cumulative_custom_range() -> None:
    layout = m.BucketLayout(scale=0, lo_exp=0, hi_exp=2)
    assert layout.bounds == (1.0, 2.0, 4.0)
    slots = (
        (HIST_INDEX_OFFSET - 8, 1),  # (2^-2, 2^-1.75]: below -> first
        (HIST_INDEX_OFFSET + 2, 10),  # (2^0.5, 2^0.75] -> le 2
        (HIST_INDEX_OFFSET + 7, 100),  # (2^1.75, 4] -> le 4
        (HIST_INDEX_OFFSET + 8, 1000),  # (4, 2^2.25] -> +Inf
    )
    assert layout.cumulative(slots) == [(1.0, 1), (2.0, 11), (4.0, 111), (math.inf, 1111)]


# ---- metric specs ----------------------------------------------------------------------

NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
BASE_UNITS = {"bytes", "seconds"}


@pytest.mark.parametrize(
    ("spec", "exposed"),
    [
        (m.TCP_SENT, "podnet_tcp_sent_bytes_total"),
        (m.FLOW_BYTES, "podnet_flow_bytes_total"),
        (m.TCP_OPENED, "podnet_tcp_connections_opened_total"),
        (m.TCP_ACTIVE, "podnet_tcp_active_connections"),
        (m.TCP_RTT, "podnet_tcp_rtt_seconds"),
        (m.POLLS, "podnet_exporter_polls_total"),
        (m.BUILD_INFO, "podnet_exporter_build_info"),
        (m.MetricSpec("x_things", m.Kind.COUNTER, "h", ()), "x_things_total"),
        (m.MetricSpec("x_things", m.Kind.GAUGE, "h", ()), "x_things"),
        (m.MetricSpec("x_seconds", m.Kind.HISTOGRAM, "h", (), "seconds"), "x_seconds"),
    ],
)
def test_exposed_name(spec: m.MetricSpec, exposed: str) -> None:
    assert spec.exposed_name == exposed


def test_readme_metric_names_are_the_exposed_names() -> None:
    exposed = {s.exposed_name for s in m.ALL_FAMILIES}
    for name in (
        "podnet_tcp_sent_bytes_total",
        "podnet_tcp_received_bytes_total",
        "podnet_flow_bytes_total",
        "podnet_tcp_connections_opened_total",
        "podnet_tcp_connections_closed_total",
        "podnet_tcp_connections_failed_total",
        "podnet_tcp_active_connections",
        "podnet_tcp_retransmits_total",
        "podnet_tcp_resets_total",
        "podnet_tcp_rtt_seconds",
        "podnet_tcp_connect_duration_seconds",
        "podnet_exporter_build_info",
        "podnet_exporter_poll_duration_seconds",
        "podnet_exporter_polls_total",
        "podnet_exporter_last_poll_timestamp_seconds",
        "podnet_exporter_errors_total",
        "podnet_exporter_program_attached",
        "podnet_exporter_map_update_failures_total",
        "podnet_exporter_map_entries",
        "podnet_exporter_unresolved_cgroups",
        "podnet_exporter_pods",
        "podnet_exporter_bpf_run_seconds_total",
        "podnet_exporter_bpf_runs_total",
    ):
        assert name in exposed


def test_family_names_are_unique() -> None:
    names = [s.name for s in m.ALL_FAMILIES]
    assert len(names) == len(set(names))
    assert m.ALL_FAMILIES == m.POD_FAMILIES + m.INFO_FAMILIES + m.SELF_FAMILIES


@pytest.mark.parametrize("spec", m.ALL_FAMILIES, ids=lambda s: s.name)
def test_family_follows_prometheus_conventions(spec: m.MetricSpec) -> None:
    assert NAME_RE.fullmatch(spec.name), "not snake_case"
    assert spec.name.startswith("podnet_")
    assert spec.help and "\n" not in spec.help
    assert not spec.name.endswith("_total"), "_total is added on exposition only"
    if spec.kind is not m.Kind.COUNTER:
        assert not spec.exposed_name.endswith("_total")
    if spec.unit:
        assert spec.unit in BASE_UNITS
        assert spec.name.split("_")[-1] == spec.unit, "unit must be the name's last word"
    else:
        assert spec.name.split("_")[-1] not in BASE_UNITS, "a unit-suffixed name must declare its unit"
    for suffix in ("_bucket", "_count", "_sum", "_created"):
        assert not spec.name.endswith(suffix)


@pytest.mark.parametrize("spec", m.ALL_FAMILIES, ids=lambda s: s.name)
def test_family_label_names_are_valid(spec: m.MetricSpec) -> None:
    assert len(spec.labels) == len(set(spec.labels))
    for label in spec.labels:
        assert LABEL_RE.fullmatch(label), label
        assert not label.startswith("__"), label
    if spec.kind is m.Kind.HISTOGRAM:
        assert "le" not in spec.labels


@pytest.mark.parametrize("spec", m.POD_FAMILIES, ids=lambda s: s.name)
def test_pod_families_carry_pod_labels_first(spec: m.MetricSpec) -> None:
    assert spec.labels[: len(m.POD_LABELS)] == m.POD_LABELS
    assert spec.otel_name.startswith("podnet.")
    assert spec.otel_unit


def test_flow_labels() -> None:
    assert m.FLOW_BYTES.labels == (*m.POD_LABELS, "direction", *m.PEER_LABELS)


def test_snapshot_build_is_read_only() -> None:
    snap = m.Snapshot.build(1.0, {"a": ()}, {}, {("ns", "p"): "uid"})
    with pytest.raises(TypeError):
        snap.samples["b"] = ()  # type: ignore[index]
    with pytest.raises(TypeError):
        snap.pod_uids[("x", "y")] = "z"  # type: ignore[index]
    assert m.EMPTY_SNAPSHOT.samples == {} and m.EMPTY_SNAPSHOT.histograms == {}
    assert dict(m.EMPTY_SNAPSHOT.pod_uids) == {}


def test_snapshot_counters_since() -> None:
    assert m.EMPTY_SNAPSHOT.counters_since == 0.0  # unknown
    assert m.Snapshot.build(2.0, {}, {}).counters_since == 0.0
    snap = m.Snapshot.build(2.0, {}, {}, counters_since=1.5)
    assert (snap.taken_at, snap.counters_since) == (2.0, 1.5)
