"""HTTP/2 and gRPC requests per stream on the real kernel, against the real exporter.

Ground truth comes from the programs at either end, never from the exporter:
  - h2c: nginx's access log (one line per stream: status, method, protocol, connection serial)
    and nghttp's HAR (the statuses the client received), over ONE connection with many streams;
  - gRPC: grpcio's client, which counts the status of every call, and the server's view of the
    client's address (one peer: one connection), see h2_actions.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

from delayline import setup as delayline_setup
from exporter_proc import ExporterProcess, Scrape
from h2_servers import Nginx, counts, curl_h2c, nghttp, status_class
from podsim import SimCluster, SimPod, ready_path, wait_for_file
from test_requests import DUR, REQ, hist_mean, of, pair, script_client, script_server

HERE = Path(__file__).resolve().parent
H2 = str(HERE / "h2_actions.py")
OPENED = "podnet_tcp_connections_opened_total"


def grpc_server(pod: SimPod, port: int, delay_ms: float = 0) -> subprocess.Popen[bytes]:
    return script_server(pod, [H2, "grpc-server"], port, delay_ms)


def grpc_client(pod: SimPod, host: str, port: int, *args: object) -> dict[str, object]:
    return script_client(pod, [H2, "grpc-client"], host, port, *args, timeout=120)


def stop(p: subprocess.Popen[bytes]) -> None:
    p.kill()
    p.communicate()


def seen(s: Scrape, pod: SimPod) -> str:
    """The pod's request counters, one per line (for assertion messages)."""
    keys = ("role", "protocol", "method", "status_class", "grpc_status")
    rows = []
    for labels in s.series(REQ, **of(pod)):
        rows.append(" ".join(f"{k}={labels.get(k, '-')!r}" for k in keys) + f" -> {s.value(REQ, **labels):g}")
    return "\n" + "\n".join(sorted(rows))


def assert_no_grpc_status(s: Scrape, pod: SimPod, protocol: str) -> None:
    """Requests that are not gRPC carry no grpc_status (absent, or empty)."""
    for labels in s.series(REQ, **of(pod, protocol=protocol)):
        assert labels.get("grpc_status", "") == "", labels


def assert_h2_requests_equal_log(
    s: Scrape, client: SimPod, server: SimPod, log: Counter[tuple[str, str]]
) -> None:
    """On both ends: per (method, status class), the requests counted equal nginx's access log;
    and nothing else was counted (no request of another protocol, no extra stream)."""
    total = sum(log.values())
    for pod, role in ((server, "server"), (client, "client")):
        for (method, cls), n in log.items():
            labels = of(pod, role=role, protocol="http2", method=method, status_class=cls)
            assert s.value(REQ, **labels) == n, (role, method, cls, seen(s, pod))
        assert s.value(REQ, **of(pod, role=role, protocol="http2")) == total, role
        assert s.value(REQ, **of(pod)) == total, (role, seen(s, pod))
        assert s.value(DUR + "_count", **of(pod, role=role, protocol="http2")) == total, role
        assert_no_grpc_status(s, pod, "http2")


def test_nghttp_many_streams_one_connection(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str, tmp_path: Path
) -> None:
    c, srv = pair(cluster, pods_file, "h2mix")
    body = tmp_path / "body"
    body.write_bytes(b"x" * 300)
    base = f"http://{srv.ip}:8080"
    # 30 GETs, all streams at once on one connection (static-table statuses 200/404/500), then
    # 4 POSTs with a body on a second connection.
    gets = [f"{base}{path}?i={i}" for i in range(10) for path in ("/ok", "/missing", "/boom")]
    posts = [f"{base}/ok?p=1", f"{base}/ok?p=2", f"{base}/missing?p=3", f"{base}/boom?p=4"]
    with Nginx(srv, 8080) as nginx:
        got = nghttp(c, gets) + nghttp(c, posts, data=str(body))
        nginx.stop()
        served = nginx.served()
        s = exporter.fresh_scrape()
    assert len(served) == 34, served
    assert {x.protocol for x in served} == {"HTTP/2.0"}
    assert len({x.connection for x in served if x.method == "GET"}) == 1, "nghttp used one connection"
    assert len({x.connection for x in served}) == 2
    # The client received what the server sent (same multiset of statuses).
    assert Counter(got) == Counter(x.status for x in served)
    log = counts(served)
    assert log == {("GET", "2xx"): 10, ("GET", "4xx"): 10, ("GET", "5xx"): 10, ("POST", "2xx"): 2,
                   ("POST", "4xx"): 1, ("POST", "5xx"): 1}  # fmt: skip
    assert_h2_requests_equal_log(s, c, srv, log)
    assert s.value(OPENED, **of(c, direction="outbound")) == 2


def test_nghttp_literal_statuses_and_methods(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    """Statuses outside HPACK's static table (201, 301, 503: sent as literals) and methods sent
    as literals (PUT, DELETE: with nghttp's -H ':method: ...')."""
    c, srv = pair(cluster, pods_file, "h2lit")
    base = f"http://{srv.ip}:8080"
    with Nginx(srv, 8080) as nginx:
        got = nghttp(c, [f"{base}{path}?i={i}" for i in range(4) for path in ("/created", "/moved", "/busy")])
        got += nghttp(c, [f"{base}/ok?put={i}" for i in range(3)], method="PUT")
        got += nghttp(c, [f"{base}/missing?del={i}" for i in range(2)], method="DELETE")
        nginx.stop()
        served = nginx.served()
        s = exporter.fresh_scrape()
    assert {x.protocol for x in served} == {"HTTP/2.0"}
    assert Counter(got) == Counter(x.status for x in served)
    log = counts(served)
    assert log == {
        ("GET", "2xx"): 4,
        ("GET", "3xx"): 4,
        ("GET", "5xx"): 4,
        ("PUT", "2xx"): 3,
        ("DELETE", "4xx"): 2,
    }
    assert_h2_requests_equal_log(s, c, srv, log)


def test_curl_single_h2c_request(cluster: SimCluster, exporter: ExporterProcess, pods_file: str) -> None:
    c, srv = pair(cluster, pods_file, "h2curl")
    with Nginx(srv, 8080) as nginx:
        code = curl_h2c(c, f"http://{srv.ip}:8080/ok")
        nginx.stop()
        served = nginx.served()
        s = exporter.fresh_scrape()
    assert code == 200
    assert [(x.status, x.method, x.protocol) for x in served] == [(200, "GET", "HTTP/2.0")]
    assert_h2_requests_equal_log(s, c, srv, Counter({("GET", status_class(code)): 1}))


def test_grpc_concurrent_unary_calls_one_connection(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    c, srv = pair(cluster, pods_file, "grpc")
    server = grpc_server(srv, 50051)
    try:
        out = grpc_client(c, srv.ip, 50051, "--calls", 100, "--fail-every", 7, "--concurrency", 100)
        s = exporter.fresh_scrape()
    finally:
        stop(server)
    raw, peers = out["statuses"], out["peers"]
    assert isinstance(raw, dict) and isinstance(peers, list), out
    statuses = {int(k): int(v) for k, v in raw.items()}
    assert out["calls"] == 100
    assert statuses == {0: 86, 5: 4, 13: 4, 14: 3, 3: 3}, statuses  # as h2_actions.wanted_code asks
    assert len(peers) == 1, out  # the server saw every call come from one address: one connection
    for pod, role in ((srv, "server"), (c, "client")):
        # Every call is a POST answered 200 (HEADERS :status 200); its outcome is in grpc-status.
        grpc = of(pod, role=role, protocol="grpc")
        assert s.value(REQ, **grpc, method="POST", status_class="2xx") == 100, seen(s, pod)
        assert s.value(REQ, **of(pod)) == 100, (role, seen(s, pod))
        for code, n in statuses.items():
            assert s.value(REQ, **grpc, grpc_status=str(code)) == n, (role, code, seen(s, pod))
        assert s.value(DUR + "_count", **grpc) == 100
    assert s.value(OPENED, **of(c, direction="outbound")) == 1


def test_grpc_duration_tracks_server_delay(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    c, srv = pair(cluster, pods_file, "grpcslow")
    server = grpc_server(srv, 50051, delay_ms=50)
    try:
        out = grpc_client(c, srv.ip, 50051, "--calls", 20, "--fail-every", 5, "--concurrency", 5)
        s = exporter.fresh_scrape()
    finally:
        stop(server)
    assert out["calls"] == 20
    for pod, role in ((srv, "server"), (c, "client")):
        labels = of(pod, role=role, protocol="grpc")
        assert s.value(DUR + "_count", **labels) == 20
        # Every call, OK or not, waited the handler's 50 ms before its response HEADERS.
        assert s.value(DUR + "_bucket", **labels, le="0.03125") == 0
        assert 0.050 <= hist_mean(s, **labels) < 0.5, (role, hist_mean(s, **labels))


def test_h2_client_duration_includes_round_trip(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    """Through a 20 ms delay line each way, the client waits at least one round trip (40 ms)
    from a stream's request HEADERS to its response HEADERS; nginx answers at once."""
    c, srv = pair(cluster, pods_file, "h2far")
    delayline_setup(c.netns, srv.netns, "dl0", "10.252.0.1", "10.252.0.2")
    ready = ready_path()
    relay = subprocess.Popen(
        [sys.executable, str(HERE / "delayline.py"), c.netns, srv.netns, "dl0", "20", ready],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_file(ready, proc=relay)
        with Nginx(srv, 8080) as nginx:
            got = nghttp(c, [f"http://10.252.0.2:8080/ok?i={i}" for i in range(10)])
            nginx.stop()
            served = nginx.served()
    finally:
        relay.kill()
        relay.communicate()
    s = exporter.fresh_scrape()
    assert got == [200] * 10
    assert len(served) == 10
    made = of(c, role="client", protocol="http2")
    assert s.value(DUR + "_count", **made) == 10
    assert s.value(DUR + "_bucket", **made, le="0.03125") == 0
    assert 0.040 <= hist_mean(s, **made) < 0.4, hist_mean(s, **made)
    assert s.value(DUR + "_count", **of(srv, role="server", protocol="http2")) == 10
