"""The kernel's histogram bucketing (bpf/podnet.h podnet_hist_slot), run in the kernel
through BPF_PROG_TEST_RUN over the whole u64 range of durations, against the exact bucket
definition the exporter publishes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bpf_testrun import run_raw_tp
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.kernel.headers import find_tree
from exporter.kernel.offsets import CORE_FIELDS
from exporter.kernel.programs import BPF_DIR
from exporter.metrics.histogram import HIST_INDEX_OFFSET, HIST_SLOTS
from exporter.metrics.model import BucketLayout

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hist_bounds import slot_upper_bound  # lives in tests/, shared with the unit tests

HERE = Path(__file__).resolve().parent
MAX_OCTAVE = 40
LAST_SLOT = HIST_SLOTS - 1
U64_MAX = 2**64 - 1
EARLY_RETURN_NS = 2**41
"""podnet_hist_slot returns the last slot for every ns >= this, before it multiplies."""
WRAP_NS = U64_MAX // 1125900 + 1
"""First ns at which the kernel's ns * 1125900 would wrap u64 (4.55 hours)."""


@pytest.fixture(scope="module")
def slot_of() -> Iterator[object]:
    from bcc import BPF

    headers = find_tree()
    assert headers.ok, headers.reason
    headers.use()
    # The probe touches no struct field: dummy offsets satisfy podnet.h.
    cflags = [f"-I{BPF_DIR}", *(f"-D{f.macro}=0" for f in CORE_FIELDS)]
    b = BPF(src_file=str(HERE / "hist_probe.bpf.c").encode(), cflags=cflags)
    fn = b.load_func(b"hist_slot_of", BPF.RAW_TRACEPOINT)
    yield lambda ns: run_raw_tp(fn.fd, ns)
    b.cleanup()


def units(ns: int) -> int:
    """ns -> whole units of 2^-30 s (floored), exactly: ns * 2^30 / 10^9 in integers, for
    any ns. (The kernel approximates the factor; kernel_slots() bounds the difference.)"""
    return (ns << 30) // 10**9


def exact_slot(v: int) -> int:
    """Bucket of v (units of 2^-30 s) by the published definition: slot i covers
    (2^(i/4), 2^((i+1)/4)] units, slot 0 also everything shorter, the last slot everything
    longer; integer arithmetic only (v^4 against powers of two), for any v."""
    if v <= 1:
        return 0
    m = (v - 1).bit_length() - 1
    if m > MAX_OCTAVE:
        return LAST_SLOT
    j = max(k for k in range(4) if k == 0 or v**4 > 2 ** (4 * m + k))
    return 4 * m + j


def first_units_of_slot(i: int) -> int:
    """Smallest whole number of units in slot i >= 1 by the definition: v^4 > 2^i."""
    v = 1 << (i // 4)  # 2^(i//4) <= 2^(i/4)
    while v**4 <= 2**i:
        v += 1 + (v >> 20)  # coarse steps, then back off
    while v > 1 and (v - 1) ** 4 > 2**i:
        v -= 1
    return v


def first_ns_of_slot(i: int) -> int:
    """Smallest ns whose units() are in slot i or above (the definition's edge in ns)."""
    v = first_units_of_slot(i)
    return -(-(v * 10**9) >> 30)  # ceil(v * 10^9 / 2^30)


def near_quarter_edge(v: int) -> bool:
    """Within 2^-15 (relative) of an inner quarter-octave edge of a real slot, where the
    kernel's 16-bit fixed-point comparison (thresholds rounded up, fraction floored) may put
    v one slot low. Octave edges are exact (bit length); above the last slot there are none."""
    if v <= 1:
        return False
    m = (v - 1).bit_length() - 1
    if m > MAX_OCTAVE:
        return False
    return any(abs(v / 2**m - 2 ** (k / 4)) < 2**-15 * 2 ** (k / 4) for k in (1, 2, 3))


def kernel_slots(ns: int) -> range:
    """Slots podnet_hist_slot(ns) may return: exact_slot(units(ns)), or the one above when
    the kernel's conversion (1125900 / 2^20 for 2^30 / 10^9: high by 8.3e-8 < 2^-23,
    relative, then floored) crosses an edge, or the one below near a quarter-octave edge."""
    v = units(ns)
    v_high = ((ns << 30) * (2**23 + 1)) // (10**9 << 23)  # floor(exact * (1 + 2^-23))
    lo = exact_slot(v) - near_quarter_edge(v)
    return range(lo, exact_slot(v_high) + 1)


def check(slot_of, ns: int) -> int:  # type: ignore[no-untyped-def]
    got = slot_of(ns)
    allowed = kernel_slots(ns)
    assert got in allowed, (ns, units(ns), got, list(allowed))
    return int(got)


# ---- the reference itself -------------------------------------------------------------


def test_reference_is_exact() -> None:
    assert units(10**9) == 2**30 and units(U64_MAX) == (U64_MAX << 30) // 10**9
    assert units(18_000 * 10**9) == 18_000 * 2**30
    assert [exact_slot(v) for v in (0, 1, 2, 3, 4, 5)] == [0, 0, 3, 6, 7, 9]
    for i in range(1, HIST_SLOTS):
        v = first_units_of_slot(i)
        assert v**4 > 2**i >= (v - 1) ** 4
        assert exact_slot(v) >= i and (v - 1 <= 1 or exact_slot(v - 1) < i)
    # The last slot starts at 2^(MAX_OCTAVE + 3/4) units = 2^10.75 s and takes everything
    # longer: beyond 2^41 units (2048 s), the end of its octave, as well.
    assert exact_slot(first_units_of_slot(LAST_SLOT)) == LAST_SLOT
    assert exact_slot(first_units_of_slot(LAST_SLOT) - 1) == LAST_SLOT - 1
    assert 1722 * 10**9 < first_ns_of_slot(LAST_SLOT) < 1723 * 10**9
    assert exact_slot(2**41) == exact_slot(2**41 + 1) == exact_slot(units(U64_MAX)) == LAST_SLOT
    # Past the early return the last slot is certain; below it the kernel cannot wrap.
    assert units(EARLY_RETURN_NS) > 2**41 and (EARLY_RETURN_NS - 1) * 1125900 < 2**62 < WRAP_NS * 1125900


# ---- the kernel ------------------------------------------------------------------------


def test_slot_edges(slot_of) -> None:  # type: ignore[no-untyped-def]
    """Either side of every slot's lower edge: exact a margin away, within kernel_slots() at it."""
    for i in range(1, HIST_SLOTS):
        edge = first_ns_of_slot(i)
        margin = (units(edge) >> 14) + 4  # ns; past the fixed-point band and the conversion slack
        for ns in (edge - 1, edge):
            if ns >= 0:
                check(slot_of, ns)
        below, above = max(0, edge - margin), edge + margin
        for ns in (below, above):
            assert len(kernel_slots(ns)) == 1, (i, ns)
        assert check(slot_of, below) < i <= check(slot_of, above), i


LAST_EDGE_NS = first_ns_of_slot(LAST_SLOT)
EXTREMES = sorted(
    {
        0,
        1,
        1_000_000,
        18_000 * 10**9,  # 5 hours
        LAST_EDGE_NS - (LAST_EDGE_NS >> 14),  # the last slot's lower edge, past the band...
        LAST_EDGE_NS - 1,  # ...and at it
        LAST_EDGE_NS,
        LAST_EDGE_NS + (LAST_EDGE_NS >> 14),
        2048 * 10**9 - 1,  # 2^41 units, the end of the last octave
        2048 * 10**9,
        2048 * 10**9 + 1,
        EARLY_RETURN_NS - 1,  # the kernel's early return
        EARLY_RETURN_NS,
        EARLY_RETURN_NS + 1,
        WRAP_NS - 1,  # where ns * 1125900 would wrap
        WRAP_NS,
        2**44 + 1,
        U64_MAX - 1,
        U64_MAX,
        *(2**k for k in range(64)),
        *(2**k - 1 for k in range(1, 65)),
    }
)


@pytest.mark.parametrize("ns", EXTREMES)
def test_extremes(slot_of, ns: int) -> None:  # type: ignore[no-untyped-def]
    got = check(slot_of, ns)
    if ns >= LAST_EDGE_NS + (LAST_EDGE_NS >> 14):
        assert got == LAST_SLOT, ns
    if ns <= LAST_EDGE_NS - (LAST_EDGE_NS >> 14):
        assert got < LAST_SLOT, ns


# Every magnitude equally often (a plain draw from [0, 2^64) is almost always > 2^41),
# plus plain draws over the whole range.
DURATIONS = st.one_of(
    st.integers(min_value=0, max_value=U64_MAX),
    st.integers(min_value=0, max_value=63).flatmap(lambda b: st.integers(2**b, 2 ** (b + 1) - 1)),
)


@settings(max_examples=3000, deadline=None)
@given(DURATIONS)
def test_random_durations(slot_of, ns: int) -> None:  # type: ignore[no-untyped-def]
    check(slot_of, ns)


def test_slot_bounds_match_model() -> None:
    # The exporter's upper bound of slot i is 2^((i-119)/4) s; in units that is
    # 2^((i+1)/4), the same definition exact_slot() implements.
    for i in range(1, HIST_SLOTS - 1):
        assert slot_upper_bound(i) == pytest.approx(2 ** ((i + 1) / 4) * 2**-30)
    assert HIST_INDEX_OFFSET == 120


def test_one_millisecond_lands_in_its_bucket(slot_of) -> None:  # type: ignore[no-untyped-def]
    slot = slot_of(1_000_000)
    lo, hi = slot_upper_bound(slot - 1), slot_upper_bound(slot)
    assert lo < 1e-3 <= hi
    cum = dict(BucketLayout(scale=0).cumulative(((slot, 1),)))
    assert cum[2.0**-9] == 1 and cum[2.0**-10] == 0
