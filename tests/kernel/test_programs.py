"""The loader and the kernel maps, in-process: hooks missing on a kernel, full maps,
per-socket state freed, bpf_stats. Real programs on the real kernel."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from h2_actions import wanted_code
from hostprobe import preferred_refused, refusal_under, require_preferred_build
from kernel_maps import Totals, flow_key
from podsim import SimCluster, client_argv, ready_path, server_argv, wait_for_file

from exporter.kernel.bpf_structs import SockInfo
from exporter.kernel.bpfstats import prog_run_stats
from exporter.kernel.btf import Btf
from exporter.kernel.offsets import resolve_offsets
from exporter.kernel.programs import LoadedPrograms, MapSizes, load_programs
from exporter.metrics.raw import HTTP_METHODS, PROTOCOLS, ROLES, STATUS_CLASSES
from exporter.metrics.snapshot import request_labels
from exporter.pods.cgroups import find_cgroup2_mount

V4_LOOPBACK = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
ROLE_SERVER, ROLE_CLIENT = ROLES.index("server"), ROLES.index("client")
HTTP_ACTIONS = str(Path(__file__).resolve().parent / "http_actions.py")
H2_ACTIONS = str(Path(__file__).resolve().parent / "h2_actions.py")


class HidingBtf:
    """The running kernel's BTF, minus some tracepoints: a kernel without those hooks."""

    def __init__(self, real: Btf, hidden: set[str]) -> None:
        self._real = real
        self._hidden = hidden

    def raw_tracepoint_args(self, tracepoint: str) -> list[str] | None:
        return None if tracepoint in self._hidden else self._real.raw_tracepoint_args(tracepoint)

    def tracepoint_type_id(self, tracepoint: str) -> int | None:
        return None if tracepoint in self._hidden else self._real.tracepoint_type_id(tracepoint)

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf.load()


# How the hot path can be built: BTF-typed tracepoints (preferred, where the host allows it),
# raw tracepoints (forced here; the fallback elsewhere), and either without reading payloads
# (requests "turns") or without request tracking (requests "off").
BUILDS: dict[str, dict[str, object]] = {
    "tp_btf": {},
    "raw": {"tp_btf": False},
    "tp_btf-http1": {"requests": "http1"},
    "tp_btf-turns": {"requests": "turns"},
    "raw-turns": {"tp_btf": False, "requests": "turns"},
    "tp_btf-no-requests": {"requests": "off"},
    "raw-no-requests": {"tp_btf": False, "requests": "off"},
}


def load(
    btf: Btf, hidden: frozenset[str] = frozenset(), sizes: MapSizes | None = None, build: str = "tp_btf"
) -> LoadedPrograms:
    b = HidingBtf(btf, set(hidden)) if hidden else btf
    sizes = sizes or MapSizes(4096)
    progs = load_programs(b, resolve_offsets(btf), sizes, **BUILDS[build])  # type: ignore[arg-type]
    hot = {h.hook.label for h in progs.hooks if h.program == "tcp_traffic" and h.attached}
    # The build loaded is the one asked for where the host allows it (probed), and any
    # other is a fallback that says why.
    wants_tp_btf = BUILDS[build].get("tp_btf", True)
    expect_tp_btf = bool(wants_tp_btf) and not preferred_refused()
    assert (hot <= set(progs.tp_btf)) == expect_tp_btf, (hot, progs.tp_btf, progs.passed_over)
    if wants_tp_btf and not expect_tp_btf:
        assert progs.passed_over["tcp_traffic"], "fell back without saying why"
    if "tcp_traffic" in progs.builds:
        how = progs.builds["tcp_traffic"]
        assert progs.data_path == ("tp_btf" if expect_tp_btf else "raw_tracepoint"), how
        assert ("requests off" in how) == build.endswith("no-requests"), how
        assert ("without HTTP recognition" in how) == build.endswith("turns"), how
    return progs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_exchange(connections: int, send: int, reply: int) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def serve() -> None:
        for _ in range(connections):
            c, _ = srv.accept()
            got = 0
            while got < send:
                got += len(c.recv(65536))
            c.sendall(b"r" * reply)
            c.close()

    t = threading.Thread(target=serve)
    t.start()
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"s" * send)
            while c.recv(65536):
                pass
    t.join()
    srv.close()


def test_missing_optional_hook_leaves_the_rest_running(btf: Btf, caplog: pytest.LogCaptureFixture) -> None:
    progs = load(btf, frozenset({"tcp_retransmit_skb", "tcp_send_reset"}))
    try:
        status = {h.hook.label: h for h in progs.hooks}
        assert not status["tcp_retransmit_skb"].attached
        assert status["tcp_retransmit_skb"].reason == "kernel has no tracepoint tcp_retransmit_skb"
        assert not status["tcp_send_reset"].attached
        for label in ("sock_send_length", "sock_recv_length", "inet_sock_set_state", "tcp_receive_reset"):
            assert status[label].attached, status[label].reason
        assert "podnet_tcp_retransmits_total" in caplog.text
    finally:
        progs.close()


def test_missing_required_hook_disables_only_its_program(btf: Btf) -> None:
    # Without tcp_destroy_sock the socket cache could outlive sockets: tcp_traffic must not run.
    progs = load(btf, frozenset({"tcp_destroy_sock"}))
    try:
        by_program: dict[str, list[bool]] = {}
        for h in progs.hooks:
            by_program.setdefault(h.program, []).append(h.attached)
        assert by_program["tcp_traffic"] == [False] * len(by_program["tcp_traffic"])
        assert all(by_program["tcp_state"]) and all(by_program["tcp_events"])
        assert "tcp_traffic" not in progs.objects
    finally:
        progs.close()


def host_exchange(cluster: SimCluster, name: str, port: int, hosts: list[str], send: int, reply: int) -> int:
    """In a new host cgroup: a server on `port`, and one client connection to each of
    `hosts` (loopback addresses) sending `send` bytes for `reply`. Returns the cgroup id."""
    cg_dir, cg_id = cluster.host_cgroup(f"/system.slice/{cluster.tag}-{name}.service")
    ready = ready_path()
    argv = server_argv(port, len(hosts), reply, ready)
    server = cluster.cgroup_popen(cg_dir, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_file(ready, proc=server)
    for host in hosts:
        argv = client_argv(host, port, 1, send, reply)
        client = cluster.cgroup_popen(cg_dir, argv, stdout=subprocess.DEVNULL)
        assert client.wait(30) == 0
    assert server.wait(30) == 0
    return cg_id


@pytest.mark.parametrize("build", BUILDS)
def test_every_build_counts_bytes_and_requests_exactly(btf: Btf, cluster: SimCluster, build: str) -> None:
    progs = load(btf, build=build)
    try:
        port = free_port()
        cg_id = host_exchange(cluster, f"build-{build}", port, ["127.0.0.1"] * 6, 300, 40)
        raw = Totals(progs).read()
        assert raw.cgroups[cg_id].sent == 6 * (300 + 40)
        assert raw.cgroups[cg_id].received == 6 * (300 + 40)
        assert raw.flows[flow_key(cg_id, V4_LOOPBACK)] == (6 * 340, 6 * 340)
        counts: dict[int, int] = {}
        for labels, slots in raw.requests.get(cg_id, {}).items():
            counts[labels[0]] = counts.get(labels[0], 0) + sum(n for n, _ in slots.values())
        # One request per connection, seen by the server and by the client.
        assert counts == ({} if build.endswith("no-requests") else {ROLE_SERVER: 6, ROLE_CLIENT: 6})
    finally:
        progs.close()


@pytest.mark.parametrize("build", BUILDS)
def test_every_build_reads_http_only_when_asked(btf: Btf, cluster: SimCluster, build: str) -> None:
    # 3 connections x 4 keep-alive POSTs answered 404: recognised as HTTP by the default
    # builds; counted alike, as protocol "other" with no method or status, by "turns".
    progs = load(btf, build=build)
    try:
        cg_dir, cg_id = cluster.host_cgroup(f"/system.slice/{cluster.tag}-http-{build}.service")
        port, ready = free_port(), ready_path()
        server = cluster.cgroup_popen(
            cg_dir, [sys.executable, HTTP_ACTIONS, "server", "--port", str(port), "--ready-file", ready]
        )
        try:
            wait_for_file(ready, proc=server)
            argv = ["client", "--host", "127.0.0.1", "--port", str(port), "--connections", "3"]
            argv += ["--requests", "4", "--method", "POST", "--path", "/status/404"]
            client = cluster.cgroup_popen(
                cg_dir, [sys.executable, HTTP_ACTIONS, *argv], stdout=subprocess.DEVNULL
            )
            assert client.wait(30) == 0
        finally:
            server.kill()
            server.wait()
        requests = Totals(progs).read().requests.get(cg_id, {})
        counts = {
            (ROLES[role], PROTOCOLS[proto], HTTP_METHODS[method], STATUS_CLASSES[status]): sum(
                n for n, _ in slots.values()
            )
            for (role, proto, method, status, _), slots in requests.items()
        }
        if build.endswith("no-requests"):
            assert counts == {}
        elif build.endswith("turns"):
            assert counts == {("server", "other", "", ""): 12, ("client", "other", "", ""): 12}
        else:
            assert counts == {("server", "http", "POST", "4xx"): 12, ("client", "http", "POST", "4xx"): 12}
    finally:
        progs.close()


@pytest.mark.parametrize("build", ["tp_btf", "raw", "tp_btf-http1", "raw-turns"])
def test_every_build_counts_grpc_streams_or_turns(btf: Btf, cluster: SimCluster, build: str) -> None:
    # 30 gRPC calls, 10 at a time, every 5th answered NOT_FOUND, on one connection: one
    # request per stream where HTTP/2 is recognised (the walker runs as tp_btf or as raw
    # tracepoint programs alike); turns of protocol "other" where it is not.
    progs = load(btf, build=build)
    try:
        cg_dir, cg_id = cluster.host_cgroup(f"/system.slice/{cluster.tag}-grpc-{build}.service")
        port, ready = free_port(), ready_path()
        server = cluster.cgroup_popen(
            cg_dir,
            [sys.executable, H2_ACTIONS, "grpc-server", "--port", str(port), "--ready-file", ready],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_for_file(ready, proc=server)
            argv = ["grpc-client", "--host", "127.0.0.1", "--port", str(port), "--calls", "30"]
            argv += ["--fail-every", "5", "--concurrency", "10"]
            client = cluster.cgroup_popen(
                cg_dir, [sys.executable, H2_ACTIONS, *argv], stdout=subprocess.DEVNULL
            )
            assert client.wait(60) == 0
        finally:
            server.kill()
            server.wait()
        counts: dict[tuple[str, ...], int] = {}
        for (role, proto, method, status, grpc), slots in (
            Totals(progs).read().requests.get(cg_id, {}).items()
        ):
            key = request_labels(role, proto, method, status, grpc)
            counts[key] = counts.get(key, 0) + sum(n for n, _ in slots.values())
        if build in ("tp_btf", "raw"):
            codes = Counter(str(wanted_code(i, 5)) for i in range(1, 31))
            assert counts == {
                (role, "grpc", "POST", "2xx", code): n
                for role in ("server", "client")
                for code, n in codes.items()
            }
        else:
            assert counts and {k[1] for k in counts} == {"other"}, counts
    finally:
        progs.close()


@pytest.mark.parametrize("build", ["tp_btf", "raw"])
def test_full_maps_are_counted_and_totals_stay_exact(btf: Btf, cluster: SimCluster, build: str) -> None:
    # Maps of 8 entries and 11 peers. Raw build: the flow map overflows, the owner's totals
    # stay exact through its catch-all flow. tp_btf build: 22 sockets die with only 8
    # places to hand their totals over in; the rest go to the flow map (and its catch-all).
    progs = load(btf, sizes=MapSizes(2), build=build)
    try:
        hosts = [f"127.0.0.{i}" for i in range(2, 13)]
        cg_id = host_exchange(cluster, f"full-{build}", free_port(), hosts, 100, 7)
        raw = Totals(progs).read()
        if progs.data_path == "raw_tracepoint":
            assert raw.map_failures["tcp_flow_bytes"] > 0
            assert raw.map_entries["tcp_flow_bytes"] <= 8
            assert flow_key(cg_id, bytes(16)) in raw.flows  # the catch-all: peer unknown
        else:
            assert raw.map_failures["tcp_sock_final"] > 0
            assert raw.map_entries["tcp_sock_final"] <= 8
        assert raw.cgroups[cg_id].sent == 11 * (100 + 7)
        assert raw.cgroups[cg_id].received == 11 * (100 + 7)
    finally:
        progs.close()


def test_live_and_dead_sockets_count_once(btf: Btf) -> None:
    """tp_btf build: a connection's bytes are read from its socket while it lives and from
    its hand-over once it dies, never both, never neither. The server listens on an address
    of its own, so the client's flow is this test's alone (other tests share the cgroup)."""
    require_preferred_build()
    progs = load(btf)
    reader = Totals(progs)
    me = Path(f"/proc/{os.getpid()}/cgroup").read_text().strip().split("::")[-1]
    flow = flow_key(
        os.stat(f"{find_cgroup2_mount()}{me}").st_ino, bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 77])
    )
    srv = socket.socket()
    srv.bind(("127.0.0.77", 0))
    srv.listen()
    c = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()
    try:
        seen = []
        for n in (1000, 3000):
            c.sendall(b"x" * n)
            got = 0
            while got < n:
                got += len(peer.recv(65536))
            raw = reader.read()
            seen.append((raw.flows[flow][0], raw.map_entries["tcp_sock_slots"] >= 2))
        c.close()
        peer.close()
        for _ in range(3):
            time.sleep(0.05)
            seen.append((reader.read().flows[flow][0], True))
        assert seen == [(1000, True), (4000, True), (4000, True), (4000, True), (4000, True)]
    finally:
        c.close()
        peer.close()
        srv.close()
        progs.close()


@pytest.mark.parametrize("build", ["tp_btf", "raw"])
def test_per_socket_state_is_freed(btf: Btf, cluster: SimCluster, build: str) -> None:
    progs = load(btf, build=build)
    try:
        port = free_port()
        cg_id = host_exchange(cluster, f"sockets-{build}", port, ["127.0.0.1"] * 20, 100, 10)
        raw = Totals(progs).read()
        assert raw.cgroups[cg_id].opened == [20, 20]
        # Every connection closed: nothing of this cgroup is still pending, open or cached.
        # (The tp_btf build keeps socket state in socket-local storage, which the kernel
        # frees with the socket; test_socket_state_is_dropped_on_disconnect covers it.)
        pending = progs.table("tcp_state", "tcp_connects_pending")
        opened = progs.table("tcp_state", "tcp_socks_open")
        raw_build = progs.data_path == "raw_tracepoint"
        cached = progs.table("tcp_traffic", "tcp_sock_identity") if raw_build else None
        assert pending is not None and opened is not None

        def leftovers() -> list[object]:
            return (
                [v for v in pending.values() if v.cgroup_id == cg_id]
                + [v for v in opened.values() if v.cgroup_id == cg_id]
                + [v for v in (cached.values() if cached is not None else []) if v.flow.cgroup_id == cg_id]
            )

        # The last FIN/ACK exchange may still be on its way when the processes exit.
        deadline = time.monotonic() + 10
        while leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leftovers() == []
        assert Totals(progs).read().cgroups[cg_id].active == [0, 0]
    finally:
        progs.close()


def _sock_state(progs: LoadedPrograms, sock: socket.socket) -> SockInfo | None:
    """The tp_btf build's state of `sock`: socket-local storage is looked up by socket fd."""
    from bcc import lib

    fd = lib.bpf_table_fd(progs.objects["tcp_traffic"].module, b"tcp_sock_state")
    assert fd >= 0
    key, value = ctypes.c_int(sock.fileno()), SockInfo()
    if lib.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) != 0:
        assert ctypes.get_errno() == errno.ENOENT
        return None
    return value


def test_socket_state_follows_a_reconnect(btf: Btf) -> None:
    """A socket disconnected (connect(AF_UNSPEC)) and connected to another peer counts
    towards the new peer: its state is forgotten when it connects again."""
    require_preferred_build()  # reads the socket-local storage of that build
    progs = load(btf)
    first, second = socket.socket(), socket.socket()
    first.bind(("127.0.0.1", 0))
    second.bind(("127.0.0.2", 0))
    first.listen()
    second.listen()
    c = socket.create_connection(first.getsockname())
    peers = [first.accept()[0]]
    try:
        c.sendall(b"x" * 10)
        assert peers[0].recv(10) == b"x" * 10
        state = _sock_state(progs, c)
        assert state is not None and state.role == ROLE_CLIENT
        assert bytes(state.flow.peer) == V4_LOOPBACK
        _disconnect(c)
        c.connect(second.getsockname())
        peers.append(second.accept()[0])
        c.sendall(b"y" * 10)
        assert peers[1].recv(10) == b"y" * 10
        state = _sock_state(progs, c)
        assert state is not None and state.role == ROLE_CLIENT
        assert bytes(state.flow.peer) == bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 2])
    finally:
        for s in (c, *peers, first, second):
            s.close()
        progs.close()


def test_probe_agrees_with_the_loader(btf: Btf) -> None:
    """The probe tests expect builds by is itself checked: the preferred build loads
    exactly where the probe says the host allows it."""
    progs = load_programs(btf, resolve_offsets(btf), MapSizes(1024))
    try:
        assert progs.data_path == ("raw_tracepoint" if preferred_refused() else "tp_btf"), progs.passed_over
    finally:
        progs.close()


def test_probe_names_what_a_host_refuses() -> None:
    """Without CAP_PERFMON no tracing program loads: the probe must say so, naming the
    feature, rather than report the preferred build as available."""
    out = refusal_under(["setpriv", "--bounding-set=-all,+bpf", "--inh-caps=-all"])
    assert out.startswith("tp_btf program on sock_send_length refused: kernel refused program"), out


def test_a_forced_fallback_is_loud(
    btf: Btf, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A host that refuses part of the preferred build (here: mapping the counters' array)
    gets the raw-tracepoint build, a WARNING with the reason, and data_path says so; the
    numbers stay exact."""
    import exporter.kernel.programs as programs
    from exporter.kernel.bpf_syscall import BpfSyscallError

    def refuse(*_: object) -> None:
        raise BpfSyscallError("mapping the array map into memory failed: Operation not permitted")

    monkeypatch.setattr(programs, "map_array", refuse)
    progs = load_programs(btf, resolve_offsets(btf), MapSizes(1024))
    try:
        assert progs.data_path == "raw_tracepoint"
        passed = progs.passed_over["tcp_traffic"]  # both tp_btf builds of request mode "http"
        assert passed and all(
            why.startswith("BTF-typed tracepoints") and "mapping the array map into memory failed" in why
            for why in passed
        ), passed
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("tcp_traffic runs as raw tracepoints" in w and "mapping the array" in w for w in warnings)
        flow = flow_key(*own_flow_at("127.0.0.78"))
        reader = Totals(progs)
        with socket.socket() as srv:
            srv.bind(("127.0.0.78", 0))
            srv.listen()
            with socket.create_connection(srv.getsockname()) as c:
                peer, _ = srv.accept()
                with peer:
                    c.sendall(b"z" * 4321)
                    got = 0
                    while got < 4321:
                        got += len(peer.recv(65536))
        assert reader.read().flows[flow][0] == 4321
    finally:
        progs.close()


def test_doctor_names_a_fallback_and_its_reason(btf: Btf, monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.kernel.programs as programs
    from exporter.app.doctor import check_load
    from exporter.kernel.bpf_syscall import BpfSyscallError

    def refuse(*_: object) -> None:
        raise BpfSyscallError("mapping the array map into memory failed: Operation not permitted")

    monkeypatch.setattr(programs, "map_array", refuse)
    check = check_load(btf, None)
    assert not check.ok and not check.required  # a warning: the exporter still runs
    expected = "raw tracepoints, the costlier fallback, because: BTF-typed tracepoints: mapping the array map"
    assert f"hot path: {expected} into memory failed" in check.detail


def own_flow_at(ip: str) -> tuple[int, bytes]:
    """The flow key of this process's sockets towards `ip` (an address of its own)."""
    me = Path(f"/proc/{os.getpid()}/cgroup").read_text().strip().split("::")[-1]
    return os.stat(f"{find_cgroup2_mount()}{me}").st_ino, bytes(10) + b"\xff\xff" + socket.inet_aton(ip)


def _disconnect(sock: socket.socket) -> None:
    """connect(AF_UNSPEC): Python's socket module cannot express it; libc can."""
    libc = ctypes.CDLL(None, use_errno=True)
    unspec = (ctypes.c_ubyte * 16)()  # sa_family = AF_UNSPEC (0)
    assert libc.connect(sock.fileno(), unspec, 16) == 0, os.strerror(ctypes.get_errno())


@pytest.fixture
def bpf_stats() -> Iterator[None]:
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = path.read_text().strip()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(old)


def test_bpf_stats_per_program(btf: Btf, bpf_stats: None) -> None:
    progs = load(btf)
    try:
        loopback_exchange(connections=5, send=100, reply=10)
        fds = progs.program_fds()
        runs = {label: prog_run_stats(fd) for label, fd in fds.items()}
        assert runs["sock_send_length"] is not None
        ns, count = runs["sock_send_length"]  # type: ignore[misc]
        assert count >= 10 and ns > 0
    finally:
        progs.close()


def test_cgroup_of_this_process_is_resolvable() -> None:
    assert os.path.exists("/proc/self/cgroup")
