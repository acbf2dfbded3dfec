"""exporter.kernel.sockbytes with exporter.metrics.ledger: per-flow totals from live sockets
and dead sockets' hand-overs.

The kernel side is modelled: each socket counts its bytes in its slot, hands its totals
over once when it dies (then its slot is given back), and a poll reads live slots first
(skipping those given back) and hand-overs second, with anything allowed to happen in
between."""

from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.kernel.bpf_structs import TcpSockSlot
from exporter.kernel.sockbytes import SocketTotals, read_slot, read_slots, socket_counts
from exporter.metrics.ledger import Ledger
from exporter.metrics.raw import KernelRead

PEER_A = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
PEER_B = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 2])


class SocketBytes:
    """The exporter's path for per-socket counts: socket_counts, then the ledger."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.gen = 0

    def fold(
        self, live: list[SocketTotals], finals: list[SocketTotals]
    ) -> dict[tuple[int, bytes], tuple[int, int]]:
        pieces, final = socket_counts(live, finals, self.ledger.committed_sockets)
        self.gen += 1
        read = KernelRead(generation=self.gen)
        read.live.flows.update(pieces)
        read.final.flows.update(final)
        raw = self.ledger.apply(read, lambda addr: ("", addr.hex(), "address"))
        self.ledger.committed_sockets = frozenset()  # the poller deleted them
        return {(cg, bytes.fromhex(peer[1])): v for (cg, peer), v in raw.flows.items()}


def t(sid: int, cg: int, peer: bytes, sent: int, received: int = 0) -> SocketTotals:
    return SocketTotals(sid, (cg, peer), sent, received)


def slot(sid: int, cg: int = 0, peer: bytes = bytes(16), sent: int = 0, received: int = 0) -> TcpSockSlot:
    return TcpSockSlot(sid, (cg, (ct.c_uint8 * 16)(*peer)), sent, received)


@pytest.mark.parametrize(
    ("slots", "high_water", "expected"),
    [
        ([], 0, []),
        # free slots (id 0) and sockets that moved no byte yet are not listed
        ([slot(0), slot(3, 5, PEER_A, 10, 2), slot(4, 5, PEER_A)], 3, [t(3, 5, PEER_A, 10, 2)]),
        # nothing at or above the high-water mark is read, even a stale id
        ([slot(3, 5, PEER_A, 10), slot(9, 6, PEER_B, 1)], 1, [t(3, 5, PEER_A, 10)]),
        # a high-water mark beyond the array reads the whole array
        ([slot(3, 5, PEER_B, 0, 7)], 10, [t(3, 5, PEER_B, 0, 7)]),
    ],
)
def test_read_slots_table(slots: list[TcpSockSlot], high_water: int, expected: list[SocketTotals]) -> None:
    assert read_slots((TcpSockSlot * len(slots))(*slots), high_water) == expected


class _Changing:
    """A slot whose owner changes as it is read: the ids the reader sees, in order."""

    def __init__(self, ids: list[int], cg: int, sent: int) -> None:
        self._ids = ids
        self.flow = slot(0, cg, PEER_A).flow
        self.sent, self.received = sent, 0

    @property
    def id(self) -> int:
        return self._ids.pop(0) if len(self._ids) > 1 else self._ids[0]


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([7, 7], [t(7, 5, PEER_A, 40)]),  # steady
        ([7, 8, 8], [t(8, 5, PEER_A, 40)]),  # taken over between the two id reads: read again
        ([7, 0], []),  # given back while read: its bytes are in the hand-over
        ([1, 2, 3, 4, 5, 6, 7], []),  # changing owner under every read: left to the next poll
    ],
)
def test_read_slot_rereads_a_slot_that_changed_owner(ids: list[int], expected: list[SocketTotals]) -> None:
    assert [read_slot(_Changing(ids, 5, 40))] == (expected or [None])  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=16)), max_size=40))
def test_read_slots_bulk_path_matches_field_by_field(cells: list[tuple[int, bytes]]) -> None:
    """The bulk copy decodes every slot exactly as reading it field by field does."""
    slots = (TcpSockSlot * len(cells))(
        *(slot(i % 3 and i + 1, v, peer, v >> 3, v >> 7) for i, (v, peer) in enumerate(cells))
    )
    expected = [r for r in map(read_slot, slots) if r is not None]
    assert read_slots(slots, len(cells)) == expected


@pytest.mark.parametrize(
    ("polls", "expected"),
    [
        # live only, growing
        ([([t(1, 5, PEER_A, 10)], []), ([t(1, 5, PEER_A, 30)], [])], [30]),
        # dies between polls: its hand-over carries the final value
        ([([t(1, 5, PEER_A, 10)], []), ([], [t(1, 5, PEER_A, 40)])], [40]),
        # handed over during the read: seen in both, counted once (the final value)
        ([([t(1, 5, PEER_A, 10)], [t(1, 5, PEER_A, 10)])], [10]),
        # two sockets of one flow, one dead, one alive
        ([([t(2, 5, PEER_A, 7)], [t(1, 5, PEER_A, 10)]), ([t(2, 5, PEER_A, 9)], [])], [19]),
    ],
)
def test_fold_table(polls: list[tuple[list[SocketTotals], list[SocketTotals]]], expected: list[int]) -> None:
    sb = SocketBytes()
    out = {}
    for live, finals in polls:
        out = sb.fold(live, finals)
    assert [out[(5, PEER_A)][0]] == expected


def test_a_restart_between_save_and_delete_counts_each_dead_socket_once() -> None:
    """The hand-overs read by the last poll may still be in the kernel after a restart:
    the saved ledger lists them, and they are not added again."""
    before = SocketBytes()
    before.fold([], [t(1, 5, PEER_A, 10)])
    after = SocketBytes()
    after.ledger.totals = before.ledger.totals
    after.ledger.committed_sockets = frozenset({1})
    after.gen = before.gen
    pieces, final = socket_counts(
        [], [t(1, 5, PEER_A, 10), t(2, 5, PEER_A, 5)], after.ledger.committed_sockets
    )
    assert pieces == {} and list(final) == [(5, PEER_A, -2)]


# ---- model-based: any interleaving of kernel events and polls --------------------------------------


@dataclass
class Sock:
    flow: tuple[int, bytes]
    sent: int = 0
    received: int = 0
    storage: bool = True  # its socket-local storage exists
    handed: bool = False  # its totals were written to the hand-over map


@dataclass
class Kernel:
    socks: dict[int, Sock] = field(default_factory=dict)
    finals: dict[int, SocketTotals] = field(default_factory=dict)

    def apply(self, op: tuple[str, int, int]) -> None:
        kind, sid, n = op
        s = self.socks.get(sid)
        if kind == "bytes":
            if s is None:
                s = self.socks[sid] = Sock((sid % 3, PEER_A if sid % 2 else PEER_B))
            if not s.handed:
                s.sent += n
                s.received += n // 2
        elif kind == "die" and s is not None and not s.handed:
            s.handed = True
            self.finals[sid] = SocketTotals(sid, s.flow, s.sent, s.received)
        elif kind == "free" and s is not None and s.handed:
            s.storage = False

    def live(self) -> list[SocketTotals]:
        # The iterator skips storages flagged at hand-over.
        shown = [(i, s) for i, s in self.socks.items() if s.storage and not s.handed]
        return [SocketTotals(i, s.flow, s.sent, s.received) for i, s in shown]

    def take_finals(self) -> list[SocketTotals]:
        out = list(self.finals.values())
        self.finals.clear()
        return out

    def truth(self) -> dict[tuple[int, bytes], tuple[int, int]]:
        out: dict[tuple[int, bytes], tuple[int, int]] = {}
        for s in self.socks.values():
            a, b = out.get(s.flow, (0, 0))
            out[s.flow] = (a + s.sent, b + s.received)
        return out


Op = tuple[str, int, int]


def nonzero(flows: dict[tuple[int, bytes], tuple[int, int]]) -> dict[tuple[int, bytes], tuple[int, int]]:
    return {f: v for f, v in flows.items() if v != (0, 0)}


op = st.tuples(st.sampled_from(["bytes", "bytes", "die", "free"]), st.integers(1, 8), st.integers(1, 1000))
step = st.one_of(
    op.map(lambda o: ("op", [o])),
    st.lists(op, max_size=4).map(lambda ops: ("poll", ops)),  # ops happen between the two reads
)


@settings(max_examples=400)
@given(st.lists(step, max_size=40))
def test_any_interleaving_is_monotonic_and_exact_when_quiet(steps: list[tuple[str, list[Op]]]) -> None:
    kernel, sb = Kernel(), SocketBytes()
    seen: dict[tuple[int, bytes], tuple[int, int]] = {}
    for kind, ops in steps:
        if kind == "op":
            kernel.apply(ops[0])
            continue
        live = kernel.live()
        for o in ops:
            kernel.apply(o)
        out = sb.fold(live, kernel.take_finals())
        truth = kernel.truth()
        for flow, (sent, received) in out.items():
            before = seen.get(flow, (0, 0))
            assert sent >= before[0] and received >= before[1], "went backwards"
            assert sent <= truth[flow][0] and received <= truth[flow][1], "counted twice"
        seen = out
        if not ops:  # nothing moved during the read: exact
            assert nonzero(out) == nonzero(truth)
