"""Requests per pod on the real kernel: an HTTP/1.1 server and client in simulated pods,
and a non-HTTP line protocol, against the real exporter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from exporter_proc import ExporterProcess, Scrape
from podsim import SimCluster, SimPod, wait_for_file
from test_tcp_metrics import actions, finish, ready_path, serve

HERE = Path(__file__).resolve().parent
HTTP = str(HERE / "http_actions.py")
REQ = "podnet_requests_total"
DUR = "podnet_request_duration_seconds"


def script_server(pod: SimPod, argv: list[str], port: int, delay_ms: float = 0) -> subprocess.Popen[bytes]:
    """`python <argv> --port P --delay-ms D --ready-file F` in the pod, once it is listening."""
    ready = ready_path()
    p = pod.popen(
        [sys.executable, *argv, "--port", str(port), "--delay-ms", str(delay_ms), "--ready-file", ready],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for_file(ready, proc=p)
    return p


def script_client(
    pod: SimPod, argv: list[str], host: str, port: int, *args: object, timeout: float = 60
) -> dict[str, object]:
    """`python <argv> --host H --port P <args>` in the pod: its JSON summary."""
    return finish(
        pod.popen(
            [sys.executable, *argv, "--host", host, "--port", str(port), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ),
        timeout=timeout,
    )


def http_server(pod: SimPod, port: int, delay_ms: float = 0) -> subprocess.Popen[bytes]:
    return script_server(pod, [HTTP, "server"], port, delay_ms)


def http_client(pod: SimPod, host: str, port: int, *args: object) -> dict[str, object]:
    return script_client(pod, [HTTP, "client"], host, port, *args)


def of(pod: SimPod, **labels: str) -> dict[str, str]:
    return {"namespace": pod.namespace, "pod": pod.name, **labels}


def pair(cluster: SimCluster, pods_file: str, name: str) -> tuple[SimPod, SimPod]:
    client = cluster.add_pod(f"{name}-client", workload=f"{name}c")
    server = cluster.add_pod(f"{name}-server", workload=f"{name}s")
    cluster.write_pods_file(pods_file)
    return client, server


def hist_mean(s: Scrape, **labels: str) -> float:
    return s.value(DUR + "_sum", **labels) / s.value(DUR + "_count", **labels)


def test_keepalive_requests_exact_with_duration(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    c, srv = pair(cluster, pods_file, "ka")
    server = http_server(srv, 8080, delay_ms=40)
    try:
        assert http_client(c, srv.ip, 8080, "--requests", 20)["requests"] == 20
        s = exporter.fresh_scrape()
    finally:
        server.kill()
    served = of(srv, role="server", protocol="http", method="GET", status_class="2xx")
    made = of(c, role="client", protocol="http", method="GET", status_class="2xx")
    assert s.value(REQ, **served) == 20
    assert s.value(REQ, **made) == 20
    assert s.value(REQ, **of(srv)) == 20
    assert s.value(REQ, **of(c)) == 20
    for pod, role in ((srv, "server"), (c, "client")):
        labels = of(pod, role=role, protocol="http")
        assert s.value(DUR + "_count", **labels) == 20
        # Every request took the handler's 40 ms and a little more: the (31.25, 62.5] ms bucket.
        assert s.value(DUR + "_bucket", **labels, le="0.03125") == 0
        assert s.value(DUR + "_bucket", **labels, le="0.0625") == 20
        assert 0.040 <= hist_mean(s, **labels) < 0.0625


def test_concurrent_connections_and_methods(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    c, srv = pair(cluster, pods_file, "cc")
    server = http_server(srv, 8080)
    try:
        http_client(c, srv.ip, 8080, "--connections", 4, "--requests", 10, "--method", "POST")
        http_client(c, srv.ip, 8080, "--requests", 3, "--method", "DELETE")
        http_client(c, srv.ip, 8080, "--requests", 2, "--method", "PROPFIND")
        s = exporter.fresh_scrape()
    finally:
        server.kill()
    for pod, role in ((srv, "server"), (c, "client")):
        assert s.value(REQ, **of(pod, role=role, method="POST", status_class="2xx")) == 40
        assert s.value(REQ, **of(pod, role=role, method="DELETE")) == 3
        # Outside the standard methods: still HTTP (the status line says so), method "other".
        assert s.value(REQ, **of(pod, role=role, protocol="http", method="other")) == 2
        assert s.value(REQ, **of(pod)) == 45


def test_connection_close_and_error_statuses(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    c, srv = pair(cluster, pods_file, "cl")
    server = http_server(srv, 8080)
    try:
        http_client(c, srv.ip, 8080, "--requests", 5, "--close")
        http_client(c, srv.ip, 8080, "--requests", 3, "--path", "/status/404")
        http_client(c, srv.ip, 8080, "--requests", 2, "--path", "/status/503")
        s = exporter.fresh_scrape()
    finally:
        server.kill()
    for pod, role in ((srv, "server"), (c, "client")):
        assert s.value(REQ, **of(pod, role=role, status_class="2xx")) == 5
        assert s.value(REQ, **of(pod, role=role, status_class="4xx")) == 3
        assert s.value(REQ, **of(pod, role=role, status_class="5xx")) == 2
    assert s.value("podnet_tcp_connections_opened_total", **of(c, direction="outbound")) == 7


def test_line_protocol_counts_as_other(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    c, srv = pair(cluster, pods_file, "redis")
    server = serve(srv, 6379, connections=1, mode="echo")
    finish(
        c.popen(
            actions("pingpong", "--host", srv.ip, "--port", 6379, "--rounds", 25),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )
    finish(server)
    s = exporter.fresh_scrape()
    for pod, role in ((srv, "server"), (c, "client")):
        labels = of(pod, role=role, protocol="other", method="", status_class="")
        assert s.value(REQ, **labels) == 25
        assert s.value(REQ, **of(pod)) == 25
        assert s.value(DUR + "_count", **of(pod, role=role, protocol="other")) == 25
