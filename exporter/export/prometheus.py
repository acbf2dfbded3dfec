"""Prometheus exposition of snapshots: text format, OpenMetrics, gzip; rendered once per
snapshot so a scrape only copies bytes.

OpenMetrics carries a `_created` sample (Unix seconds) after each counter and histogram
series of the pod families when the snapshot knows when their totals started
(`Snapshot.counters_since` > 0): that is when they last really restarted from zero, not when
this process started, since they outlive a restart. The text format has no `_created`
(prometheus_client leaves it out there too for its own metrics), and neither do gauges and
the self-metrics, which count from the process start."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from exporter.metrics import model as m

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _le(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(bound)


class Rendered:
    """A snapshot's exposition in both formats, kept gzip-compressed only: at 1,000 pods each
    format is 23 MB plain and 0.7 MB compressed, and the old and the new rendering coexist
    while a poll swaps them. Scrapers send Accept-Encoding: gzip (Prometheus always does);
    a plain body is decompressed on first use and kept with its snapshot."""

    __slots__ = ("_openmetrics", "_text", "openmetrics_gzip", "snapshot", "text_gzip")

    def __init__(self, snapshot: m.Snapshot, text_gzip: bytes, openmetrics_gzip: bytes) -> None:
        self.snapshot = snapshot
        self.text_gzip = text_gzip
        self.openmetrics_gzip = openmetrics_gzip
        self._text: bytes | None = None
        self._openmetrics: bytes | None = None

    @property
    def text(self) -> bytes:
        if self._text is None:
            self._text = zlib.decompress(self.text_gzip, _GZIP)
        return self._text

    @property
    def openmetrics(self) -> bytes:
        if self._openmetrics is None:
            self._openmetrics = zlib.decompress(self.openmetrics_gzip, _GZIP)
        return self._openmetrics


_GZIP = 31
"""zlib wbits for a gzip wrapper."""

_EOF = b"# EOF\n"
"""The end of an OpenMetrics exposition."""


class Exposition:
    """Renders snapshots, and owns the registry (ours, never the process-global one) of the
    process self-metrics (process_cpu_seconds_total, process_resident_memory_bytes, ...):
    prometheus_client's ProcessCollector, which reads /proc/self. They are collected in
    render(), which the poller runs in its worker thread, and appended to each snapshot's
    exposition, so a scrape still only copies bytes."""

    def __init__(self, layout: m.BucketLayout) -> None:
        self.layout = layout
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)

    def render(self, snap: m.Snapshot) -> Rendered:
        # Compressed family by family: the plain exposition never exists whole. Level 1: a
        # scrape is compressed once per poll, not once per request, and level 1 gets most
        # of the gain on label-heavy text.
        text = zlib.compressobj(1, zlib.DEFLATED, _GZIP)
        om = zlib.compressobj(1, zlib.DEFLATED, _GZIP)
        text_out: list[bytes] = []
        om_out: list[bytes] = []
        for text_head, om_head, text_body, om_body in _families(snap, self.layout):
            text_out += (text.compress(text_head), text.compress(text_body))
            om_out += (om.compress(om_head), om.compress(om_body))
        process_text, process_om = self.render_process()
        text_out += (text.compress(process_text), text.flush())
        om_out += (om.compress(process_om), om.compress(_EOF), om.flush())
        return Rendered(snap, b"".join(text_out), b"".join(om_out))

    def render_process(self) -> tuple[bytes, bytes]:
        """(text, OpenMetrics without "# EOF") of the process self-metrics, read now from
        /proc/self (blocking: call it off the event loop). Empty where there is no /proc."""
        read = _Collected(list(self.registry.collect()))  # one reading for both formats
        text = generate_latest(read)
        om = generate_openmetrics(read)  # type: ignore[no-untyped-call]
        return text, om.removesuffix(_EOF)


class _Collected(Collector):
    """Families collected once, rendered in both formats from the same reading."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


# ---- fast writer -------------------------------------------------------------------------------
# prometheus_client validates and escapes every label name of every sample, and builds a
# dict and a Sample per histogram bucket: about 35 us per line, 3.4 s for the 100k lines of
# 1,000 pods. Our label names are fixed per family, so their sorted order is computed once,
# and the sample lines (the same in both formats) are written once for both; OpenMetrics
# adds a `_created` line after each series of a counter or histogram when it has one.


_go_float: Callable[[float], str] = floatToGoString
"""Go's float formatting, as prometheus_client writes sample values."""


def _escape_value(value: str) -> str:
    """Label value escaping of both formats (backslash, newline, double quote)."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _family_name(spec: m.MetricSpec) -> str:
    # prometheus_client appends the unit when the name lacks it.
    if spec.unit and not spec.name.endswith("_" + spec.unit):
        return spec.name + "_" + spec.unit
    return spec.name


def _escaped(values: tuple[str, ...]) -> tuple[str, ...]:
    # One scan per label set: values needing escapes are rare.
    joined = "".join(values)
    if "\\" in joined or "\n" in joined or '"' in joined:
        return tuple(_escape_value(v) for v in values)
    return values


def _fields(names: tuple[str, ...], order: list[int]) -> list[str]:
    """`name="{i}"` format fields, in the sorted label order prometheus_client writes."""
    return [f'{names[i]}="{{{i}}}"' for i in order]


def _label_order(names: tuple[str, ...]) -> list[int]:
    return sorted(range(len(names)), key=lambda i: names[i])


_CREATED_FAMILIES = frozenset(spec.name for spec in m.POD_FAMILIES)
"""Families whose totals start at `Snapshot.counters_since` (see the module docstring)."""


def _sample_body(
    name: str, spec: m.MetricSpec, samples: tuple[m.Sample, ...], created: str = ""
) -> tuple[bytes, bytes]:
    """(text, OpenMetrics) lines of a counter or gauge. `created` (Go-formatted, counters
    only) adds a `<family>_created` line after each OpenMetrics sample; without it the two
    bodies are the same object."""
    n = len(spec.labels)
    if n:
        fields = ",".join(_fields(spec.labels, _label_order(spec.labels)))
        line = f"{name}{{{{{fields}}}}} {{{n}}}\n"
    else:
        line = f"{name} {{0}}\n"
    fmt = line.format
    # Counters of idle pods repeat a few values. Keyed by value, so 0.0 and -0.0 (equal,
    # written differently) are kept apart by their sign.
    numbers: dict[tuple[float, bool], str] = {}
    lines = []
    for s in samples:
        key = (s.value, math.copysign(1.0, s.value) < 0)
        value = numbers.get(key)
        if value is None:
            value = numbers[key] = _go_float(s.value)
        lines.append(fmt(*_escaped(s.labels), value))
    text = "".join(lines).encode()
    if not created:
        return text, text
    # A line's label set is the text between its sample name and its last space (values
    # have none).
    created_name = name.removesuffix("_total") + "_created"
    skip = len(name)
    tail = f" {created}\n"
    om: list[str] = []
    for text_line in lines:
        om += (text_line, created_name + text_line[skip : text_line.rindex(" ")] + tail)
    return text, "".join(om).encode()


def _histogram_body(
    name: str, spec: m.MetricSpec, hists: tuple[m.HistSample, ...], layout: m.BucketLayout, created: str = ""
) -> tuple[bytes, bytes]:
    """(text, OpenMetrics) lines of a histogram; `created` as in _sample_body, its line
    written after `_sum`."""
    fields = _fields(spec.labels, _label_order(spec.labels))
    # "le" goes where it sorts among the label names.
    split = sum(1 for i in range(len(spec.labels)) if spec.labels[i] < "le")
    head = f"{name}_bucket{{{{" + "".join(f + "," for f in fields[:split])
    tail = "".join("," + f for f in fields[split:]) + "}}"
    labels = "{{" + ",".join(fields) + "}}" if fields else ""
    totals = f"{name}_count{labels} {{{len(fields)}}}\n{name}_sum{labels} {{{len(fields) + 1}}}\n"
    created_line = f"{name}_created{labels} {created}\n".format if created else None
    # All bucket lines of one histogram in one format call: {0} and {1} are the labels
    # before and after le, {2}... the cumulative counts.
    les = [_le(b) for b in (*layout.bounds, math.inf)]
    buckets = "".join(f'{{0}}le="{le}"{{1}} {{{i + 2}}}\n' for i, le in enumerate(les)).format
    counts: dict[int, str] = {}
    lines: list[str] = []
    om: list[str] = []
    for h in hists:
        values = _escaped(h.labels)
        cumulative = []
        for _, c in layout.cumulative(h.slots):
            count = counts.get(c)
            if count is None:
                count = counts[c] = _go_float(float(c))
            cumulative.append(count)
        series = (
            buckets(head.format(*values), tail.format(*values), *cumulative),
            totals.format(*values, cumulative[-1], _go_float(h.sum)),
        )
        lines += series
        if created_line is not None:
            om += (*series, created_line(*values))
    text = "".join(lines).encode()
    return text, "".join(om).encode() if created_line is not None else text


def _families(snap: m.Snapshot, layout: m.BucketLayout) -> Iterator[tuple[bytes, bytes, bytes, bytes]]:
    """(text format header, OpenMetrics header, text sample lines, OpenMetrics sample lines)
    of every family, in order."""
    since = _go_float(snap.counters_since) if snap.counters_since > 0 else ""
    for spec in m.ALL_FAMILIES:
        name = _family_name(spec)
        created = since if spec.name in _CREATED_FAMILIES else ""
        if spec.kind is m.Kind.HISTOGRAM:
            kind = "histogram"
            body, om_body = _histogram_body(name, spec, snap.histograms.get(spec.name, ()), layout, created)
        elif spec.kind is m.Kind.COUNTER:
            kind = "counter"
            body, om_body = _sample_body(name + "_total", spec, snap.samples.get(spec.name, ()), created)
        else:
            kind = "gauge"
            body, om_body = _sample_body(name, spec, snap.samples.get(spec.name, ()))
        exposed = name + "_total" if kind == "counter" else name
        text_help = spec.help.replace("\\", r"\\").replace("\n", r"\n")
        unit = f"# UNIT {name} {spec.unit}\n" if spec.unit else ""
        yield (
            f"# HELP {exposed} {text_help}\n# TYPE {exposed} {kind}\n".encode(),
            f"# HELP {name} {_escape_value(spec.help)}\n# TYPE {name} {kind}\n{unit}".encode(),
            body,
            om_body,
        )


def render_fast(snap: m.Snapshot, layout: m.BucketLayout) -> tuple[bytes, bytes]:
    """(Prometheus text 0.0.4, OpenMetrics 1.0) of a snapshot, byte for byte what
    prometheus_client writes for the same families (tests/reference_render.py is that
    reference; tests/unit/test_render_fast.py compares the two)."""
    text: list[bytes] = []
    om: list[bytes] = []
    for text_head, om_head, text_body, om_body in _families(snap, layout):
        text += (text_head, text_body)
        om += (om_head, om_body)
    om.append(_EOF)
    return b"".join(text), b"".join(om)
