"""exporter.kernel.sockdiag on the real kernel: connections that exist in a simulated pod's netns.

Two simulated pods share one network namespace (podsim add_pod + add_pod_in_netns): the server
pod listens (dual-stack on ::, and IPv4 on its pod address), the client pod connects to it over
127.0.0.1, ::1 and the pod address. Both report the SO_COOKIE of every socket they hold, so the
test knows exactly which cookie must be inbound (server's cgroup) and which outbound (client's).
All traffic stays inside that namespace.
"""

from __future__ import annotations

import errno
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import podsim
import pytest

from exporter.kernel import sockdiag
from exporter.kernel.sockdiag import SockDiagError, TcpSocket

PER_TARGET = 3  # connections per (address, listener) pair; three pairs

_COOKIE = """
import json, socket, struct, sys
def cookie(s):
    return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, 57, 8))[0]  # SO_COOKIE
def say(**kw):
    print(json.dumps(kw), flush=True)
"""

SERVER = (
    _COOKIE
    + """
import selectors
sel = selectors.DefaultSelector()
dual = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
v4 = socket.create_server((sys.argv[1], 0))
for s in (dual, v4):
    sel.register(s, selectors.EVENT_READ, "listen")
sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
say(dual=dual.getsockname()[1], v4=v4.getsockname()[1])
while True:
    for key, _ in sel.select():
        if key.data == "stdin":
            if not sys.stdin.readline():
                sys.exit(0)
        elif key.data == "listen":
            c, _ = key.fileobj.accept()
            sel.register(c, selectors.EVENT_READ, "conn")
            say(accepted=cookie(c), peer_port=c.getpeername()[1])
        else:
            if not key.fileobj.recv(100):  # the client closed: close too
                sel.unregister(key.fileobj)
                ck = cookie(key.fileobj)
                key.fileobj.close()
                say(closed=ck)
"""
)

CLIENT = (
    _COOKIE
    + """
targets = json.loads(sys.argv[1])
conns = []
for host, port in targets:
    s = socket.create_connection((host, port), timeout=5)
    conns.append(s)
    say(cookie=cookie(s), local_port=s.getsockname()[1])
say(done=True)
for line in sys.stdin:
    i = int(line)
    ck = cookie(conns[i])
    conns[i].close()
    say(closed=ck)
"""
)


class Peer:
    """A script running in a pod, talking JSON lines on stdout and taking lines on stdin."""

    def __init__(self, pod: podsim.SimPod, script: str, *args: str) -> None:
        self.proc = pod.popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._buf = b""

    def read(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next JSON line (read unbuffered: select() does not see a file object's buffer)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                self.proc.kill()
                _, err = self.proc.communicate(timeout=5)
                raise AssertionError(f"peer said nothing within {timeout} s; stderr:\n{err.decode()[-2000:]}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        result: dict[str, Any] = json.loads(line)
        return result

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=5)


def _thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.fixture
def pods(cluster: podsim.SimCluster) -> Iterator[dict[str, Any]]:
    """Server and client pods in one netns, with PER_TARGET * 3 connections between them."""
    srv = cluster.add_pod("sockdiag-server")
    cli = cluster.add_pod_in_netns(srv, "sockdiag-client")
    assert srv.cgroup_id != cli.cgroup_id
    server = Peer(srv, SERVER, srv.ip)
    client: Peer | None = None
    try:
        ports = server.read()
        targets = [("127.0.0.1", ports["dual"]), ("::1", ports["dual"]), (srv.ip, ports["v4"])]
        client = Peer(cli, CLIENT, json.dumps(targets * PER_TARGET))
        out: dict[int, int] = {}  # client cookie -> local port
        while "done" not in (msg := client.read()):
            out[msg["cookie"]] = msg["local_port"]
        n = len(targets) * PER_TARGET
        accepted: dict[int, int] = {}  # client's local port -> server's cookie
        while len(accepted) < n:
            msg = server.read()
            accepted[msg["peer_port"]] = msg["accepted"]
        assert len(out) == n and set(accepted) == set(out.values())
        yield {
            "srv": srv,
            "cli": cli,
            "server": server,
            "client": client,
            "n": n,
            "outbound": list(out),  # in connection order
            "inbound": [accepted[out[c]] for c in out],  # same order: inbound[i] is outbound[i]'s peer
        }
    finally:
        server.stop()
        if client is not None:
            client.stop()


def _expected(pods: dict[str, Any], skip: frozenset[int] = frozenset()) -> set[TcpSocket]:
    ino = pods["srv"].netns_inode
    return {
        TcpSocket(cookie=c, cgroup_id=pods["cli"].cgroup_id, inbound=False, netns=ino)
        for i, c in enumerate(pods["outbound"])
        if i not in skip
    } | {
        TcpSocket(cookie=c, cgroup_id=pods["srv"].cgroup_id, inbound=True, netns=ino)
        for i, c in enumerate(pods["inbound"])
        if i not in skip
    }


def test_established_sockets_of_a_pod_netns(pods: dict[str, Any]) -> None:
    srv = pods["srv"]
    before = _thread_netns()
    got = sockdiag.established_sockets(f"/var/run/netns/{srv.netns}")
    assert _thread_netns() == before
    assert len(got) == len(set(got)) == 2 * pods["n"]  # nothing else lives in that netns
    assert sum(s.inbound for s in got) == pods["n"]
    assert all(s.cookie != 0 for s in got)
    assert set(got) == _expected(pods)


def test_network_namespaces_and_all_established(pods: dict[str, Any]) -> None:
    ino = pods["srv"].netns_inode
    namespaces = sockdiag.network_namespaces()
    assert ino in namespaces
    assert os.stat(namespaces[ino]).st_ino == ino
    assert _thread_netns() in namespaces  # our own
    assert set(sockdiag.established_sockets(namespaces[ino])) == _expected(pods)

    before = _thread_netns()
    sockets, errors = sockdiag.all_established()
    assert _thread_netns() == before
    assert errors == []
    assert {s for s in sockets if s.netns == ino} == _expected(pods)
    # Read in the namespace they live in, not in ours: none of them shows up in our own.
    own = set(sockdiag.established_sockets())
    assert own.isdisjoint(_expected(pods))
    assert all(s.netns == before for s in own)


def test_closed_connection_disappears(pods: dict[str, Any]) -> None:
    path = f"/var/run/netns/{pods['srv'].netns}"
    gone = frozenset({0, 1})  # one over 127.0.0.1 to the dual-stack listener, one over ::1
    for i in sorted(gone):
        pods["client"].send(str(i))
        assert pods["client"].read()["closed"] == pods["outbound"][i]
        assert pods["server"].read()["closed"] == pods["inbound"][i]
    want = _expected(pods, skip=gone)
    deadline = time.monotonic() + 5
    while (got := set(sockdiag.established_sockets(path))) != want and time.monotonic() < deadline:
        time.sleep(0.02)  # the last ACK may still be on its way through loopback
    assert got == want
    assert sum(s.inbound for s in got) == sum(not s.inbound for s in got) == pods["n"] - len(gone)


def test_errors_name_the_path_and_restore_the_thread_netns(tmp_path: Any) -> None:
    before = _thread_netns()
    not_a_netns = "/proc/self/ns/uts"  # opens fine, setns(CLONE_NEWNET) refuses it
    with pytest.raises(SockDiagError) as info:
        sockdiag.established_sockets(not_a_netns)
    assert info.value.errno == errno.EINVAL
    assert not_a_netns in str(info.value) and "EINVAL" in str(info.value) and "\n" not in str(info.value)
    assert _thread_netns() == before
    with pytest.raises(SockDiagError, match="ENOENT"):
        sockdiag.established_sockets(str(tmp_path / "missing"))
    assert _thread_netns() == before


def test_other_threads_stay_in_their_netns(pods: dict[str, Any]) -> None:
    """setns() applies to the calling thread only, and only while the socket is opened."""
    path = f"/var/run/netns/{pods['srv'].netns}"
    main = _thread_netns()
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(_thread_netns())

    t = threading.Thread(target=watch)
    t.start()
    try:
        results: list[set[TcpSocket]] = []
        worker = threading.Thread(target=lambda: results.append(set(sockdiag.established_sockets(path))))
        for _ in range(20):
            assert set(sockdiag.established_sockets(path)) == _expected(pods)
            assert _thread_netns() == main
        worker.start()
        worker.join(10)
        assert results == [_expected(pods)]
    finally:
        stop.set()
        t.join(10)
    assert seen and set(seen) == {main}
