"""OTLP push end to end on the real kernel: simulated pods run known TCP traffic, the real exporter
(a child process) pushes to a real OTLP receiver on 127.0.0.1, and the points must carry exactly the
bytes each pod sent and received, with the pod's k8s.* attributes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from exporter_proc import ExporterProcess
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from podsim import SimCluster, SimPod, traffic_argv, wait_for_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import otlp_receivers as rx  # lives in tests/, shared with the unit tests

NODE = "sim-node"
CLUSTER = "e2e-cluster"
CONNECTIONS, SEND, REPLY = 20, 1000, 5000
TIMEOUT = 60.0


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> Iterator[rx.Receiver]:
    r = rx.make_receiver(request.param)
    try:
        yield r
    finally:
        rx.close_receiver(r)


def run_traffic(client_pod: SimPod, server_pod: SimPod, tmp_path: Path) -> None:
    """client_pod sends SEND bytes on each of CONNECTIONS connections, server_pod replies REPLY."""
    ready = tmp_path / "server-ready"
    server = server_pod.popen(
        traffic_argv(
            "server", "--port", 8080, "--connections", CONNECTIONS, "--reply-bytes", REPLY,
            "--ready-file", ready, "--timeout", TIMEOUT,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for_file(str(ready), timeout=TIMEOUT, proc=server)
    result = client_pod.run(
        traffic_argv(
            "client", "--host", server_pod.ip, "--port", 8080, "--connections", CONNECTIONS,
            "--send-bytes", SEND, "--expect-bytes", REPLY, "--timeout", TIMEOUT,
        ),
        timeout=TIMEOUT,
    )  # fmt: skip
    assert json.loads(result.stdout)["failed"] == 0
    out, err = server.communicate(timeout=TIMEOUT)
    assert server.returncode == 0, err.decode()
    assert json.loads(out) == {
        "connections": CONNECTIONS,
        "received": CONNECTIONS * SEND,
        "sent": CONNECTIONS * REPLY,
    }


def pod_points(records: list[rx.Record], name: str, pod: SimPod) -> list[rx.Record]:
    return [
        r
        for r in records
        if r.name == name
        and r.attributes.get("k8s.pod.name") == pod.name
        and r.attributes.get("k8s.namespace.name") == pod.namespace
    ]


def test_otlp_carries_exact_bytes_per_pod(cluster: SimCluster, receiver: rx.Receiver, tmp_path: Path) -> None:
    protocol = "grpc" if isinstance(receiver, rx.GrpcReceiver) else "http/protobuf"
    web = cluster.add_pod("web-5d8f9c7b6-x2x9q", namespace="shop", workload="web", workload_kind="Deployment")
    db = cluster.add_pod(
        "db-0",
        namespace="data",
        workload="db",
        workload_kind="StatefulSet",
        driver="cgroupfs",
        runtime="crio",
    )
    pods_file = tmp_path / "pods.json"
    cluster.write_pods_file(str(pods_file), node_name=NODE)
    exporter = ExporterProcess(
        [
            "--pods-file", str(pods_file), "--poll-interval", "0.5", "--node-name", NODE,
            "--cluster-name", CLUSTER, "--otlp-endpoint", receiver.endpoint, "--otlp-protocol", protocol,
            "--otlp-interval", "1", "--otlp-insecure",
        ]
    )  # fmt: skip
    try:
        exporter.wait_ready()
        run_traffic(web, db, tmp_path)
        want = {
            (web.name, "podnet.tcp.sent"): CONNECTIONS * SEND,
            (web.name, "podnet.tcp.received"): CONNECTIONS * REPLY,
            (db.name, "podnet.tcp.sent"): CONNECTIONS * REPLY,
            (db.name, "podnet.tcp.received"): CONNECTIONS * SEND,
        }

        def latest(requests: list[ExportMetricsServiceRequest]) -> dict[tuple[str, str], float]:
            records = rx.flatten(requests[-1:])
            return {
                (pod.name, name): sum(r.value for r in pod_points(records, name, pod))
                for pod in (web, db)
                for name in ("podnet.tcp.sent", "podnet.tcp.received")
            }

        # Cumulative pushes: the totals only grow, so wait for a push that reached them, then check it
        # carries exactly them (more would mean bytes counted twice or for the wrong pod).
        requests = receiver.wait_for(
            lambda rs: bool(rs) and all(latest(rs)[k] >= v for k, v in want.items()), timeout=TIMEOUT
        )
        assert latest(requests) == want
        records = rx.flatten(requests[-1:])
        workload_key = {web.name: "k8s.deployment.name", db.name: "k8s.statefulset.name"}
        for pod in (web, db):
            for name in ("podnet.tcp.sent", "podnet.tcp.received"):
                (point,) = pod_points(records, name, pod)  # one container: one series
                assert point.unit == "By" and point.kind == "sum" and point.is_monotonic
                assert point.temporality == 2  # cumulative
                assert point.attributes == {
                    "k8s.namespace.name": pod.namespace,
                    "k8s.pod.name": pod.name,
                    "k8s.pod.uid": pod.uid,
                    "k8s.container.name": pod.container_name,
                    workload_key[pod.name]: pod.workload,
                }
        resource = records[0].resource
        assert resource["service.name"] == "podnet-exporter"
        assert resource["k8s.node.name"] == NODE
        assert resource["k8s.cluster.name"] == CLUSTER

        # /metrics reads the same snapshots: once nothing moves, both agree.
        scrape = exporter.fresh_scrape()
        labels = {"namespace": web.namespace, "pod": web.name}
        assert scrape.value("podnet_tcp_sent_bytes_total", **labels) == CONNECTIONS * SEND
        assert scrape.value("podnet_tcp_received_bytes_total", **labels) == CONNECTIONS * REPLY
    finally:
        assert exporter.stop() == 0, exporter.log()
