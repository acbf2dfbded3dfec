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
    return m.Snapshot.build(1.0, samples, hists)


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
    snap = m.Snapshot.build(1.0, samples, hists)
    layout = m.BucketLayout(0)
    text, om = render_fast(snap, layout)
    assert (text, om) == render_with_client(snap, layout)
    assert om.endswith(b"# EOF\n")


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
