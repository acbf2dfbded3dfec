"""The exporter's running totals: what the kernel counted, summed over polls (pure).

The kernel hands over counts in pieces (exporter.metrics.raw.KernelRead): final pieces,
which no program adds to any more and which the kernel then forgets, and live ones,
still counting. The ledger adds each final piece to its totals exactly once and shows,
each poll, totals plus live pieces. Counters therefore only go up, whatever the kernel
keeps, and the kernel keeps only what was counted in the last two poll intervals.

A flow's peer is classified (address -> peer workload) the first time its piece is
read and kept with the piece: bytes stay with the peer they were counted for, however
the address is reused later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import astuple, dataclass, field
from typing import Any

from exporter.metrics.raw import CgroupCounters, Counts, FlowSource, KernelRead, RawData, RequestLabels, Slots
from exporter.pods.identity import Identity

PeerLabels = tuple[str, str, str]
"""(peer_namespace, peer_workload, peer_kind) of a flow."""
LOOPBACK: PeerLabels = ("", "", "loopback")
"""Placeholder peer of loopback flows: the owner itself, named when the owner is
(exporter.metrics.peers.loopback_peer)."""


def add_counters(into: CgroupCounters, c: CgroupCounters) -> None:
    into.sent += c.sent
    into.received += c.received
    into.retransmits += c.retransmits
    into.resets_sent += c.resets_sent
    into.resets_received += c.resets_received
    for i in range(2):
        into.opened[i] += c.opened[i]
        into.closed[i] += c.closed[i]
        into.active[i] += c.active[i]
    for i in range(4):
        into.failed[i] += c.failed[i]


def add_slots(into: Slots, slots: Slots) -> None:
    for slot, (count, total) in slots.items():
        c0, t0 = into.get(slot, (0, 0))
        into[slot] = (c0 + count, t0 + total)


def _merged_counters(a: CgroupCounters | None, b: CgroupCounters | None) -> CgroupCounters:
    """A new CgroupCounters holding a + b (either may be absent)."""
    out = CgroupCounters()
    for part in (a, b):
        if part is not None:
            add_counters(out, part)
    return out


def _merged_slots(a: Slots, b: Slots) -> Slots:
    out = dict(a)
    add_slots(out, b)
    return out


@dataclass
class Ledger:
    totals: RawData = field(default_factory=RawData)
    """Everything final so far; flows keyed by (cgroup id, PeerLabels)."""
    peers: dict[FlowSource, PeerLabels] = field(default_factory=dict)
    """The peer each live piece of a flow was classified as when first read."""
    committed_through: int = -1
    """Every kernel generation up to this one is in `totals`."""
    committed_sockets: frozenset[int] = frozenset()
    """Dead sockets whose totals are in `totals` but may still be in the kernel (not yet
    deleted, e.g. the exporter stopped in between): not to be added again."""
    names: dict[int, Identity] = field(default_factory=dict)
    """The last identity each cgroup with totals was known by: a cgroup that died (while
    the exporter was down, say) can no longer be resolved, and its totals still belong
    to its pod."""

    def name(self, identities: Mapping[int, Identity]) -> None:
        """Remember who the cgroups of this poll are."""
        self.names.update(identities)

    def apply(self, read: KernelRead, classify: Callable[[bytes], PeerLabels]) -> RawData:
        """Add `read`'s final pieces to the totals; returns totals plus live pieces (a new
        RawData that shares unchanged values with the totals: treat it as read-only)."""
        peers: dict[FlowSource, PeerLabels] = {}
        for source in read.live.flows:
            peer = self.peers.get(source)
            peers[source] = peer if peer is not None else classify(source[1])
        t = self.totals
        for source, (sent, received) in read.final.flows.items():
            peer = self.peers.get(source) or peers.get(source) or classify(source[1])
            _add_flow(t, (source[0], peer), sent, received)
        _add_counts(t, read.final)
        self.peers = peers
        self.committed_through = read.generation - 2
        # Kept until the poller has deleted them from the kernel (then it clears this).
        self.committed_sockets |= frozenset(-s for _, _, s in read.final.flows if s < 0)

        view = RawData(
            cgroups=dict(t.cgroups),
            flows=dict(t.flows),
            rtt=dict(t.rtt),
            connect=dict(t.connect),
            requests=dict(t.requests),
            map_failures=read.map_failures,
            map_entries=read.map_entries,
        )
        live = read.live
        for cg, c in live.cgroups.items():
            base = view.cgroups.get(cg)
            view.cgroups[cg] = _merged_counters(base, c) if base is not None else c
        for source, (sent, received) in live.flows.items():
            key = (source[0], peers[source])
            s0, r0 = view.flows.get(key, (0, 0))
            view.flows[key] = (s0 + sent, r0 + received)
            mine = view.cgroups.get(source[0])
            if mine is None or mine is t.cgroups.get(source[0]):
                # Not this poll's own object yet: copy before adding, the totals stay as they are.
                mine = view.cgroups[source[0]] = _merged_counters(mine, None)
            mine.sent += sent
            mine.received += received
        for attr in ("rtt", "connect"):
            into: dict[int, Slots] = getattr(view, attr)
            for cg, slots in getattr(live, attr).items():
                into[cg] = _merged_slots(into.get(cg, {}), slots)
        for cg, by_labels in live.requests.items():
            merged = dict(view.requests.get(cg, {}))
            for labels, slots in by_labels.items():
                merged[labels] = _merged_slots(merged.get(labels, {}), slots)
            view.requests[cg] = merged
        return view

    def forget(self, cgroups: Iterable[int]) -> None:
        """Drop the totals of cgroups that are gone (the caller keeps what it needs)."""
        gone = set(cgroups)
        self.totals.drop(gone)
        for cg in gone:
            self.names.pop(cg, None)
        self.peers = {s: p for s, p in self.peers.items() if s[0] not in gone}

    def seed_active(self, active: dict[int, tuple[int, int]]) -> None:
        """The connections open when tcp_state started afresh (nothing tracked in the
        kernel): cgroup -> (outbound, inbound). They replace the active counts in the
        totals; their close is counted by the kernel like any other."""
        for c in self.totals.cgroups.values():
            c.active = [0, 0]
        for cg, (outbound, inbound) in active.items():
            c = self.totals.cgroups.setdefault(cg, CgroupCounters())
            c.active[0] += outbound
            c.active[1] += inbound


def _add_flow(raw: RawData, key: tuple[int, Any], sent: int, received: int) -> None:
    s0, r0 = raw.flows.get(key, (0, 0))
    raw.flows[key] = (s0 + sent, r0 + received)
    c = raw.cgroups.get(key[0])
    if c is None:
        c = raw.cgroups[key[0]] = CgroupCounters()
    c.sent += sent
    c.received += received


def _add_counts(raw: RawData, counts: Counts) -> None:
    for cg, c in counts.cgroups.items():
        into = raw.cgroups.get(cg)
        if into is None:
            into = raw.cgroups[cg] = CgroupCounters()
        add_counters(into, c)
    for cg, slots in counts.rtt.items():
        add_slots(raw.rtt.setdefault(cg, {}), slots)
    for cg, slots in counts.connect.items():
        add_slots(raw.connect.setdefault(cg, {}), slots)
    for cg, by_labels in counts.requests.items():
        mine = raw.requests.setdefault(cg, {})
        for labels, slots in by_labels.items():
            add_slots(mine.setdefault(labels, {}), slots)


# ---- saving and loading -------------------------------------------------------------
# Plain dicts, tuples, ints and strings (what marshal writes, fast): the running
# structures themselves where they already are plain, checked field by field on loading.

_COUNTER_FIELDS = ("sent", "received", "retransmits", "resets_sent", "resets_received")


def encode_raw(raw: RawData) -> dict[str, Any]:
    """RawData whose flows are keyed by (owner, PeerLabels), as plain values."""
    return {
        "cgroups": {
            cg: (*(getattr(c, f) for f in _COUNTER_FIELDS), *c.opened, *c.closed, *c.active, *c.failed)
            for cg, c in raw.cgroups.items()
        },
        "flows": dict(raw.flows),
        "rtt": dict(raw.rtt),
        "connect": dict(raw.connect),
        "requests": dict(raw.requests),
    }


def decode_raw(d: Any) -> RawData:
    """The inverse of encode_raw; raises ValueError on anything else."""
    raw = RawData()
    try:
        for cg, row in _items(d["cgroups"]):
            v = _ints(row, len(_COUNTER_FIELDS) + 10)
            c = CgroupCounters()
            for name, value in zip(_COUNTER_FIELDS, v, strict=False):
                setattr(c, name, value)
            c.opened, c.closed, c.active, c.failed = v[5:7], v[7:9], v[9:11], v[11:15]
            raw.cgroups[_int(cg)] = c
        for key, value in _items(d["flows"]):
            cg, peer = key
            labels = tuple(peer)
            if len(labels) != 3 or not all(isinstance(x, str) for x in labels):
                raise ValueError("bad peer labels")
            sent, received = _ints(value, 2)
            raw.flows[(_int(cg), labels)] = (sent, received)
        for name in ("rtt", "connect"):
            into = getattr(raw, name)
            for cg, slots in _items(d[name]):
                into[_int(cg)] = _slots(slots)
        for cg, by_labels in _items(d["requests"]):
            # Totals written before gRPC status existed have four codes: no gRPC status.
            raw.requests[_int(cg)] = {_request_codes(k): _slots(v) for k, v in _items(by_labels)}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed totals: {e}") from None
    return raw


def encode_ledger(ledger: Ledger) -> dict[str, Any]:
    return {
        "totals": encode_raw(ledger.totals),
        "peers": dict(ledger.peers),
        "committed_through": ledger.committed_through,
        "committed_sockets": tuple(ledger.committed_sockets),
        "names": {cg: encode_identity(ident) for cg, ident in ledger.names.items()},
    }


def decode_ledger(d: Any) -> Ledger:
    try:
        peers: dict[FlowSource, PeerLabels] = {}
        for (cg, peer, source), labels in _items(d["peers"]):
            if not isinstance(peer, bytes) or len(peer) != 16:
                raise ValueError("bad peer address")
            three = tuple(labels)
            if len(three) != 3 or not all(isinstance(x, str) for x in three):
                raise ValueError("bad peer labels")
            peers[(_int(cg), peer, _int(source))] = (three[0], three[1], three[2])
        names = {_int(cg): decode_identity(fields) for cg, fields in _items(d["names"])}
        return Ledger(
            decode_raw(d["totals"]),
            peers,
            _int(d["committed_through"]),
            frozenset(_ints(d["committed_sockets"], None)),
            names,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed totals: {e}") from None


def encode_identity(ident: Identity) -> tuple[str | None, ...]:
    return astuple(ident)


def decode_identity(fields: Any) -> Identity:
    """From encode_identity; ValueError on anything else."""
    ns, pod, container, workload, kind, uid = fields
    if not all(isinstance(x, str) for x in (ns, pod, container, workload, kind)) or not (
        uid is None or isinstance(uid, str)
    ):
        raise ValueError("bad identity")
    return Identity(ns, pod, container, workload, kind, uid)


def _items(d: Any) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"expected a mapping, not {type(d).__name__}")
    return d.items()


def _int(v: Any) -> int:
    if type(v) is not int:
        raise ValueError(f"expected an integer, not {type(v).__name__}")
    return v


def _ints(values: Any, n: int | None) -> list[int]:
    out = [_int(v) for v in values]
    if n is not None and len(out) != n:
        raise ValueError(f"expected {n} values, got {len(out)}")
    return out


def _request_codes(k: Any) -> RequestLabels:
    codes = _ints(k, None)
    if len(codes) == 4:
        codes.append(0)
    if len(codes) != 5:
        raise ValueError(f"expected 5 request codes, got {len(codes)}")
    return tuple(codes)  # type: ignore[return-value]


def _slots(d: Any) -> Slots:
    return {_int(slot): tuple(_ints(v, 2)) for slot, v in _items(d)}  # type: ignore[misc]
