"""The dashboards end to end: a real Prometheus (started here, on 127.0.0.1) scrapes the real exporter
while simulated pods run known traffic; then every query of every dashboard in dashboards/, with its
variables filled in for those pods, must return data from Prometheus' HTTP API.

Queries that cannot return data here are listed in NO_DATA with the reason, and the test asserts that
they are exactly the empty ones, so the list cannot go stale: a listed query that starts returning data
(or leaves the dashboards) fails the test until its entry is removed. Along the way the test checks
ground truth through Prometheus: connections opened, refused connects, retransmits (the kernel's own
count), HTTP requests by status class, and that the flow bytes cover what the pods sent.

The scrape job mirrors the chart's ServiceMonitor: honor_labels with the exporter pod's own namespace,
pod and container as target labels, so the test also proves the measured pods' labels survive."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from exporter_proc import ExporterProcess
from podsim import SimCluster, SimPod, traffic_argv, wait_for_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prometheus_server import Prometheus  # lives in tests/, shared with the unit tests

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
ACTIONS = str(HERE / "tcp_actions.py")
TIMEOUT = 60.0
NODE = "sim-node"
# Labels the chart's scrape config gives the exporter's own target (honor_labels keeps the pods').
EXPORTER_TARGET = {"namespace": "podnet", "pod": "podnet-exporter-sim01", "container": "exporter"}

# Traffic per phase (run twice, so every counter increases between two scrapes and rates are > 0).
CONNECTIONS, SEND, REPLY = 10, 2000, 7000  # web -> api:8080, exact byte counts
LOSSY_CONNECTIONS, LOSSY_SEND = 2, 200_000  # web -> api:8081, every 4th data segment dropped
HTTP_REQUESTS, HTTP_FAILURES = 20, 4  # web -> api:8000 on one keep-alive connection, 500 every 5th
HELD = 3  # web -> api:8082, held open through the queries (active connections)
CLOSED_PORT = 9  # nothing listens: refused

# Query (as written in the dashboard) -> why Prometheus has no data for it in this test.
NO_DATA: dict[str, str] = {
    'sum by (stage) (rate(podnet_exporter_errors_total{cluster=~"$cluster"}[$__rate_interval]))': (
        "the exporter creates a stage's error counter on its first error; this run has none (asserted)"
    ),
    'sum by (grpc_status) (rate(podnet_requests_total{cluster=~"$cluster", namespace=~"$namespace", '
    'workload=~"$workload", pod=~"$pod", protocol="grpc"}[$__rate_interval]))': (
        "no gRPC traffic in this test (gRPC is counted in test_http2.py and test_h2_frames.py)"
    ),
}

HTTP_SERVER = r"""
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"x" * 512
        self.send_response(500 if self.path.startswith("/fail") else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler)
open(sys.argv[2], "w").close()
server.serve_forever()
"""
HTTP_CLIENT = r"""
import http.client, json, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
statuses = {}
conn = http.client.HTTPConnection(host, port, timeout=30)
for i in range(n):
    conn.request("GET", "/fail" if i % 5 == 0 else "/ok")
    response = conn.getresponse()
    response.read()
    statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
conn.close()
print(json.dumps(statuses))
"""


# ---- Prometheus ------------------------------------------------------------------------------------------


def podnet_prometheus(workdir: Path, exporter_port: int) -> Prometheus:
    """The chart's ServiceMonitor scrape job: honor_labels, the exporter pod's own labels."""
    job = {
        "job_name": "podnet",
        "honor_labels": True,
        "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"], "labels": EXPORTER_TARGET}],
    }
    return Prometheus(workdir, [job])


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package prometheus; scripts/setup.sh --test)")
    return binary


# ---- dashboards ------------------------------------------------------------------------------------------


VARIABLE_REF = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>[a-zA-Z_]\w*)\)$")


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    ref: str
    expr: str  # as written in the dashboard


def dashboard_queries() -> list[Query]:
    out = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        panels = [q for p in dash["panels"] for q in (p, *p.get("panels", []))]
        for panel in panels:
            for target in panel.get("targets", []):
                out.append(Query(path.stem, panel["title"], target["refId"], target["expr"]))
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """Fill in Grafana's variables as Grafana would for the selection in `values`."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return values[name]

    return VARIABLE_REF.sub(one, expr)


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one sample with a number: histogram_quantile over buckets that did not move gives NaN,
    which a panel shows as no data too."""
    return any(math.isfinite(float(r["value"][1])) for r in result)


# ---- traffic ---------------------------------------------------------------------------------------------


def ready_path(tmp_path: Path, name: str) -> str:
    return str(tmp_path / f"ready-{name}-{time.monotonic_ns()}")


def finish(proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out, err)
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def serve(
    pod: SimPod, tmp_path: Path, port: int, connections: int, reply: int = 0
) -> subprocess.Popen[bytes]:
    ready = ready_path(tmp_path, f"server{port}")
    proc = pod.popen(
        traffic_argv(
            "server", "--port", port, "--connections", connections, "--reply-bytes", reply,
            "--ready-file", ready, "--timeout", 300,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for_file(ready, timeout=TIMEOUT, proc=proc)
    return proc


def client(
    pod: SimPod, host: str, port: int, connections: int, send: int, expect: int | None
) -> dict[str, Any]:
    argv = traffic_argv(
        "client", "--host", host, "--port", port, "--connections", connections, "--send-bytes", send,
        "--timeout", TIMEOUT,
    )  # fmt: skip
    if expect is not None:
        argv += ["--expect-bytes", str(expect)]
    result: dict[str, Any] = json.loads(pod.run(argv, timeout=TIMEOUT * 2).stdout)
    assert result["failed"] == 0, result
    return result


def run_phase(web: SimPod, api: SimPod, tmp_path: Path) -> None:
    """One round of every kind of traffic the dashboards show, web (client) -> api (server)."""
    # Successful connections with exact byte counts.
    server = serve(api, tmp_path, 8080, CONNECTIONS, REPLY)
    assert client(web, api.ip, 8080, CONNECTIONS, SEND, REPLY)["sent"] == CONNECTIONS * SEND
    assert finish(server) == {
        "connections": CONNECTIONS,
        "received": CONNECTIONS * SEND,
        "sent": CONNECTIONS * REPLY,
    }
    # A refused connect: nothing listens on the port, api answers the SYN with a reset.
    r = web.run(
        traffic_argv("connect", "--host", api.ip, "--port", CLOSED_PORT, "--timeout", 10), timeout=TIMEOUT
    )
    assert json.loads(r.stdout)["result"] == "refused"
    # Lossy transfers: api's firewall drops segments, web retransmits.
    server = serve(api, tmp_path, 8081, LOSSY_CONNECTIONS, 10)
    client(web, api.ip, 8081, LOSSY_CONNECTIONS, LOSSY_SEND, 10)
    finish(server)
    # HTTP requests and responses, some answered 500.
    r = web.run([sys.executable, "-c", HTTP_CLIENT, api.ip, "8000", str(HTTP_REQUESTS)], timeout=TIMEOUT)
    assert json.loads(r.stdout) == {"200": HTTP_REQUESTS - HTTP_FAILURES, "500": HTTP_FAILURES}


def netns_retransmits(pod: SimPod) -> int:
    """RetransSegs of the pod's network namespace (/proc/net/snmp)."""
    out = subprocess.run(
        ["ip", "netns", "exec", pod.netns, "cat", "/proc/net/snmp"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    header, values = (line.split() for line in out.splitlines() if line.startswith("Tcp:"))
    return int(values[header.index("RetransSegs")])


def drop_every_4th_data_segment(pod: SimPod, port: int) -> None:
    subprocess.run(
        [
            "ip", "netns", "exec", pod.netns, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(port),
            "-m", "length", "--length", "100:65535", "-m", "statistic", "--mode", "nth", "--every", "4",
            "--packet", "0", "-j", "DROP",
        ],
        check=True,
    )  # fmt: skip


# ---- the test --------------------------------------------------------------------------------------------


def test_every_dashboard_query_returns_data(
    cluster: SimCluster, tmp_path: Path, prometheus_binary: str
) -> None:
    web = cluster.add_pod("web-7d9c6b5f4-x8k2p", namespace="shop", workload="web")
    api = cluster.add_pod("api-0", namespace="backend", workload="api", workload_kind="StatefulSet")
    drop_every_4th_data_segment(api, 8081)
    pods_file = str(tmp_path / "pods.json")
    cluster.write_pods_file(pods_file, NODE)
    exporter = ExporterProcess(["--pods-file", pods_file, "--poll-interval", "0.5", "--node-name", NODE])
    prom: Prometheus | None = None
    held: subprocess.Popen[bytes] | None = None
    held_server: subprocess.Popen[bytes] | None = None
    release = tmp_path / "release-held"
    http_ready = ready_path(tmp_path, "http")
    http_server = api.popen([sys.executable, "-c", HTTP_SERVER, "8000", http_ready], stderr=subprocess.PIPE)
    try:
        wait_for_file(http_ready, timeout=TIMEOUT, proc=http_server)
        exporter.wait_ready()
        prom = podnet_prometheus(tmp_path, exporter.port)
        prom.wait_ready()
        prom.wait_for('up{job="podnet"}', 1)

        web_sel = f'namespace="shop", pod="{web.name}"'
        opened = f'sum(podnet_tcp_connections_opened_total{{{web_sel}, direction="outbound"}})'
        refused = f'sum(podnet_tcp_connections_failed_total{{{web_sel}, reason="refused"}})'
        expected_opened = 0
        for phase in (1, 2):
            if phase == 2:
                # Connections open while the queries run, so active connections are not all zero.
                held_server = serve(api, tmp_path, 8082, HELD)
                ready = ready_path(tmp_path, "held")
                held = web.popen(
                    [
                        sys.executable, ACTIONS, "hold", "--host", api.ip, "--port", "8082",
                        "--connections", str(HELD), "--ready-file", ready, "--release-file", str(release),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )  # fmt: skip
                wait_for_file(ready, timeout=TIMEOUT, proc=held)
                expected_opened += HELD
            run_phase(web, api, tmp_path)
            expected_opened += CONNECTIONS + LOSSY_CONNECTIONS + 1  # + the HTTP keep-alive connection
            # Ground truth reached the exporter, then Prometheus scraped it: only then is the next phase
            # an increase between two samples.
            deadline = time.monotonic() + TIMEOUT
            while (
                exporter.fresh_scrape().value(
                    "podnet_tcp_connections_opened_total",
                    namespace="shop",
                    pod=web.name,
                    direction="outbound",
                )
                != expected_opened
            ):
                assert time.monotonic() < deadline, f"exporter never showed {expected_opened} connections"
            prom.wait_for(opened, expected_opened)
            prom.wait_for(refused, phase)
        # Retransmits: exactly the kernel's count for web's network namespace (only web lives there).
        retransmitted = netns_retransmits(web)
        assert retransmitted > 0
        prom.wait_for(f"sum(podnet_tcp_retransmits_total{{{web_sel}}})", retransmitted)
        # HTTP requests: every one, on both sides, with its status class.
        for side, role in ((web_sel, "client"), (f'namespace="backend", pod="{api.name}"', "server")):
            for status, count in (("2xx", HTTP_REQUESTS - HTTP_FAILURES), ("5xx", HTTP_FAILURES)):
                prom.wait_for(
                    f'sum(podnet_requests_total{{{side}, role="{role}", protocol="http", method="GET", '
                    f'status_class="{status}"}})',
                    2 * count,
                )
        at = time.time()

        # The pods' labels survived the scrape (honor_labels) and the exporter's own target labels did
        # not leak onto them.
        assert prom.query(f'podnet_tcp_sent_bytes_total{{{web_sel}, container="web", workload="web"}}', at)
        assert prom.query('{__name__=~"podnet_tcp_.+", exported_namespace!=""}', at) == []
        build = prom.query("podnet_exporter_build_info", at)
        assert len(build) == 1 and build[0]["metric"]["namespace"] == EXPORTER_TARGET["namespace"]
        sent_to_api = prom.value(
            f'sum(podnet_flow_bytes_total{{{web_sel}, direction="sent", peer_namespace="backend", '
            f'peer_workload="api", peer_kind="pod"}})'
        )
        assert sent_to_api is not None and sent_to_api >= 2 * (
            CONNECTIONS * SEND + LOSSY_CONNECTIONS * LOSSY_SEND
        )

        check_variables(prom, web, api)

        # Every dashboard query, with the variables Grafana would fill in.
        selections = {
            "podnet-overview": {"cluster": ".*", "namespace": "(backend|shop)"},
            "podnet-workload": {
                "cluster": ".*",
                "namespace": "shop",
                "workload": "web",
                "pod": f"({web.name})",
            },
        }
        macros = {"__rate_interval": "1m", "__interval": "15s", "__range": "10m"}
        empty: dict[str, Query] = {}
        for q in dashboard_queries():
            expr = substitute(q.expr, selections[q.dashboard] | macros)
            if not has_data(prom.query(expr, at)):
                empty[q.expr] = q
        errors = prom.query("podnet_exporter_errors_total", at)
        assert errors == [], f"the exporter reported errors: {errors}; log: {exporter.log()}"
        unexpected = {e: f"{q.dashboard} / {q.panel} [{q.ref}]" for e, q in empty.items() if e not in NO_DATA}
        assert unexpected == {}, "dashboard queries without data:\n" + "\n".join(
            f"  {where}: {e}" for e, where in unexpected.items()
        )
        stale = set(NO_DATA) - set(empty)
        assert stale == set(), (
            "NO_DATA lists queries that now return data or are gone from the dashboards; remove them:\n"
            + "\n".join(stale)
        )
    finally:
        release.touch()
        if held is not None:
            held.communicate(timeout=TIMEOUT)
        if held_server is not None:
            held_server.communicate(timeout=TIMEOUT)
        http_server.kill()
        http_server.wait()
        if prom is not None:
            prom.stop()
        assert exporter.stop() == 0, exporter.log()


def check_variables(prom: Prometheus, web: SimPod, api: SimPod) -> None:
    """The variables' label_values queries list the simulated pods (Prometheus' label values API, which
    Grafana uses for them)."""
    want = {
        "namespace": {"backend", "shop"},
        "workload": {"web"},
        "pod": {web.name},
        "cluster": set(),  # no cluster label in a single cluster: "All" (.*) is what matches
    }
    values = {"cluster": ".*", "namespace": "shop", "workload": "web"}
    for path in DASHBOARDS:
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = LABEL_VALUES.match(var["query"])
            assert m, var["query"]
            selector = substitute(m.group("selector"), values)
            got = set(prom.get(f"/api/v1/label/{m.group('label')}/values", **{"match[]": selector}))
            if var["name"] == "namespace":
                assert want["namespace"] <= got, (path.name, got)
                assert api.namespace in got
            else:
                assert got == want[var["name"]], (path.name, var["name"], got)
