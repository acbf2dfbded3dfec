"""The kernel's histogram bucketing (bpf/podnet.h podnet_hist_slot), run in the kernel
through BPF_PROG_TEST_RUN, against the exact bucket definition the exporter publishes."""

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
    """ns -> units of 2^-30 s, as the kernel converts them."""
    return (ns * 1125900) >> 20


def exact_slot(v: int) -> int:
    """Bucket of v (units of 2^-30 s) by the published definition: slot i covers
    (2^(i/4), 2^((i+1)/4)] units; integer arithmetic only (v^4 against powers of two)."""
    if v <= 1:
        return 0
    m = (v - 1).bit_length() - 1
    if m > MAX_OCTAVE:
        return HIST_SLOTS - 1
    j = max(k for k in range(4) if k == 0 or v**4 > 2 ** (4 * m + k))
    return 4 * m + j


def near_boundary(v: int) -> bool:
    """Within 2^-15 (relative) of an inner quarter-octave boundary, where the kernel's
    16-bit fixed-point comparison may round to the neighbour bucket."""
    if v <= 1:
        return False
    m = (v - 1).bit_length() - 1
    return any(abs(v / 2**m - 2 ** (k / 4)) < 2**-15 * 2 ** (k / 4) for k in (1, 2, 3))


def test_octave_edges_exact(slot_of) -> None:  # type: ignore[no-untyped-def]
    for m in range(0, MAX_OCTAVE + 2):
        for v in (2**m, 2**m + 1, 2 ** (m + 1) - 1, 2 ** (m + 1)):
            ns = -(-(v << 20) // 1125900)  # smallest ns with units(ns) >= v
            while units(ns) < v:
                ns += 1
            if units(ns) != v:
                continue
            assert slot_of(ns) == exact_slot(v), (m, v, ns)


@settings(max_examples=3000, deadline=None)
@given(st.integers(min_value=0, max_value=2**42))
def test_random_durations(slot_of, ns: int) -> None:  # type: ignore[no-untyped-def]
    v = units(ns)
    got = slot_of(ns)
    if near_boundary(v):
        assert abs(got - exact_slot(v)) <= 1
    else:
        assert got == exact_slot(v), (ns, v)


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
