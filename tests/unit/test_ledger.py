"""exporter.metrics.ledger: totals from final and live pieces, peers classified once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.metrics.ledger import LOOPBACK, Ledger, decode_ledger, decode_raw, encode_ledger, encode_raw
from exporter.metrics.raw import CgroupCounters, KernelRead, RawData
from exporter.pods.identity import Identity

A = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
B = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 2])
BACKEND = ("shop", "backend", "pod")
LEDGER = ("billing", "ledger", "pod")
EXTERNAL = ("", "", "external")


def fixed(table: dict[bytes, tuple[str, str, str]]) -> Callable[[bytes], tuple[str, str, str]]:
    return lambda addr: table.get(addr, EXTERNAL)


def read(gen: int, live: dict | None = None, final: dict | None = None) -> KernelRead:  # type: ignore[type-arg]
    r = KernelRead(generation=gen)
    r.live.flows.update(live or {})
    r.final.flows.update(final or {})
    return r


def test_final_pieces_count_once_live_ones_are_shown_not_kept() -> None:
    ledger = Ledger()
    view = ledger.apply(read(5, live={(1, A, 4): (10, 1)}), fixed({A: BACKEND}))
    assert view.flows == {(1, BACKEND): (10, 1)}
    assert view.cgroups[1].sent == 10
    assert ledger.totals.flows == {}
    # The same piece, grown, now final: counted once, at its final value.
    view = ledger.apply(read(6, final={(1, A, 4): (15, 2)}), fixed({A: BACKEND}))
    assert view.flows == {(1, BACKEND): (15, 2)}
    assert ledger.totals.flows == {(1, BACKEND): (15, 2)}
    assert ledger.committed_through == 4
    view = ledger.apply(read(7), fixed({}))
    assert view.flows == {(1, BACKEND): (15, 2)}


def test_a_piece_keeps_the_peer_it_was_first_read_as() -> None:
    """The address changes owner between the piece's first read and its end: the bytes stay
    with the peer they flowed to."""
    ledger = Ledger()
    ledger.apply(read(5, live={(1, A, 4): (100, 0)}), fixed({A: BACKEND}))
    view = ledger.apply(read(6, final={(1, A, 4): (100, 0)}, live={(1, A, 6): (7, 0)}), fixed({A: LEDGER}))
    assert view.flows == {(1, BACKEND): (100, 0), (1, LEDGER): (7, 0)}


def test_a_deleted_peer_keeps_its_bytes_under_its_labels() -> None:
    ledger = Ledger()
    ledger.apply(read(5, final={(1, A, 3): (100, 0)}), fixed({A: BACKEND}))
    view = ledger.apply(read(6), fixed({}))  # the peer is gone from the pod store
    assert view.flows == {(1, BACKEND): (100, 0)}


def test_loopback_is_kept_as_the_owner_placeholder() -> None:
    ledger = Ledger()
    view = ledger.apply(read(5, live={(1, A, 5): (1, 1)}), lambda _: LOOPBACK)
    assert view.flows == {(1, LOOPBACK): (1, 1)}


def test_the_view_never_changes_the_totals() -> None:
    ledger = Ledger()
    ledger.apply(read(5, final={(1, A, 3): (100, 0)}), fixed({}))
    r = read(6, live={(1, A, 5): (5, 0)})
    r.live.cgroups[1] = CgroupCounters(opened=[1, 0])
    r.live.rtt[1] = {130: (1, 10)}
    view = ledger.apply(r, fixed({}))
    assert view.cgroups[1].sent == 105 and view.cgroups[1].opened == [1, 0]
    assert ledger.totals.cgroups[1].sent == 100 and ledger.totals.cgroups[1].opened == [0, 0]
    assert 1 not in ledger.totals.rtt


def test_dead_sockets_are_remembered_until_deleted() -> None:
    ledger = Ledger()
    ledger.apply(read(5, final={(1, A, -7): (3, 0)}), fixed({}))
    ledger.apply(read(6, final={(1, A, -8): (3, 0)}), fixed({}))
    assert ledger.committed_sockets == {7, 8}


def test_forget_and_seed_active() -> None:
    ledger = Ledger()
    r = read(5, final={(1, A, 3): (1, 0), (2, A, 3): (2, 0)})
    r.final.cgroups[1] = CgroupCounters(active=[3, 1])
    ledger.apply(r, fixed({}))
    ledger.name({1: Identity("a", "b", "c", "d", "e"), 2: Identity("f", "g", "h", "i", "j")})
    ledger.forget([2])
    assert set(ledger.names) == {1}
    assert set(ledger.totals.cgroups) == {1} and set(ledger.totals.flows) == {(1, EXTERNAL)}
    ledger.seed_active({1: (2, 0), 9: (0, 4)})
    assert ledger.totals.cgroups[1].active == [2, 0]
    assert ledger.totals.cgroups[9].active == [0, 4]


# ---- property: any interleaving of kernel counting and polls ----------------------------------------


class Kernel:
    """Counter maps keyed (cgroup, peer, generation): events add to the current generation;
    a poll advances it and hands over the entries two or more behind, deleting them."""

    def __init__(self) -> None:
        self.gen = 0
        self.entries: dict[tuple[int, bytes, int], list[int]] = {}
        self.truth: dict[tuple[int, bytes], int] = {}

    def count(self, cg: int, peer: bytes, n: int) -> None:
        self.entries.setdefault((cg, peer, self.gen), [0, 0])[0] += n
        self.truth[(cg, peer)] = self.truth.get((cg, peer), 0) + n

    def poll(self) -> KernelRead:
        self.gen += 1
        r = KernelRead(generation=self.gen)
        for key, (s, rcv) in list(self.entries.items()):
            if self.gen - key[2] >= 2:
                r.final.flows[key] = (s, rcv)
                del self.entries[key]
            else:
                r.live.flows[key] = (s, rcv)
        return r


events = st.lists(
    st.one_of(
        st.tuples(st.just("count"), st.integers(1, 3), st.sampled_from([A, B]), st.integers(1, 1000)),
        st.tuples(st.just("poll"), st.just(0), st.just(A), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(events)
def test_totals_are_monotonic_and_exact(steps: list[tuple[str, int, bytes, int]]) -> None:
    kernel, ledger = Kernel(), Ledger()
    shown: dict[tuple[int, bytes], int] = {}
    by_address = fixed({A: ("", "a", "pod"), B: ("", "b", "pod")})
    for kind, cg, peer, n in steps:
        if kind == "count":
            kernel.count(cg, peer, n)
            continue
        view = ledger.apply(kernel.poll(), by_address)
        now = {(c, A if p[1] == "a" else B): s for (c, p), (s, _) in view.flows.items()}
        for key, value in now.items():
            assert value >= shown.get(key, 0), "went backwards"
        assert now == {k: v for k, v in kernel.truth.items()}, "every byte, once, as soon as read"
        shown = now


# ---- saving ----------------------------------------------------------------------------------------

slots = st.dictionaries(
    st.integers(0, 163), st.tuples(st.integers(0, 2**64), st.integers(0, 2**70)), max_size=4
)
counters = st.builds(
    CgroupCounters,
    sent=st.integers(0, 2**64),
    received=st.integers(0, 2**64),
    opened=st.lists(st.integers(0, 99), min_size=2, max_size=2),
    active=st.lists(st.integers(-5, 5), min_size=2, max_size=2),
)
labels = st.tuples(
    st.text(max_size=5), st.text(max_size=5), st.sampled_from(["pod", "node", "external", "loopback"])
)


@st.composite
def raws(draw: st.DrawFn) -> RawData:
    raw = RawData()
    for cg in draw(st.lists(st.integers(-5, 2**40), max_size=4, unique=True)):
        raw.cgroups[cg] = draw(counters)
        for peer in draw(st.lists(labels, max_size=3, unique=True)):
            raw.flows[(cg, peer)] = (draw(st.integers(0, 2**64)), draw(st.integers(0, 2**64)))
        raw.rtt[cg] = draw(slots)
        raw.connect[cg] = draw(slots)
        raw.requests[cg] = {(1, 2, 3, 2, 0): draw(slots), (1, 4, 2, 2, 6): draw(slots)}
    return raw


def plain(raw: RawData) -> tuple[object, ...]:
    return (dict(raw.cgroups), raw.flows, dict(raw.rtt), dict(raw.connect), dict(raw.requests))


@given(raws())
def test_raw_data_survives_encoding(raw: RawData) -> None:
    assert plain(decode_raw(encode_raw(raw))) == plain(raw)


def test_ledger_survives_encoding() -> None:
    ledger = Ledger()
    ledger.apply(read(9, live={(1, A, 8): (1, 2), (1, B, -4): (3, 4)}, final={(1, A, 6): (5, 6)}), fixed({}))
    ledger.name(
        {1: Identity("shop", "web-1", "app", "web", "Deployment", "uid-1"), 2: Identity("", "", "x", "", "")}
    )
    again = decode_ledger(encode_ledger(ledger))
    assert again.names == ledger.names
    assert again.peers == ledger.peers
    assert again.committed_through == 7 and again.committed_sockets == ledger.committed_sockets
    assert plain(again.totals) == plain(ledger.totals)


GOOD = {
    "cgroups": {1: tuple(range(15))},
    "flows": {(1, ("a", "b", "pod")): (1, 2)},
    "rtt": {1: {130: (1, 2)}},
    "connect": {},
    "requests": {1: {(1, 2, 3, 2, 0): {130: (1, 2)}}},
}


def test_totals_saved_before_grpc_status_read_as_none() -> None:
    """Totals saved before the gRPC status code existed have four request codes."""
    old = {**GOOD, "requests": {1: {(1, 2, 3, 2): {130: (1, 2)}}}}
    assert decode_raw(old).requests == {1: {(1, 2, 3, 2, 0): {130: (1, 2)}}}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cgroups", {1: (1, 2, 3)}),
        ("cgroups", {"1": tuple(range(15))}),
        ("cgroups", {1: (*range(14), "x")}),
        ("cgroups", [1, 2]),
        ("flows", {(1, ("a", "b")): (1, 2)}),
        ("flows", {(1, ("a", "b", 3)): (1, 2)}),
        ("flows", {(1, ("a", "b", "c")): (1, 2, 3)}),
        ("flows", {1: (1, 2)}),
        ("rtt", {1: {130: (1, 2.5)}}),
        ("rtt", {1: {130: 1}}),
        ("requests", {1: {(1, 2, 3): {130: (1, 2)}}}),
        ("requests", {1: {(1, 2, 3, 4, 5, 6): {130: (1, 2)}}}),
        ("requests", {1: [1]}),
    ],
)
def test_malformed_saved_data_is_refused(field: str, value: object) -> None:
    assert plain(decode_raw(GOOD)) is not None
    with pytest.raises(ValueError, match="malformed"):
        decode_raw({**GOOD, field: value})
    with pytest.raises(ValueError, match="malformed"):
        decode_raw({k: v for k, v in GOOD.items() if k != field})
