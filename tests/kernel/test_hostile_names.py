"""Cgroup names of any bytes, end to end on the real kernel: a process in each such cgroup
sends 5 bytes over loopback; the exporter keeps polling, stays ready, and counts each
cgroup's bytes under its name made printable (exporter.pods.labelvalues). Any user with a
delegated cgroup subtree can create such names (cgroupfs refuses only "/" and newlines)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from exporter_proc import ExporterProcess
from podsim import cgroup2_mount

from exporter.pods.labelvalues import clean

FIXED = [
    b"pnbad\xff\xfename.service",  # the name that froze the exporter before
    b"pn\xc3\x28.scope",  # an invalid 2-byte sequence
    b'pn quote" back\\slash{}=,',  # what the exposition format escapes or might split on
    b"pn" + b"\xe2\x82\xac" * 80,  # valid UTF-8, longer than a label value may be
    b"pn" + bytes(range(0x80, 0x80 + 120)),  # long and invalid
]
SEND = 5


def names() -> list[bytes]:
    rng = random.Random(14)
    allowed = [b for b in range(1, 256) if b not in (0x0A, 0x2E, 0x2F)]  # no newline, ".", "/"
    out = list(FIXED)
    for _ in range(5):
        n = bytes(rng.choice(allowed) for _ in range(rng.randint(1, 40)))
        out.append(b"pnr" + n)
    return out


@pytest.fixture
def cgroups() -> Iterator[list[tuple[bytes, int]]]:
    root = cgroup2_mount()
    assert root is not None
    made: list[bytes] = []
    try:
        for name in names():
            path = os.path.join(os.fsencode(root), name)
            os.mkdir(path)
            made.append(path)
        yield [(os.path.basename(p), os.stat(p).st_ino) for p in made]
    finally:
        for p in made:
            for _ in range(50):
                try:
                    os.rmdir(p)
                    break
                except OSError:
                    time.sleep(0.1)


def send_from(cgroup_dir: bytes, port: int) -> None:
    """A child that joins the cgroup, then sends SEND bytes to the listener."""
    code = (
        "import os, socket, sys\n"
        "open(os.path.join(os.fsencode(sys.argv[1]), b'cgroup.procs'), 'w').write(str(os.getpid()))\n"
        f"s = socket.create_connection(('127.0.0.1', int(sys.argv[2])))\n"
        f"s.sendall(b'x' * {SEND})\n"
        "s.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, os.fsdecode(cgroup_dir), str(port)], check=True, timeout=30)


def test_cgroups_with_any_bytes_for_names_are_counted_and_polling_goes_on(
    cgroups: list[tuple[bytes, int]],
) -> None:
    root = cgroup2_mount()
    assert root is not None and shutil.which("python3")
    exp = ExporterProcess(["--poll-interval", "0.2"])
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    try:
        exp.wait_ready()
        for name, _ in cgroups:
            send_from(os.path.join(os.fsencode(root), name), srv.getsockname()[1])
            conn, _ = srv.accept()
            got = b""
            while len(got) < SEND and (chunk := conn.recv(64)):
                got += chunk
            conn.close()
        before = exp.scrape().value("podnet_exporter_polls_total")
        s = exp.fresh_scrape(polls=4)
        assert s.value("podnet_exporter_polls_total") >= before + 4, "polling goes on"
        assert exp.get("/readyz")[0] == 200
        assert s.value("podnet_exporter_errors_total") == 0, exp.log()
        for name, _ in cgroups:
            label = clean(os.fsdecode(name))
            assert s.value("podnet_tcp_sent_bytes_total", container=label, pod="") == SEND, (name, label)
        status, _, body = exp.get("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
        assert status == 200 and body.decode("utf-8")
    finally:
        srv.close()
        assert exp.stop() == 0, exp.log()
