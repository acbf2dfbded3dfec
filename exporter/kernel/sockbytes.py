"""Per-flow byte totals from per-socket counters (the tp_btf build of bpf/tcp_traffic.bpf.c).

There each socket counts its own bytes in a slot of the `tcp_sock_slots` array, so a send
or receive updates no shared map. The poller reads the slots in place (the array is
mapped into memory), and a socket that dies hands its totals over once, in the
`tcp_sock_final` map, under the id of its state, before it clears the slot's id. A
socket's bytes are therefore in exactly one place, except while a poll reads a slot at
the instant of its hand-over: then the poll finds it in both, with the same id, and
counts it once (exporter.kernel.maps). Dead sockets' totals go to the exporter's
totals (exporter.metrics.ledger).
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Iterable
from typing import NamedTuple

from exporter.kernel.bpf_structs import TcpFlowKey, TcpSockSlot
from exporter.metrics.raw import FlowSource

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


def socket_counts(
    live: Iterable[SocketTotals], finals: Iterable[SocketTotals], committed: frozenset[int]
) -> tuple[dict[FlowSource, tuple[int, int]], dict[FlowSource, tuple[int, int]]]:
    """(live pieces, final pieces) of per-socket counts, keyed (owner, peer, -socket id).
    A socket handed over while the poll read its slot is in both lists: its final totals
    count. `committed`: dead sockets already in the exporter's totals (not counted again)."""
    final: dict[FlowSource, tuple[int, int]] = {}
    handed: set[int] = set()
    for f in finals:
        handed.add(f.id)
        if f.id not in committed:
            final[(f.flow[0], f.flow[1], -f.id)] = (f.sent, f.received)
    pieces = {(s.flow[0], s.flow[1], -s.id): (s.sent, s.received) for s in live if s.id not in handed}
    return pieces, final
