"""Turning one poll's raw kernel data into an immutable Snapshot (pure)."""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TypeVar

from exporter.metrics import model as m
from exporter.metrics.ledger import LOOPBACK
from exporter.metrics.peers import loopback_peer
from exporter.metrics.raw import (
    DIRECTIONS,
    FAIL_REASONS,
    GRPC_STATUSES,
    HTTP_METHODS,
    PROTOCOLS,
    ROLES,
    STATUS_CLASSES,
    RawData,
    Slots,
)
from exporter.pods.identity import Identity
from exporter.pods.metadata import MetadataSourceState
from exporter.pods.pods import PodMeta

NS_PER_S = 1e9
CAPPED_FAMILIES: tuple[m.MetricSpec, ...] = m.POD_FAMILIES + m.INFO_FAMILIES
"""Families whose series grow with pods and peers; the self-metrics are bounded by the code."""

_V = TypeVar("_V")


@dataclass
class ExporterState:
    """Self-metric inputs gathered by the poller."""

    build: tuple[str, str, str, str, str] = ("", "", "", "", "")
    poll_seconds: float = 0.0
    polls: int = 0
    errors: Mapping[str, int] = field(default_factory=dict)
    programs: Mapping[str, bool] = field(default_factory=dict)
    unresolved: int = 0
    pods: int = 0
    bpf_stats: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """program -> (run time ns, run count)."""
    otlp: tuple[int, int, float] | None = None
    """(exports ok, exports failed, last success unix time) when OTLP is on."""
    retired_dropped: int = 0
    tls: tuple[int, int, int] | None = None
    """TLS libraries attached, failing, dropped (--tls openssl); None: TLS off."""
    metadata: tuple[MetadataSourceState, ...] = ()
    http: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """(handler, status code) -> HTTP requests answered."""


class _Acc:
    """Sums per label set: several cgroups (containers, or unknown ids of one pod) may
    share one label set."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], float]] = defaultdict(lambda: defaultdict(float))
        # Each label set's slot maps, merged once at the end: most label sets have one.
        self.hists: dict[str, dict[tuple[str, ...], list[Slots]]] = defaultdict(lambda: defaultdict(list))

    def add(self, spec: m.MetricSpec, labels: tuple[str, ...], value: float) -> None:
        self.values[spec.name][labels] += value

    def add_hist(self, spec: m.MetricSpec, labels: tuple[str, ...], slots: Slots) -> None:
        self.hists[spec.name][labels].append(slots)


def build_snapshot(
    raw: RawData,
    identities: Mapping[int, Identity],
    state: ExporterState,
    now: float,
    *,
    pods: Iterable[PodMeta] = (),
    max_series: int | None = None,
    previous: m.Snapshot | None = None,
    counters_since: float = 0.0,
) -> m.Snapshot:
    """`max_series` caps each of CAPPED_FAMILIES; `previous` (the last snapshot built) says
    which series were exported already, and holds the running drop totals."""
    acc = _Acc()
    for cgid, c in raw.cgroups.items():
        ident = identities.get(cgid)
        if ident is None:
            continue
        pl = ident.labels
        if c.sent or c.received:
            acc.add(m.TCP_SENT, pl, c.sent)
            acc.add(m.TCP_RECEIVED, pl, c.received)
        for i, d in enumerate(DIRECTIONS):
            if c.opened[i] or c.closed[i] or c.active[i]:
                acc.add(m.TCP_OPENED, (*pl, d), c.opened[i])
                acc.add(m.TCP_CLOSED, (*pl, d), c.closed[i])
                acc.add(m.TCP_ACTIVE, (*pl, d), max(c.active[i], 0))
        if any(c.failed):
            for i, reason in enumerate(FAIL_REASONS):
                acc.add(m.TCP_FAILED, (*pl, reason), c.failed[i])
        if c.retransmits or c.resets_sent or c.resets_received:
            acc.add(m.TCP_RETRANSMITS, pl, c.retransmits)
            acc.add(m.TCP_RESETS, (*pl, "sent"), c.resets_sent)
            acc.add(m.TCP_RESETS, (*pl, "received"), c.resets_received)
    for (cgid, peer), (sent, received) in raw.flows.items():
        ident = identities.get(cgid)
        if ident is None:
            continue
        peer_labels = loopback_peer(ident) if peer == LOOPBACK else peer
        acc.add(m.FLOW_BYTES, (*ident.labels, "sent", *peer_labels), sent)
        acc.add(m.FLOW_BYTES, (*ident.labels, "received", *peer_labels), received)
    for spec, per_cgroup in ((m.TCP_RTT, raw.rtt), (m.TCP_CONNECT, raw.connect)):
        for cgid, slots in per_cgroup.items():
            ident = identities.get(cgid)
            if ident is not None:
                acc.add_hist(spec, ident.labels, slots)
    _requests(acc, raw, identities)
    for pod in pods:
        ip = pod.pod_ips[0] if pod.pod_ips else ""
        row = (pod.namespace, pod.name, pod.workload, pod.workload_kind, pod.node, ip)
        # Set, not added: two pods of one name (a StatefulSet pod being replaced) are one row.
        acc.values[m.POD_INFO.name][row] = 1

    dropped = _apply_cap(acc, max_series, previous) if max_series is not None else {}
    _self_metrics(acc, raw, state, now)
    _series_dropped(acc, dropped, previous)

    samples = {
        # Unsorted: order within a family means nothing to Prometheus or OTLP, and sorting
        # 28,000 label tuples is a sixth of a poll at 1,000 pods.
        name: tuple(m.Sample(labels, v) for labels, v in series.items())
        for name, series in acc.values.items()
    }
    hists = {
        name: tuple(_hist_sample(labels, slots) for labels, slots in series.items())
        for name, series in acc.hists.items()
    }
    pod_uids = {(i.namespace, i.pod): i.pod_uid for i in identities.values() if i.pod_uid}
    return m.Snapshot.build(now, samples, hists, pod_uids, counters_since=counters_since)


def request_labels(
    role: int, protocol: int, method: int, status: int, grpc_status: int = 0
) -> tuple[str, str, str, str, str]:
    """Kernel request codes -> (role, protocol, method, status_class, grpc_status) label
    values. An HTTP request with a method outside the standard set has method "other";
    non-HTTP requests have no method; only gRPC requests have a grpc_status."""
    proto = _code(PROTOCOLS, protocol)
    meth = _code(HTTP_METHODS, method)
    if proto in ("http", "http2", "grpc") and not meth:
        meth = "other"
    grpc = _code(GRPC_STATUSES, grpc_status) if proto == "grpc" else ""
    return _code(ROLES, role), proto, meth, _code(STATUS_CLASSES, status), grpc


def _code(names: tuple[str, ...], code: int) -> str:
    return names[code] if 0 <= code < len(names) else ""


def _requests(acc: _Acc, raw: RawData, identities: Mapping[int, Identity]) -> None:
    for cgid, by_labels in raw.requests.items():
        ident = identities.get(cgid)
        if ident is None:
            continue
        for (role, proto, method, status, grpc), slots in by_labels.items():
            labels = request_labels(role, proto, method, status, grpc)
            acc.add(m.REQUESTS, (*ident.labels, *labels), sum(c for c, _ in slots.values()))
            acc.add_hist(m.REQUEST_DURATION, (*ident.labels, labels[0], labels[1]), slots)


def _exported(previous: m.Snapshot | None, spec: m.MetricSpec) -> set[tuple[str, ...]]:
    if previous is None:
        return set()
    if spec.kind is m.Kind.HISTOGRAM:
        return {h.labels for h in previous.histograms.get(spec.name, ())}
    return {s.labels for s in previous.samples.get(spec.name, ())}


def cap_series(
    series: dict[tuple[str, ...], _V], cap: int, exported: AbstractSet[tuple[str, ...]]
) -> tuple[dict[tuple[str, ...], _V], int]:
    """(at most `cap` of `series`, how many were left out). Series exported last time go
    first, so an existing series never flaps out because a new one arrived; the rest are
    taken in label order, so the choice does not depend on map iteration order."""
    if len(series) <= cap:
        return series, 0
    old = [k for k in series if k in exported]
    keep = heapq.nsmallest(cap, old) if len(old) > cap else old
    room = cap - len(keep)
    if room:
        keep += heapq.nsmallest(room, (k for k in series if k not in exported))
    return {k: series[k] for k in keep}, len(series) - len(keep)


def _apply_cap(acc: _Acc, cap: int, previous: m.Snapshot | None) -> dict[str, int]:
    """Caps acc in place; returns label sets left out per exposed family name."""
    dropped: dict[str, int] = {}
    for spec in CAPPED_FAMILIES:
        n = 0
        if spec.kind is m.Kind.HISTOGRAM:
            hists = acc.hists.get(spec.name)
            if hists is not None and len(hists) > cap:
                acc.hists[spec.name], n = cap_series(hists, cap, _exported(previous, spec))
        else:
            values = acc.values.get(spec.name)
            if values is not None and len(values) > cap:
                acc.values[spec.name], n = cap_series(values, cap, _exported(previous, spec))
        if n:
            dropped[spec.exposed_name] = n
    return dropped


def _series_dropped(acc: _Acc, dropped: Mapping[str, int], previous: m.Snapshot | None) -> None:
    """Running totals: the previous snapshot's plus this poll's. Every capped family has a
    series (0 until it drops) so an alert on it needs no absent()."""
    before: dict[str, float] = {}
    if previous is not None:
        before = {s.labels[0]: s.value for s in previous.samples.get(m.SERIES_DROPPED.name, ())}
    for spec in CAPPED_FAMILIES:
        name = spec.exposed_name
        acc.values[m.SERIES_DROPPED.name][(name,)] = before.get(name, 0) + dropped.get(name, 0)


def _hist_sample(labels: tuple[str, ...], parts: list[Slots]) -> m.HistSample:
    slots = parts[0]
    if len(parts) > 1:
        slots = {}
        for part in parts:
            for slot, (count, sum_ns) in part.items():
                c0, s0 = slots.get(slot, (0, 0))
                slots[slot] = (c0 + count, s0 + sum_ns)
    # One pass: this runs for every histogram series of every poll.
    ordered = []
    count = total = 0
    for slot, (c, t) in sorted(slots.items()):
        count += c
        total += t
        if c:
            ordered.append((slot, c))
    return m.HistSample(labels, tuple(ordered), count, total / NS_PER_S)


def _self_metrics(acc: _Acc, raw: RawData, state: ExporterState, now: float) -> None:
    acc.add(m.BUILD_INFO, state.build, 1)
    acc.add(m.POLL_DURATION, (), state.poll_seconds)
    acc.add(m.POLLS, (), state.polls)
    acc.add(m.LAST_POLL, (), now)
    for stage, n in state.errors.items():
        acc.add(m.ERRORS, (stage,), n)
    for program, attached in state.programs.items():
        acc.add(m.PROGRAM_ATTACHED, (program,), 1 if attached else 0)
    for name, n in raw.map_failures.items():
        acc.add(m.MAP_UPDATE_FAILURES, (name,), n)
    for name, n in raw.map_entries.items():
        acc.add(m.MAP_ENTRIES, (name,), n)
    acc.add(m.UNRESOLVED, (), state.unresolved)
    acc.add(m.PODS_KNOWN, (), state.pods)
    if state.otlp is not None:
        ok, failed, last = state.otlp
        acc.add(m.OTLP_EXPORTS, ("ok",), ok)
        acc.add(m.OTLP_EXPORTS, ("failed",), failed)
        acc.add(m.OTLP_LAST_SUCCESS, (), last)
    acc.add(m.RETIRED_DROPPED, (), state.retired_dropped)
    if state.tls is not None:
        for name, n in zip(("attached", "failing", "dropped"), state.tls, strict=True):
            acc.add(m.TLS_LIBRARIES, (name,), n)
    for source in state.metadata:
        acc.add(m.METADATA_UP, (source.source,), 1 if source.up else 0)
        acc.add(m.METADATA_LAST_SYNC, (source.source,), source.last_sync)
        acc.add(m.METADATA_RELISTS, (source.source,), source.relists)
        acc.add(m.METADATA_ERRORS, (source.source,), source.errors)
    for labels, n in state.http.items():
        acc.add(m.HTTP_REQUESTS, labels, n)
    for program, (ns, runs) in state.bpf_stats.items():
        acc.add(m.PROG_RUN_TIME, (program,), ns / NS_PER_S)
        acc.add(m.PROG_RUN_COUNT, (program,), runs)
