"""Tests for exporter.export.prometheus: snapshot rendering in the text format and OpenMetrics."""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import time
from collections.abc import Iterable

import prometheus_client
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.export.prometheus import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    Exposition,
    Rendered,
)
from exporter.metrics import model as m

WEB = ("shop", "web-7c9f8d6b5-x2x4q", "nginx", "web", "Deployment")
DB = ("data", "db-0", "postgres", "db", "StatefulSet")
HOST = ("", "", "nginx.service", "", "")
UID = "5f1d3c1e-8a2b-4c3d-9e4f-0123456789ab"


def sample_snapshot() -> m.Snapshot:
    s = m.Sample
    samples = {
        m.TCP_SENT.name: (s(WEB, 1234.0), s(HOST, 10.0)),
        m.TCP_RECEIVED.name: (s(WEB, 4321.0),),
        m.FLOW_BYTES.name: (
            s((*WEB, "sent", "data", "db", "pod"), 1000.0),
            s((*WEB, "received", "", "", "external"), 7.0),
        ),
        m.TCP_OPENED.name: (s((*WEB, "outbound"), 3.0), s((*DB, "inbound"), 3.0)),
        m.TCP_CLOSED.name: (s((*WEB, "outbound"), 2.0),),
        m.TCP_FAILED.name: (s((*WEB, "refused"), 1.0), s((*WEB, "timeout"), 0.0)),
        m.TCP_ACTIVE.name: (s((*WEB, "outbound"), 1.0),),
        m.TCP_RETRANSMITS.name: (s(WEB, 5.0),),
        m.TCP_RESETS.name: (s((*WEB, "sent"), 0.0), s((*WEB, "received"), 1.0)),
        m.BUILD_INFO.name: (s(("0.1.0", "3.11.2", "0.26.0", "6.1.0", "tp_btf"), 1.0),),
        m.POLL_DURATION.name: (s((), 0.012),),
        m.POLLS.name: (s((), 42.0),),
        m.ERRORS.name: (s(("pods_file",), 1.0),),
        m.LAST_POLL.name: (s((), 1_700_000_000.5),),
        m.PROGRAM_ATTACHED.name: (s(("tcp_probe",), 0.0), s(("sock_send_length",), 1.0)),
        m.MAP_UPDATE_FAILURES.name: (s(("tcp_flow_bytes",), 2.0),),
        m.MAP_ENTRIES.name: (s(("tcp_flow_bytes",), 17.0),),
        m.UNRESOLVED.name: (s((), 0.0),),
        m.PROG_RUN_TIME.name: (s(("tcp_probe",), 0.5),),
        m.PROG_RUN_COUNT.name: (s(("tcp_probe",), 1000.0),),
        m.PODS_KNOWN.name: (s((), 3.0),),
    }
    hists = {
        m.TCP_RTT.name: (
            # 3 samples near 1 ms, 1 below the lowest bound, 1 above the highest.
            m.HistSample(WEB, ((0, 1), (80, 3), (150, 1)), 5, 40.004),
            m.HistSample(DB, ((100, 2),), 2, 0.06),
        ),
        m.TCP_CONNECT.name: (m.HistSample(WEB, ((120, 4),), 4, 4.4),),
    }
    return m.Snapshot.build(1_700_000_000.5, samples, hists, {("shop", "web-7c9f8d6b5-x2x4q"): UID})


def by_name(families: Iterable[Metric]) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for f in families:
        assert f.name not in out, f"family {f.name} twice"
        out[f.name] = f
    return out


def labels_of(spec: m.MetricSpec, values: tuple[str, ...]) -> dict[str, str]:
    return dict(zip(spec.labels, values, strict=True))


@pytest.fixture(scope="module")
def rendered() -> Rendered:
    return Exposition(m.BucketLayout(0)).render(sample_snapshot())


# ---- both formats parse ----------------------------------------------------------------


def test_text_parses_and_has_every_family(rendered: Rendered) -> None:
    fams = by_name(parse_text(rendered.text.decode("utf-8")))
    for spec in m.ALL_FAMILIES:
        assert spec.name in fams, spec.name
        assert fams[spec.name].type == spec.kind.value
        assert fams[spec.name].documentation == spec.help


def test_openmetrics_parses_and_has_every_family(rendered: Rendered) -> None:
    text = rendered.openmetrics.decode("utf-8")
    assert text.endswith("# EOF\n")
    fams = by_name(parse_openmetrics(text))
    for spec in m.ALL_FAMILIES:
        assert spec.name in fams, spec.name
        assert fams[spec.name].type == spec.kind.value
        assert fams[spec.name].unit == spec.unit


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_counters_are_exposed_with_total(rendered: Rendered, fmt: str) -> None:
    text = getattr(rendered, fmt).decode()
    parse = parse_text if fmt == "text" else parse_openmetrics
    fams = by_name(parse(text))
    for spec in m.ALL_FAMILIES:
        if spec.kind is not m.Kind.COUNTER:
            continue
        for sample in fams[spec.name].samples:
            assert sample.name == spec.exposed_name, sample.name
        assert f"# TYPE {spec.exposed_name if fmt == 'text' else spec.name} counter" in text
    sent = {(s.labels["pod"], s.labels["container"]): s.value for s in fams[m.TCP_SENT.name].samples}
    assert sent == {("web-7c9f8d6b5-x2x4q", "nginx"): 1234.0, ("", "nginx.service"): 10.0}


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_gauges_and_labels(rendered: Rendered, fmt: str) -> None:
    parse = parse_text if fmt == "text" else parse_openmetrics
    fams = by_name(parse(getattr(rendered, fmt).decode()))
    attached = {s.labels["program"]: s.value for s in fams[m.PROGRAM_ATTACHED.name].samples}
    assert attached == {"tcp_probe": 0.0, "sock_send_length": 1.0}
    (info,) = fams[m.BUILD_INFO.name].samples
    assert info.name == "podnet_exporter_build_info"
    assert info.labels == labels_of(m.BUILD_INFO, ("0.1.0", "3.11.2", "0.26.0", "6.1.0", "tp_btf"))
    assert info.value == 1.0
    flows = fams[m.FLOW_BYTES.name].samples
    assert {tuple(s.labels[k] for k in m.FLOW_BYTES.labels) for s in flows} == {
        (*WEB, "sent", "data", "db", "pod"),
        (*WEB, "received", "", "", "external"),
    }
    (last,) = fams[m.LAST_POLL.name].samples
    assert last.value == 1_700_000_000.5


@pytest.mark.parametrize("scale", [0, 1, 2])
@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_histograms_have_le_buckets_sum_and_count(scale: int, fmt: str) -> None:
    layout = m.BucketLayout(scale)
    snap = sample_snapshot()
    r = Exposition(layout).render(snap)
    parse = parse_text if fmt == "text" else parse_openmetrics
    fams = by_name(parse(getattr(r, fmt).decode()))
    for spec in (m.TCP_RTT, m.TCP_CONNECT):
        fam = fams[spec.name]
        for hs in snap.histograms[spec.name]:
            want = labels_of(spec, hs.labels)
            mine = [s for s in fam.samples if {k: s.labels.get(k) for k in want} == want]
            buckets = [s for s in mine if s.name == spec.name + "_bucket"]
            expected = layout.cumulative(hs.slots)
            assert [(float(s.labels["le"]), s.value) for s in buckets] == [(b, float(c)) for b, c in expected]
            assert buckets[-1].labels["le"] == "+Inf"
            (count,) = [s for s in mine if s.name == spec.name + "_count"]
            (total,) = [s for s in mine if s.name == spec.name + "_sum"]
            assert count.value == hs.count == buckets[-1].value
            assert total.value == pytest.approx(hs.sum)


def test_histogram_bucket_values_in_default_layout(rendered: Rendered) -> None:
    fams = by_name(parse_text(rendered.text.decode()))
    web = {
        s.labels["le"]: s.value
        for s in fams[m.TCP_RTT.name].samples
        if s.name.endswith("_bucket") and s.labels["pod"] == WEB[1]
    }
    assert math.isclose(2.0**-17, float(next(iter(web))))
    assert web[repr(2.0**-17)] == 1  # slot 0 (1 ns) is below the lowest bound
    # slot 80 is (2^-10, 2^-9.75] s: not at le 2^-10, at le 2^-9.
    assert web["0.0009765625"] == 1
    assert web["0.001953125"] == 4
    assert web["32.0"] == 4  # slot 150, (2^7.5, 2^7.75] s, is above 32 s: +Inf only
    assert web["+Inf"] == 5


def test_gzip_bodies_decompress_to_the_plain_ones(rendered: Rendered) -> None:
    assert rendered.text_gzip[:2] == b"\x1f\x8b"
    assert rendered.openmetrics_gzip[:2] == b"\x1f\x8b"
    assert gzip.decompress(rendered.text_gzip) == rendered.text
    assert gzip.decompress(rendered.openmetrics_gzip) == rendered.openmetrics


def test_rendered_keeps_its_snapshot() -> None:
    snap = sample_snapshot()
    r = Exposition(m.BucketLayout(0)).render(snap)
    assert r.snapshot is snap


def test_empty_snapshot_renders_headers_only() -> None:
    r = Exposition(m.BucketLayout(0)).render(m.EMPTY_SNAPSHOT)
    fams = by_name(parse_text(r.text.decode()))
    assert set(fams) == {s.name for s in m.ALL_FAMILIES} | PROCESS_FAMILIES
    assert all(not f.samples for name, f in fams.items() if name not in PROCESS_FAMILIES)
    om = by_name(parse_openmetrics(r.openmetrics.decode()))
    assert all(not f.samples for name, f in om.items() if name not in PROCESS_FAMILIES)


def test_render_replaces_the_previous_snapshot() -> None:
    exp = Exposition(m.BucketLayout(0))
    first = exp.render(sample_snapshot())
    second = exp.render(m.EMPTY_SNAPSHOT)
    assert b"web-7c9f8d6b5-x2x4q" in first.text
    assert b"web-7c9f8d6b5-x2x4q" not in second.text
    # Rendering again gives the same bytes (but for the process self-metrics, read anew):
    # nothing of the first snapshot is kept.
    assert without_process(exp.render(m.EMPTY_SNAPSHOT).text) == without_process(second.text)


def without_process(text: bytes) -> bytes:
    """The exposition up to the process self-metrics, which come last."""
    head, found, _ = text.partition(b"# HELP process_")
    assert found
    return head


PROCESS_FAMILIES = {
    "process_cpu_seconds",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
}
"""Family names of the process self-metrics, as the parsers report them (counters without _total)."""


def _global_collectors() -> set[object]:
    return set(prometheus_client.REGISTRY._collector_to_names)


def test_leaves_the_global_registry_alone() -> None:
    before = _global_collectors()
    exp = Exposition(m.BucketLayout(2))
    r = exp.render(sample_snapshot())
    # Two expositions coexist: registering in the global registry would fail here, as it
    # already holds prometheus_client's default ProcessCollector.
    other = Exposition(m.BucketLayout(0)).render(m.EMPTY_SNAPSHOT)
    assert _global_collectors() == before
    assert exp.registry is not prometheus_client.REGISTRY
    assert {f.name for f in exp.registry.collect()} == PROCESS_FAMILIES
    # Nothing of the global registry's default collectors (python_gc_, python_info) is rendered.
    for text in (r.text, r.openmetrics, other.text):
        assert b"python_gc" not in text
        assert b"python_info" not in text
    assert b"web-7c9f8d6b5" not in other.text


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_process_metrics_appear_once_with_sane_values(rendered: Rendered, fmt: str) -> None:
    body = getattr(rendered, fmt).decode()
    fams = by_name((parse_text if fmt == "text" else parse_openmetrics)(body))  # a family twice fails
    assert set(fams) >= PROCESS_FAMILIES
    for name in PROCESS_FAMILIES:
        exposed = name + "_total" if fmt == "text" and name == "process_cpu_seconds" else name
        assert body.count(f"# TYPE {exposed} ") == 1, name
        assert body.count(f"# HELP {exposed} ") == 1, name
    value = {name: fams[name].samples[0].value for name in PROCESS_FAMILIES}
    assert all(len(fams[name].samples) == 1 for name in PROCESS_FAMILIES)
    assert fams["process_cpu_seconds"].type == "counter"
    assert value["process_cpu_seconds"] > 0
    assert 0 < value["process_open_fds"] <= value["process_max_fds"]
    assert 0 < value["process_resident_memory_bytes"] <= value["process_virtual_memory_bytes"]
    assert time.time() - 86400 < value["process_start_time_seconds"] <= time.time()
    if fmt == "openmetrics":
        assert body.endswith("# EOF\n") and body.count("# EOF") == 1


def test_process_metrics_are_read_at_each_render() -> None:
    exp = Exposition(m.BucketLayout(0))

    def open_fds(r: Rendered) -> float:
        fams = by_name(parse_text(r.text.decode()))
        return fams["process_open_fds"].samples[0].value

    first = open_fds(exp.render(m.EMPTY_SNAPSHOT))
    extra = [os.dup(0) for _ in range(100)]
    try:
        # Other tests' server threads may open or close a few sockets meanwhile.
        assert first + 90 <= open_fds(exp.render(m.EMPTY_SNAPSHOT)) <= first + 110
    finally:
        for fd in extra:
            os.close(fd)


def test_content_types() -> None:
    assert TEXT_CONTENT_TYPE.startswith("text/plain; version=0.0.4")
    assert OPENMETRICS_CONTENT_TYPE.startswith("application/openmetrics-text; version=1.0.0")


label_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30
)


@settings(deadline=None, max_examples=75, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.tuples(label_text, label_text, label_text, label_text, label_text),
    st.floats(min_value=0, max_value=1e18, allow_nan=False),
)
def test_arbitrary_label_values_round_trip(labels: tuple[str, ...], value: float) -> None:
    # Container names come from cgroup leaves (systemd escapes like "\x2d") and pod metadata.
    snap = m.Snapshot.build(
        1.0,
        {m.TCP_SENT.name: (m.Sample(labels, value),)},
        {m.TCP_RTT.name: (m.HistSample(labels, ((120, 1),), 1, 1.1),)},
    )
    r = Exposition(m.BucketLayout(0)).render(snap)
    want = labels_of(m.TCP_SENT, labels)
    for parse, body in ((parse_text, r.text), (parse_openmetrics, r.openmetrics)):
        fams = by_name(parse(body.decode("utf-8")))
        (s,) = fams[m.TCP_SENT.name].samples
        assert s.labels == want
        assert s.value == pytest.approx(value)
        assert all({k: x.labels[k] for k in want} == want for x in fams[m.TCP_RTT.name].samples)


def test_systemd_escaped_container_name_round_trips() -> None:
    labels = ("", "", "systemd-fsck@dev-disk-by\\x2duuid-1a2b.service", "", "")
    snap = m.Snapshot.build(1.0, {m.TCP_SENT.name: (m.Sample(labels, 1.0),)}, {})
    r = Exposition(m.BucketLayout(0)).render(snap)
    (s,) = by_name(parse_text(r.text.decode()))[m.TCP_SENT.name].samples
    assert s.labels["container"] == labels[2]


# ---- _created ----------------------------------------------------------------------------


def test_openmetrics_created_is_when_the_pod_counters_started() -> None:
    since = 1_699_000_000.25
    snap = dataclasses.replace(sample_snapshot(), counters_since=since)
    r = Exposition(m.BucketLayout(0)).render(snap)
    fams = by_name(parse_openmetrics(r.openmetrics.decode()))  # prometheus_client's parser accepts it
    for spec in m.ALL_FAMILIES:
        series = (
            snap.histograms.get(spec.name, ())
            if spec.kind is m.Kind.HISTOGRAM
            else snap.samples.get(spec.name, ())
        )
        created = [s for s in fams[spec.name].samples if s.name == spec.name + "_created"]
        if spec in m.POD_FAMILIES and spec.kind is not m.Kind.GAUGE:
            assert {tuple(sorted(s.labels.items())) for s in created} == {
                tuple(sorted(labels_of(spec, x.labels).items())) for x in series
            }
            assert all(s.value == since for s in created)
        else:  # gauges, and the self-metrics: those count from the process start
            assert not created, spec.name
    assert len([s for s in fams[m.TCP_SENT.name].samples if s.name.endswith("_created")]) == 2
    # The text format has no _created, as before.
    assert b"_created" not in r.text
    assert {f.name for f in parse_text(r.text.decode())} == {
        f.name for f in parse_text(Exposition(m.BucketLayout(0)).render(sample_snapshot()).text.decode())
    }


def test_no_created_while_the_start_is_unknown(rendered: Rendered) -> None:
    assert sample_snapshot().counters_since == 0.0
    assert b"_created" not in rendered.openmetrics
