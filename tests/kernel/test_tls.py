"""Requests inside TLS (OpenSSL uprobes, `--tls openssl`) on the real kernel, against the real
exporter. Ground truth comes from the programs at either end: nginx's access log (HTTP/1.1 and
HTTP/2 over TLS, curl as the client) and a Python ssl client's own count of the responses it
read (SSL_read_ex / SSL_write_ex). Each request must be counted once per role, as http or
http2, and never as protocol "other" (the TLS bytes seen by the TCP programs).

The exporter finds libssl by scanning /proc periodically: servers started after it are found
at a later scan, so the counters are polled (until_counted) rather than read once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from exporter_proc import ExporterProcess, Scrape
from h2_servers import Nginx, Served, counts
from podsim import SimCluster, SimPod, ready_path, wait_for_file
from test_requests import REQ, of, pair
from tls_servers import SCRIPT, certs_for, client_plan, curl_tls

TLS_ARGS = ["--tls", "openssl"]
LIBS = "podnet_exporter_tls_libraries"
WAIT = 30.0  # s: several rescans of /proc


def exporter_args(pods_file: str) -> list[str]:
    return ["--pods-file", pods_file, "--poll-interval", "0.3", *TLS_ARGS]


@pytest.fixture(scope="module")
def tls_exporter(pods_file: str) -> Iterator[ExporterProcess]:
    """The exporter with OpenSSL probes, one for the module (started before the servers)."""
    proc = ExporterProcess(exporter_args(pods_file))
    try:
        proc.wait_ready()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


def seen(s: Scrape, pod: SimPod) -> str:
    rows = []
    for labels in s.series(REQ, **of(pod)):
        keys = ("role", "protocol", "method", "status_class")
        rows.append(" ".join(f"{k}={labels.get(k, '-')}" for k in keys) + f" -> {s.value(REQ, **labels):g}")
    return "\n" + "\n".join(sorted(rows))


def until_counted(exp: ExporterProcess, done: Callable[[Scrape], bool], timeout: float = WAIT) -> Scrape:
    """Fresh scrapes until `done` holds (the rescan has found the library) or `timeout` passes;
    the last scrape either way, for the assertions to explain."""
    deadline = time.monotonic() + timeout
    while True:
        s = exp.fresh_scrape()
        if done(s) or time.monotonic() > deadline:
            return s
        time.sleep(1)


def assert_counted(
    s: Scrape, client: SimPod, server: SimPod, protocol: str, truth: Counter[tuple[str, str]]
) -> None:
    """On both ends: per (method, status class) the requests equal the ground truth, all of
    `protocol`, and nothing else (no "other", no double count)."""
    total = sum(truth.values())
    for pod, role in ((server, "server"), (client, "client")):
        for (method, cls), n in truth.items():
            labels = of(pod, role=role, protocol=protocol, method=method, status_class=cls)
            assert s.value(REQ, **labels) == n, (role, method, cls, seen(s, pod))
        assert s.value(REQ, **of(pod, role=role, protocol="other")) == 0, (role, seen(s, pod))
        assert s.value(REQ, **of(pod, role=role)) == total, (role, seen(s, pod))


def total_of(pods: tuple[SimPod, SimPod], n: int, protocol: str) -> Callable[[Scrape], bool]:
    """Both ends have counted `n` requests of `protocol` (not "other": the plaintext ones)."""
    return lambda s: all(s.value(REQ, **of(p, protocol=protocol)) >= n for p in pods)


# --- nginx + curl -------------------------------------------------------------------------------


def nginx_truth(served: list[Served], protocol: str) -> Counter[tuple[str, str]]:
    assert {x.protocol for x in served} == {protocol}, served
    assert len({x.connection for x in served}) == 1, "curl used one connection"
    return counts(served)


@pytest.mark.parametrize(
    ("http2", "protocol", "logged"), [(False, "http", "HTTP/1.1"), (True, "http2", "HTTP/2.0")]
)
def test_curl_nginx_over_tls(
    cluster: SimCluster,
    tls_exporter: ExporterProcess,
    pods_file: str,
    tmp_path: Path,
    http2: bool,
    protocol: str,
    logged: str,
) -> None:
    c, srv = pair(cluster, pods_file, "tlsh2" if http2 else "tlsh1")
    ca, leaf = certs_for(tmp_path, srv.ip)
    port = 8443 if http2 else 9443
    urls = [
        f"https://{srv.ip}:{port}{p}?i={i}"
        for i in range(4)
        for p in ("/ok", "/missing", "/boom", "/created")
    ]
    with Nginx(srv, leaf=leaf, tls_port=9443, tls_h2_port=8443) as nginx:
        got = curl_tls(c, ca, urls, http2=http2)
        nginx.stop()
        served = nginx.served()
    assert {v for v, _ in got} == {"2" if http2 else "1.1"}
    assert Counter(code for _, code in got) == Counter(x.status for x in served)
    truth = nginx_truth(served, logged)
    assert truth == {("GET", "2xx"): 8, ("GET", "4xx"): 4, ("GET", "5xx"): 4}
    s = until_counted(tls_exporter, total_of((c, srv), len(urls), protocol))
    assert_counted(s, c, srv, protocol, truth)


# --- Python ssl ---------------------------------------------------------------------------------


def py_server(
    pod: SimPod, port: int, tmp: Path, wrap: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    ca, leaf = certs_for(tmp, pod.ip)
    ready = ready_path()
    p = pod.popen(
        [*(wrap or []), sys.executable, SCRIPT, "server", "--port", str(port), "--cert", str(leaf.cert),
         "--key", str(leaf.key), "--ready-file", ready],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for_file(ready, proc=p)
    return p, ca.cert


def py_client(pod: SimPod, host: str, port: int, ca: Path, n: int) -> Counter[tuple[str, str]]:
    r = pod.run(
        [sys.executable, SCRIPT, "client", "--host", host, "--port", str(port), "--ca", str(ca),
         "--requests", str(n)],
        timeout=120,
    )  # fmt: skip
    out = json.loads(r.stdout)
    assert out["connections"] == 1, out  # keep-alive: every request on one connection
    got = Counter({tuple(k.split()): v for k, v in out["counts"].items()})
    want = Counter(
        (m, f"{ {'/ok': 2, '/created': 2, '/missing': 4, '/boom': 5}[p] }xx") for m, p in client_plan(n)
    )
    assert got == want, (got, want)
    return got  # type: ignore[return-value]


def stop(p: subprocess.Popen[bytes]) -> None:
    p.kill()
    p.communicate()


def test_python_ssl_server_started_after_the_exporter(
    cluster: SimCluster, tls_exporter: ExporterProcess, pods_file: str, tmp_path: Path
) -> None:
    c, srv = pair(cluster, pods_file, "tlspya")
    server, ca = py_server(srv, 8443, tmp_path)
    try:
        truth = py_client(c, srv.ip, 8443, ca, 40)
        s = until_counted(tls_exporter, total_of((c, srv), 40, "http"))
    finally:
        stop(server)
    assert_counted(s, c, srv, "http", truth)


def test_python_ssl_server_started_before_the_exporter(
    cluster: SimCluster, pods_file: str, tmp_path: Path
) -> None:
    """The server (and its libssl) exists when the exporter starts: found by the first scan."""
    c, srv = pair(cluster, pods_file, "tlspyb")
    server, ca = py_server(srv, 8443, tmp_path)
    exp = ExporterProcess(exporter_args(pods_file))
    try:
        exp.wait_ready()
        # The client starts a new process (its own libssl mapping of the same file).
        truth = py_client(c, srv.ip, 8443, ca, 30)
        s = until_counted(exp, total_of((c, srv), 30, "http"))
        assert_counted(s, c, srv, "http", truth)
    finally:
        stop(server)
        assert exp.stop() == 0, exp.log()


def test_libssl_only_the_container_can_see(
    cluster: SimCluster, tls_exporter: ExporterProcess, pods_file: str, tmp_path: Path
) -> None:
    """A container's own libssl: the server runs in a mount namespace of its own, with a copy of
    libssl.so.3 (another inode) on a tmpfs the host does not see at that path. The exporter
    finds it in the process's maps and reaches it through /proc/<pid>/root."""
    c, srv = pair(cluster, pods_file, "tlsmnt")
    lib = tmp_path / "container-lib"
    lib.mkdir()
    host_libssl = ssl_library()
    script = (
        f'mount -t tmpfs none "{lib}" && cp "{host_libssl}" "{lib}/" && '
        f'LD_LIBRARY_PATH="{lib}" exec "$0" "$@"'
    )
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    attached = tls_exporter.fresh_scrape().value(LIBS, state="attached")
    server, ca = py_server(srv, 8443, tmp_path, wrap=wrap)
    try:
        maps = Path(f"/proc/{_python_child(server.pid)}/maps").read_text()
        assert f"{lib}/libssl.so.3" in maps, "the server maps its own copy"
        assert not (lib / "libssl.so.3").exists(), "which the host cannot see at that path"
        # A library of its own is probed from the next scan of /proc on (every 5 s): what its
        # connections did before is counted by turns.
        until_counted(tls_exporter, lambda s: s.value(LIBS, state="attached") > attached)
        truth = py_client(c, srv.ip, 8443, ca, 20)
        s = until_counted(tls_exporter, total_of((c, srv), 20, "http"))
    finally:
        stop(server)
    assert_counted(s, c, srv, "http", truth)


def ssl_library() -> str:
    """The libssl.so.3 the Python ssl module of this host maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("/libssl.so.3"):
            return line.split()[-1]
    raise AssertionError("this Python has not mapped libssl.so.3")


def _python_child(pid: int) -> int:
    """The Python process under the pod's wrappers (unshare, sh exec into it)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                if "python" in Path(f"/proc/{child}/comm").read_text():
                    return int(child)
                return _python_child(int(child))
        if "python" in Path(f"/proc/{pid}/comm").read_text():
            return pid
        time.sleep(0.1)
    raise AssertionError(f"no Python under {pid}")


def test_memory_bio_tls_is_not_counted_twice(
    cluster: SimCluster, tls_exporter: ExporterProcess, pods_file: str, tmp_path: Path
) -> None:
    """asyncio's TLS (OpenSSL through a memory BIO, as aiohttp and uvicorn use it): the library's
    calls never touch the socket, so its plaintext cannot be tied to the connection. The
    socket's turns count the requests (protocol other), once: the plaintext is not counted."""
    c, srv = pair(cluster, pods_file, "tlsbio")
    ca, leaf = certs_for(tmp_path, srv.ip)
    ready = ready_path()
    argv = [sys.executable, SCRIPT, "server", "--asyncio", "--port", "8443", "--cert", str(leaf.cert)]
    server = srv.popen(
        [*argv, "--key", str(leaf.key), "--ready-file", ready],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_file(ready, proc=server)
        argv = [sys.executable, SCRIPT, "client", "--asyncio", "--host", srv.ip, "--port", "8443"]
        r = c.run([*argv, "--ca", str(ca.cert), "--requests", "15"], timeout=120)
        assert json.loads(r.stdout)["counts"] == {"GET 2xx": 15}
        s = until_counted(tls_exporter, lambda s: all(s.value(REQ, **of(p)) >= 16 for p in (c, srv)))
    finally:
        stop(server)
    for pod in (c, srv):
        assert s.value(REQ, **of(pod, protocol="http")) == 0, seen(s, pod)
        # 15 requests, and TLS's own exchanges: the handshake, session tickets, the closing alert.
        assert 16 <= s.value(REQ, **of(pod, protocol="other")) <= 15 + 4, seen(s, pod)
