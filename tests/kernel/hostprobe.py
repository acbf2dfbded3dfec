"""What this host allows, probed once per test session (exporter.kernel.kernel_probe): tests
expect the build the host can load, not the build of the machine they were written on."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest

from exporter.kernel.btf import Btf
from exporter.kernel.kernel_probe import preferred_build_refused, probe_preferred_build


@functools.cache
def preferred_refused() -> str:
    """Empty when the hot path's preferred build (tp_btf) can load here, else why not."""
    return preferred_build_refused(probe_preferred_build(Btf.load()))


def require_preferred_build() -> None:
    """Skip a test of the preferred build's own mechanics on a host that refuses it."""
    why = preferred_refused()
    if why:
        pytest.skip(f"this host refuses the preferred build: {why}")


def refusal_under(prefix: list[str]) -> str:
    """preferred_refused() as a process started with `prefix` (e.g. setpriv dropping
    capabilities) sees it."""
    code = (
        "from exporter.kernel.btf import Btf; from exporter.kernel.kernel_probe import *; "
        "print(preferred_build_refused(probe_preferred_build(Btf.load())))"
    )
    run = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return run.stdout.strip()
