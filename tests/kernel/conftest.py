"""Fixtures for kernel tests: simulated pods on the real kernel (see podsim.py)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import podsim
from exporter_proc import ExporterProcess


def kernel_skip_reason() -> str | None:
    """Why kernel tests cannot run here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "kernel tests need Linux"
    if os.geteuid() != 0:
        return "kernel tests need root (network namespaces, cgroups, BPF)"
    if podsim.cgroup2_mount() is None:
        return "kernel tests need a cgroup2 mount (none in /proc/self/mountinfo)"
    if shutil.which("ip") is None:
        return "kernel tests need iproute2's `ip`"
    return None


_KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kernel: needs root, BPF and the real kernel")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/kernel `kernel`, and skip them all with one clear reason if needed."""
    reason = kernel_skip_reason()
    for item in items:
        if not str(item.path).startswith(_KERNEL_DIR + os.sep):
            continue
        item.add_marker(pytest.mark.kernel)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def cluster() -> Iterator[podsim.SimCluster]:
    """A fresh SimCluster (node netns + bridge); everything it made is removed afterwards."""
    reason = kernel_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    c = podsim.SimCluster()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def traffic_py() -> str:
    """Path of traffic.py (run it with podsim.traffic_argv(...) inside a pod)."""
    return podsim.TRAFFIC_PY


@pytest.fixture(scope="module")
def pods_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty PodList the module's exporter watches; tests rewrite it as they add pods."""
    path = tmp_path_factory.mktemp("pods") / "pods.json"
    path.write_text('{"apiVersion": "v1", "kind": "List", "items": []}')
    return str(path)


@pytest.fixture(scope="module")
def exporter(pods_file: str) -> Iterator[ExporterProcess]:
    """The real exporter, one per test module, polling every 0.3 s."""
    proc = ExporterProcess(["--pods-file", pods_file, "--poll-interval", "0.3"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()
