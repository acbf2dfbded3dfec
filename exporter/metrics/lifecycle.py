"""Dead cgroups: drop their totals without making counters go backwards.

When a container's cgroup is removed and the kernel holds nothing of it any more, its
totals leave the ledger and are kept here, under its labels, for as long as the pod
exists: a restarted container's new cgroup then continues the same series instead of
resetting it. When the pod is gone too, the kept values are dropped and the series
disappear.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from exporter.metrics.ledger import (
    add_counters,
    add_slots,
    decode_identity,
    decode_raw,
    encode_identity,
    encode_raw,
)
from exporter.metrics.raw import RawData
from exporter.pods.identity import Identity


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
            add_counters(self.data.cgroups[syn], raw.cgroups[cgid])
        for (cg, peer), (sent, received) in raw.flows.items():
            if cg == cgid:
                s0, r0 = self.data.flows.get((syn, peer), (0, 0))
                self.data.flows[(syn, peer)] = (s0 + sent, r0 + received)
        if cgid in raw.rtt:
            add_slots(self.data.rtt[syn], raw.rtt[cgid])
        if cgid in raw.connect:
            add_slots(self.data.connect[syn], raw.connect[cgid])
        for labels, slots in raw.requests.get(cgid, {}).items():
            add_slots(self.data.requests[syn].setdefault(labels, {}), slots)

    def encode(self) -> dict[str, Any]:
        return {
            "data": encode_raw(self.data),
            "ids": {encode_identity(ident): syn for ident, syn in self.ids.items()},
            "dropped": self.dropped,
        }

    @classmethod
    def decode(cls, d: Any, max_identities: int) -> Retired:
        """From encode(); raises ValueError on anything else."""
        try:
            ids: dict[Identity, int] = {}
            for fields, syn in d["ids"].items():
                if type(syn) is not int or syn >= 0:
                    raise ValueError("bad synthetic id")
                ids[decode_identity(fields)] = syn
            dropped = d["dropped"]
            if type(dropped) is not int:
                raise ValueError("bad count")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed retired totals: {e}") from None
        r = cls(max_identities, decode_raw(d["data"]), ids, dropped)
        r._next = min([-1, *(s - 1 for s in ids.values())])
        return r

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
