"""Dead cgroups: free their kernel map entries without making counters go backwards.

When a container's cgroup is removed, its entries in the kernel maps are deleted (so the
maps do not fill with the dead) and its last values are kept here, under its labels, for
as long as the pod exists: a restarted container's new cgroup then continues the same
series instead of resetting it. When the pod is gone too, the kept values are dropped and
the series disappear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from exporter.metrics.raw import CgroupCounters, RawData, Slots
from exporter.pods.identity import Identity


def _add_counters(into: CgroupCounters, c: CgroupCounters) -> None:
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


def _add_slots(into: Slots, slots: Slots) -> None:
    for slot, (count, total) in slots.items():
        c0, t0 = into.get(slot, (0, 0))
        into[slot] = (c0 + count, t0 + total)


@dataclass
class Retired:
    """Values of dead cgroups, one synthetic negative id per label set (real cgroup ids
    are positive), so they merge into a poll's RawData like any other owner."""

    max_identities: int = 65536
    data: RawData = field(default_factory=RawData)
    ids: dict[Identity, int] = field(default_factory=dict)
    dropped: int = 0
    _next: int = -1

    def _id_for(self, ident: Identity) -> int | None:
        syn = self.ids.get(ident)
        if syn is None:
            if len(self.ids) >= self.max_identities:
                self.dropped += 1
                return None
            syn = self._next
            self._next -= 1
            self.ids[ident] = syn
        return syn

    def absorb(self, raw: RawData, cgid: int, ident: Identity) -> None:
        syn = self._id_for(ident)
        if syn is None:
            return
        if cgid in raw.cgroups:
            _add_counters(self.data.cgroups[syn], raw.cgroups[cgid])
        for (cg, peer), (sent, received) in raw.flows.items():
            if cg == cgid:
                s0, r0 = self.data.flows.get((syn, peer), (0, 0))
                self.data.flows[(syn, peer)] = (s0 + sent, r0 + received)
        if cgid in raw.rtt:
            _add_slots(self.data.rtt[syn], raw.rtt[cgid])
        if cgid in raw.connect:
            _add_slots(self.data.connect[syn], raw.connect[cgid])
        for labels, slots in raw.requests.get(cgid, {}).items():
            _add_slots(self.data.requests[syn].setdefault(labels, {}), slots)

    def prune(self, keep: Callable[[Identity], bool]) -> None:
        for ident, syn in list(self.ids.items()):
            if keep(ident):
                continue
            del self.ids[ident]
            self.data.cgroups.pop(syn, None)
            self.data.rtt.pop(syn, None)
            self.data.connect.pop(syn, None)
            self.data.requests.pop(syn, None)
            for key in [k for k in self.data.flows if k[0] == syn]:
                del self.data.flows[key]

    def merge(self, raw: RawData, identities: Mapping[int, Identity]) -> dict[int, Identity]:
        """Add the retired values into `raw` (in place); returns identities for them too."""
        for syn, c in self.data.cgroups.items():
            raw.cgroups[syn] = c
        raw.flows.update(self.data.flows)
        raw.rtt.update(self.data.rtt)
        raw.connect.update(self.data.connect)
        raw.requests.update(self.data.requests)
        merged = dict(identities)
        merged.update({syn: ident for ident, syn in self.ids.items()})
        return merged


def drop_from_raw(raw: RawData, dead: Iterable[int]) -> None:
    gone = set(dead)
    for cg in gone:
        raw.cgroups.pop(cg, None)
        raw.rtt.pop(cg, None)
        raw.connect.pop(cg, None)
        raw.requests.pop(cg, None)
    for key in [k for k in raw.flows if k[0] in gone]:
        del raw.flows[key]
