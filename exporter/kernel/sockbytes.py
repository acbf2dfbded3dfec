"""Per-flow byte totals from per-socket counters (the tp_btf build of bpf/tcp_traffic.bpf.c).

There each socket counts its own bytes in a slot of the `tcp_sock_slots` array, so a send
or receive updates no shared map. The poller reads the slots in place (the array is
mapped into memory), and a socket that dies hands its totals over once, in the
`tcp_sock_final` map, under the id of its state, before it clears the slot's id. A
socket's bytes are therefore in exactly one place, except while a poll reads a slot at
the instant of its hand-over: then the poll finds it in both, with the same id, and
counts it once. Dead sockets' totals accumulate here, per flow, until their cgroup is
gone, so a flow's counter never goes backwards.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Iterable
from typing import NamedTuple

from exporter.kernel.bpf_structs import TcpFlowKey, TcpSockSlot
from exporter.metrics.raw import UNTRACKED_PEER

Flow = tuple[int, bytes]
"""(owner cgroup id, peer address as 16 bytes)"""


class SocketTotals(NamedTuple):
    # A tuple, not a dataclass: a poll makes one per live socket, and this is 4x cheaper.
    id: int
    flow: Flow
    sent: int
    received: int


_READ_TRIES = 3
_WORDS = ct.sizeof(TcpSockSlot) // 8
_PEER = TcpSockSlot.flow.offset + TcpFlowKey.peer.offset


def read_slots(slots: ct.Array[TcpSockSlot], high_water: int) -> list[SocketTotals]:
    """The live sockets among the first `high_water` slots.

    The kernel writes a slot's id after its counters when a socket takes it and clears
    it when the socket gives it back, and ids are never reused. So the slots are copied
    three times (ids, everything, ids again): where both id copies agree, the counters in
    between are that socket's. A slot that changed owner meanwhile is read again on its
    own (read_slot)."""
    n = min(high_water, len(slots))
    size = n * ct.sizeof(TcpSockSlot)
    addr = ct.addressof(slots)
    before = memoryview(ct.string_at(addr, size)).cast("Q")[0::_WORDS].tolist()
    data = ct.string_at(addr, size)
    after = memoryview(ct.string_at(addr, size)).cast("Q")[0::_WORDS].tolist()
    words = memoryview(data).cast("Q")
    ids, cgroups = words[0::_WORDS].tolist(), words[1::_WORDS].tolist()
    sent, received = words[_WORDS - 2 :: _WORDS].tolist(), words[_WORDS - 1 :: _WORDS].tolist()
    out: list[SocketTotals] = []
    for i, sid in enumerate(before):
        if not sid and not after[i]:
            continue
        if sid == ids[i] == after[i]:
            if sent[i] or received[i]:
                at = i * ct.sizeof(TcpSockSlot) + _PEER
                out.append(SocketTotals(sid, (cgroups[i], data[at : at + 16]), sent[i], received[i]))
            continue
        one = read_slot(slots[i])
        if one is not None:
            out.append(one)
    return out


def read_slot(slot: TcpSockSlot) -> SocketTotals | None:
    """One slot, field by field: the id, the counters, the id again, until both ids agree
    (None for a free slot, a socket that moved no byte, or a slot that changes owner under
    every read: the sockets that left it handed their bytes over, and the one that took it
    last is read by the next poll)."""
    sid = slot.id
    for _ in range(_READ_TRIES):
        if not sid:
            return None
        flow = (slot.flow.cgroup_id, bytes(slot.flow.peer))
        sent, received = slot.sent, slot.received
        again = slot.id
        if again == sid:
            return SocketTotals(sid, flow, sent, received) if sent or received else None
        sid = again
    return None


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
