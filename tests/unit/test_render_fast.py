"""exporter.export.prometheus.render_fast writes exactly what prometheus_client writes, much faster."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.export.prometheus import Exposition, render_fast
from exporter.metrics import model as m
from exporter.metrics.histogram import HIST_SLOTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference_render import render_with_client  # lives in tests/: the exporter never needs it

# Label values as the exporter may see them: pod and container names, but also whatever a
# pods file or a cgroup name holds (quotes, backslashes, newlines, non-ASCII).
label_values = st.one_of(
    st.sampled_from(["", "web", "web-7c9f8d6b5-x2x4q", "nginx.service", "sent", "10.0.0.1"]),
    st.text(alphabet=st.sampled_from('ab\\"\n{}=,é日 '), max_size=6),
)
values = st.one_of(
    st.integers(min_value=0, max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, 1e6, 12345678.0, 1e21, 0.1, 1 / 3]),
)


@st.composite
def snapshots(draw: st.DrawFn) -> m.Snapshot:
    samples: dict[str, tuple[m.Sample, ...]] = {}
    hists: dict[str, tuple[m.HistSample, ...]] = {}
    for spec in draw(st.lists(st.sampled_from(m.ALL_FAMILIES), max_size=8, unique=True)):
        labels = st.tuples(*[label_values] * len(spec.labels))
        if spec.kind is m.Kind.HISTOGRAM:
            out = []
            for ls in draw(st.lists(labels, max_size=3, unique=True)):
                slots = draw(
                    st.dictionaries(st.integers(0, HIST_SLOTS - 1), st.integers(1, 2**40), max_size=6)
                )
                ordered = tuple(sorted(slots.items()))
                total = sum(slots.values())
                out.append(m.HistSample(ls, ordered, total, draw(st.floats(0, 1e9))))
            hists[spec.name] = tuple(out)
        else:
            samples[spec.name] = tuple(
                m.Sample(ls, float(draw(values))) for ls in draw(st.lists(labels, max_size=4, unique=True))
            )
    since = draw(
        st.one_of(st.just(0.0), st.sampled_from([1.0, 1_700_000_000.0, 1_700_000_000.25]), st.floats(0, 4e9))
    )
    return m.Snapshot.build(2e9, samples, hists, counters_since=since)


@pytest.mark.parametrize("scale", [0, 1, 2])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snap=snapshots())
def test_fast_writer_matches_prometheus_client(scale: int, snap: m.Snapshot) -> None:
    layout = m.BucketLayout(scale)
    assert render_fast(snap, layout) == render_with_client(snap, layout)


def test_every_family_with_data_matches() -> None:
    labels = {spec.name: tuple(f'v"{i}\\' for i in range(len(spec.labels))) for spec in m.ALL_FAMILIES}
    samples = {
        s.name: (m.Sample(labels[s.name], 3.0), m.Sample(("x",) * len(s.labels), math.inf))
        for s in m.ALL_FAMILIES
        if s.kind is not m.Kind.HISTOGRAM
    }
    hists = {
        s.name: (m.HistSample(labels[s.name], ((0, 1), (80, 3), (163, 2)), 6, 0.5),)
        for s in m.ALL_FAMILIES
        if s.kind is m.Kind.HISTOGRAM
    }
    layout = m.BucketLayout(0)
    for since in (0.0, 1_700_000_000.5):
        snap = m.Snapshot.build(1.8e9, samples, hists, counters_since=since)
        text, om = render_fast(snap, layout)
        assert (text, om) == render_with_client(snap, layout)
        assert om.endswith(b"# EOF\n")
        assert (b"_created" in om) is (since > 0)
        assert b"_created" not in text


def test_equal_values_written_differently() -> None:
    # 0.0 and -0.0 are equal (and hash alike) but prometheus_client writes them apart.
    spec = m.TCP_ACTIVE
    samples = [m.Sample(("a", str(i), "", "", "", "x"), v) for i, v in enumerate([0.0, -0.0, 0.0, 1.0, 1])]
    snap = m.Snapshot.build(1.0, {spec.name: tuple(samples)}, {})
    layout = m.BucketLayout(0)
    assert render_fast(snap, layout) == render_with_client(snap, layout)


def test_render_uses_the_fast_writer() -> None:
    snap = m.Snapshot.build(1.0, {m.POLLS.name: (m.Sample((), 7.0),)}, {})
    r = Exposition(m.BucketLayout(0)).render(snap)
    text, om = render_fast(snap, m.BucketLayout(0))
    # Followed by the process self-metrics, which render_fast does not write.
    assert r.text.startswith(text)
    assert r.text[len(text) :].startswith(b"# HELP process_")
    assert r.openmetrics.startswith(om.removesuffix(b"# EOF\n"))
    assert r.openmetrics[len(om) - len(b"# EOF\n") :].startswith(b"# HELP process_")
    assert b"podnet_exporter_polls_total 7.0\n" in r.text


def test_created_lines_in_openmetrics_only() -> None:
    pod = ("ns", "web-1", "app", "web", "Deployment")
    samples = {
        m.TCP_SENT.name: (m.Sample(pod, 42.0),),
        m.TCP_ACTIVE.name: (m.Sample((*pod, "out"), 3.0),),
        m.POLLS.name: (m.Sample((), 7.0),),
    }
    hists = {m.TCP_CONNECT.name: (m.HistSample(pod, ((HIST_SLOTS - 1, 1),), 1, 40.0),)}
    layout = m.BucketLayout(0)
    since = m.Snapshot.build(1_700_000_100.0, samples, hists, counters_since=1_700_000_000.5)
    unknown = m.Snapshot.build(1_700_000_100.0, samples, hists)
    text, om = render_fast(since, layout)
    assert (text, om) == render_with_client(since, layout)
    # The text format is as it was; OpenMetrics only adds the _created lines.
    assert text == render_fast(unknown, layout)[0]
    labels = '{container="app",namespace="ns",pod="web-1",workload="web",workload_kind="Deployment"}'
    added = [
        line for line in om.decode().splitlines() if line not in render_fast(unknown, layout)[1].decode()
    ]
    assert added == [
        f"podnet_tcp_sent_bytes_created{labels} 1.7000000005e+09",
        f"podnet_tcp_connect_duration_seconds_created{labels} 1.7000000005e+09",
    ]
    lines = om.decode().splitlines()
    # Each right after its series: the counter's value, the histogram's _sum.
    assert lines[lines.index(added[0]) - 1] == f"podnet_tcp_sent_bytes_total{labels} 42.0"
    assert lines[lines.index(added[1]) - 1] == f"podnet_tcp_connect_duration_seconds_sum{labels} 40.0"
    # Gauges and the self-metrics (which count from the process start) get none.
    assert "podnet_exporter_polls_total 7.0" in lines
    assert not any(line.startswith(("podnet_exporter_polls_created", "podnet_tcp_active")) for line in added)
