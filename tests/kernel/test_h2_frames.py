"""The HTTP/2 frame walker and HPACK decoder against hand-made conversations (h2_frames.py):
every stream counted once on each side, with the method, status class, protocol and gRPC
status the bytes carry, however the bytes are cut into iovecs and syscalls."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_maps import Totals
from podsim import SimCluster
from test_programs import free_port, load

from exporter.kernel.btf import Btf
from exporter.kernel.programs import LoadedPrograms, MapSizes
from exporter.metrics.snapshot import request_labels

FRAMES = str(Path(__file__).resolve().parent / "h2_frames.py")


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf.load()


@pytest.fixture(scope="module")
def progs(btf: Btf) -> Iterator[LoadedPrograms]:
    p = load(btf)
    yield p
    p.close()


def converse(
    progs: LoadedPrograms, cluster: SimCluster, scenario: str, how_write: str, how_read: str
) -> None:
    cg_dir, cg_id = cluster.host_cgroup(
        f"/system.slice/{cluster.tag}-h2-{scenario}-{how_write}-{how_read}.service"
    )
    argv = [sys.executable, FRAMES, scenario, how_write, how_read, str(free_port())]
    p = cluster.cgroup_popen(cg_dir, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()
    streams = [tuple(s) for s in json.loads(out)]
    want = Counter(
        (role, protocol, method, status, grpc)
        for method, status, protocol, grpc in streams
        for role in ("server", "client")
    )
    got: Counter[tuple[str, ...]] = Counter()
    reader = Totals(progs)
    for codes, slots in reader.read().requests.get(cg_id, {}).items():
        got[request_labels(*codes)] += sum(n for n, _ in slots.values())
    assert got == want
    failures = {k: v for k, v in reader.read().map_failures.items() if k.startswith("h2_") and v}
    assert not failures


@pytest.mark.parametrize("scenario", ["basic", "shapes", "grpc", "reset"])
def test_each_stream_counts_once_with_what_it_carries(
    progs: LoadedPrograms, cluster: SimCluster, scenario: str
) -> None:
    converse(progs, cluster, scenario, "whole", "whole")


@pytest.mark.parametrize(
    ("how_write", "how_read"), [("iovecs", "iovecs"), ("bytes", "bytes"), ("iovecs", "bytes")]
)
@pytest.mark.parametrize("scenario", ["shapes", "grpc"])
def test_frames_cut_anywhere_read_the_same(
    progs: LoadedPrograms, cluster: SimCluster, scenario: str, how_write: str, how_read: str
) -> None:
    # Frame headers and header blocks split across iovecs and across syscalls, on both the
    # sending and the receiving side.
    converse(progs, cluster, scenario, how_write, how_read)


def test_raw_tracepoint_build_walks_the_same(btf: Btf, cluster: SimCluster) -> None:
    raw = load(btf, build="raw")
    try:
        converse(raw, cluster, "grpc", "iovecs", "iovecs")
    finally:
        raw.close()


def test_parser_state_is_bounded_and_its_losses_counted(btf: Btf, cluster: SimCluster) -> None:
    # Maps for 512 owners: room for the parser state of 64 connection directions. 50 connections
    # (100 sockets) all asking before any is answered, twice, need 200: the least recently
    # used are evicted, a connection whose state is gone counts nothing more, and each loss
    # is counted, never a wrong number.
    small = load(btf, sizes=MapSizes(512))
    try:
        cg_dir, cg_id = cluster.host_cgroup(f"/system.slice/{cluster.tag}-h2-many.service")
        argv = [sys.executable, FRAMES, "basic", "whole", "whole", str(free_port()), "50"]
        p = cluster.cgroup_popen(cg_dir, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        read = Totals(small).read()
        counted: Counter[tuple[str, ...]] = Counter()
        for codes, slots in read.requests.get(cg_id, {}).items():
            counted[request_labels(*codes)] += sum(n for n, _ in slots.values())
        assert read.map_failures["h2_conn_dirs"] > 0
        # What was counted is right: only whole streams, with their own labels.
        per_connection = Counter(
            (r, "http2", m, st, g) for m, st, _, g in json.loads(out)[:3] for r in ("server", "client")
        )
        assert set(counted) <= set(per_connection)
        assert 0 < sum(counted.values()) < 50 * 4 * 2, read.map_failures
    finally:
        small.close()
