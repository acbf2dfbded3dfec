"""Fixtures for the image test: the kernel tests' helpers (simulated pods, scrape parsing) are
reused from tests/kernel, put on sys.path as tests/kernel/conftest.py does."""

from __future__ import annotations

import os
import sys

_KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernel")
if _KERNEL_DIR not in sys.path:
    sys.path.insert(0, _KERNEL_DIR)

import pytest  # noqa: E402
from image_results import lines, save  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kernel: needs root, BPF and the real kernel")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    measured = lines()
    if measured:
        save()
        terminalreporter.section("podnet image measurements")
        for line in measured:
            terminalreporter.write_line(line)
