"""exporter.kernel.kernel_probe: the verdict line built from probe results (the probes themselves
run on the real kernel in tests/kernel/test_programs.py)."""

from __future__ import annotations

import pytest

from exporter.kernel.kernel_probe import Probe, preferred_build_refused


@pytest.mark.parametrize(
    ("probes", "expected"),
    [
        ([], ""),
        ([Probe("tp_btf program on x"), Probe("stack map")], ""),
        (
            [Probe("tp_btf program on x", "kernel refused program podnet_probe: Operation not permitted")],
            "tp_btf program on x refused: kernel refused program podnet_probe: Operation not permitted",
        ),
        (
            [Probe("a", "no"), Probe("b"), Probe("c", "creating it failed: Invalid argument")],
            "a refused: no; c refused: creating it failed: Invalid argument",
        ),
    ],
)
def test_refusal_line(probes: list[Probe], expected: str) -> None:
    assert preferred_build_refused(probes) == expected
    assert all(p.ok == (not p.refused) for p in probes)
