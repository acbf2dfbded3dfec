"""Per-flow byte totals from per-socket counters (the tp_btf build of bpf/tcp_traffic.bpf.c).

There each socket counts its own bytes in its local storage, so a send or receive updates
no shared map. The poller reads live sockets through an iterator, and a socket that dies
hands its totals over once, in the `tcp_sock_final` map, under the id of its state, after
flagging its storage so that the iterator skips it from then on. A socket's bytes are
therefore in exactly one place, except while a poll's iterator reads a storage at the
instant of its hand-over: then the poll finds it in both, with the same id, and counts it
once. Dead sockets' totals accumulate here, per flow, until their cgroup is gone, so a
flow's counter never goes backwards.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Iterable
from dataclasses import dataclass

from exporter.bpf_structs import UNTRACKED_PEER, TcpSockRecord

Flow = tuple[int, bytes]
"""(owner cgroup id, peer address as 16 bytes)"""


@dataclass(frozen=True)
class SocketTotals:
    id: int
    flow: Flow
    sent: int
    received: int


def decode_records(data: bytes) -> list[SocketTotals]:
    """iter_tcp_sock_state's output: one fixed-size record per live socket."""
    records = (TcpSockRecord * (len(data) // ct.sizeof(TcpSockRecord))).from_buffer_copy(data)
    return [SocketTotals(r.id, (r.flow.cgroup_id, bytes(r.flow.peer)), r.sent, r.received) for r in records]


class SocketBytes:
    """Folds each poll's live sockets and handed-over totals into per-flow totals."""

    def __init__(self, max_flows: int) -> None:
        self._max_flows = max_flows
        self._dead: dict[Flow, list[int]] = {}
        self.overflowed = 0
        """Dead sockets' totals folded into their owner's untracked-peer flow because
        `max_flows` flows were already held (the owner's totals stay exact)."""

    def fold(
        self, live: Iterable[SocketTotals], finals: Iterable[SocketTotals]
    ) -> dict[Flow, tuple[int, int]]:
        """Per flow, (sent, received) over every socket ever seen, dead or alive. `finals`
        must be each handed-over socket exactly once (the caller deletes what it read)."""
        folded: set[int] = set()
        for f in finals:
            folded.add(f.id)
            flow = f.flow
            if flow not in self._dead and len(self._dead) >= self._max_flows:
                self.overflowed += 1
                flow = (flow[0], UNTRACKED_PEER)
            acc = self._dead.setdefault(flow, [0, 0])
            acc[0] += f.sent
            acc[1] += f.received
        out = {flow: (acc[0], acc[1]) for flow, acc in self._dead.items()}
        for s in live:
            if s.id in folded:  # handed over while this poll read it: the final counts
                continue
            sent, received = out.get(s.flow, (0, 0))
            out[s.flow] = (sent + s.sent, received + s.received)
        return out

    def forget(self, cgroups: set[int]) -> int:
        """Drop the totals of dead cgroups (their last values are kept by the caller)."""
        gone = [flow for flow in self._dead if flow[0] in cgroups]
        for flow in gone:
            del self._dead[flow]
        return len(gone)
