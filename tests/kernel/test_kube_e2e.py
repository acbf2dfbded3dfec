"""The Kubernetes API source end to end: the real exporter (a child process) lists and watches the pods
of node sim-node from the fake API server (tests/fake_kube_api.py, on 127.0.0.1) while simulated pods
run known TCP traffic on the real kernel; /metrics must carry the API's labels, survive the API going
away, and forget pods the API deleted once their cgroups are gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from exporter_proc import ExporterProcess, Scrape
from podsim import (
    SimCluster,
    SimPod,
    client_argv,
    full_labels,
    ready_path,
    server_argv,
    wait_for_file,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_kube_api import FakeKubeApi  # lives in tests/, shared with the unit tests

NODE = "sim-node"
TOKEN = "e2e-token"
SENT = "podnet_tcp_sent_bytes_total"
UP = "podnet_exporter_metadata_source_up"
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def token_file() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "token")
        Path(path).write_text(TOKEN + "\n")
        yield path


@pytest.fixture(scope="module")
def api() -> Iterator[FakeKubeApi]:
    # Bookmarks every second, like the real server's (once a minute) but sooner.
    with FakeKubeApi(token=TOKEN, bookmark_interval=1.0) as fake:
        yield fake


def start_exporter(api: FakeKubeApi, token_file: str) -> ExporterProcess:
    return ExporterProcess(
        [
            *("--kube-api", api.url, "--kube-token-file", token_file),
            *("--node-name", NODE, "--poll-interval", "0.3"),
        ]
    )


@pytest.fixture(scope="module")
def exporter(api: FakeKubeApi, token_file: str) -> Iterator[ExporterProcess]:
    proc = start_exporter(api, token_file)
    try:
        proc.wait_ready()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture(autouse=True)
def api_up(api: FakeKubeApi) -> Iterator[None]:
    """Every test starts, and leaves, with the API reachable."""
    api.come_up()
    yield
    api.come_up()


def scrape_until(exporter: ExporterProcess, predicate: Callable[[Scrape], bool], what: str) -> Scrape:
    deadline = time.monotonic() + TIMEOUT
    while True:
        s = exporter.scrape()
        if predicate(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {TIMEOUT}s: {what}\n{exporter.log()}")
        time.sleep(0.1)


def finish(p: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, object]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, (out, err)
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def talk(server_pod: SimPod, client_pod: SimPod, host: str, port: int, send: int, reply: int) -> None:
    """One connection from client_pod to host:port in server_pod: `send` bytes up, `reply` back."""
    ready = ready_path()
    argv = server_argv(port, 1, reply, ready)
    server = server_pod.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_file(ready, proc=server)
    client = client_pod.popen(
        client_argv(host, port, 1, send, reply), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert finish(client)["failed"] == 0
    finish(server)


def test_labels_come_from_the_api(cluster: SimCluster, api: FakeKubeApi, exporter: ExporterProcess) -> None:
    web = cluster.add_pod("web-5d8f9c7b6-x2x9q", workload="web", workload_kind="Deployment")
    db = cluster.add_pod(
        "db-0", namespace="data", workload="db", workload_kind="StatefulSet", driver="cgroupfs"
    )
    for pod in (web, db):
        api.add_pod(pod.pod_json(NODE))
    # Another node's pod is never asked for: the exporter lists with fieldSelector spec.nodeName.
    elsewhere = cluster.add_pod("elsewhere", workload_kind="Pod")
    api.add_pod(elsewhere.pod_json("other-node"))

    talk(db, web, db.ip, 5432, send=1000, reply=4000)
    s = scrape_until(exporter, lambda s: s.value(SENT, **full_labels(web)) == 1000, "labelled from the API")
    assert s.value(SENT, **full_labels(db)) == 4000
    assert s.value("podnet_tcp_received_bytes_total", **full_labels(web)) == 4000
    assert s.value(UP, source="kubernetes") == 1
    assert s.value("podnet_exporter_metadata_relists_total", source="kubernetes") >= 1
    assert s.value("podnet_exporter_metadata_last_sync_timestamp_seconds", source="kubernetes") > 0
    assert s.series(UP, source="file") == []
    assert {r.params.get("fieldSelector") for r in api.requests} == {f"spec.nodeName={NODE}"}
    assert {r.authorization for r in api.requests} == {f"Bearer {TOKEN}"}
    assert s.series("podnet_pod_info", pod="elsewhere") == []


def test_pod_added_after_its_traffic_is_labelled_from_then_on(
    cluster: SimCluster, api: FakeKubeApi, exporter: ExporterProcess
) -> None:
    late = cluster.add_pod("late-bird", workload="late")
    talk(late, late, "127.0.0.1", 7000, send=42, reply=5)
    s = exporter.fresh_scrape()
    # Before the API knows the pod, its UID stands in for the name.
    assert s.value(SENT, pod=late.uid) == 47
    api.add_pod(late.pod_json(NODE))
    s = scrape_until(exporter, lambda s: s.value(SENT, **full_labels(late)) == 47, "labelled once in the API")
    assert s.series(SENT, pod=late.uid) == []


def test_api_outage_keeps_labels_and_readiness(
    cluster: SimCluster, api: FakeKubeApi, exporter: ExporterProcess
) -> None:
    pod = cluster.add_pod("steady-0", workload="steady", workload_kind="StatefulSet")
    api.add_pod(pod.pod_json(NODE))
    talk(pod, pod, "127.0.0.1", 7100, send=300, reply=20)
    scrape_until(exporter, lambda s: s.value(SENT, **full_labels(pod)) == 320, "labelled")
    errors_before = exporter.scrape().value("podnet_exporter_metadata_errors_total", source="kubernetes")

    api.go_down()
    s = scrape_until(exporter, lambda s: s.value(UP, source="kubernetes") == 0, "metadata source down")
    assert s.value("podnet_exporter_metadata_errors_total", source="kubernetes") > errors_before
    # New traffic during the outage is still labelled from the last-known metadata.
    talk(pod, pod, "127.0.0.1", 7101, send=100, reply=0)
    s = scrape_until(exporter, lambda s: s.value(SENT, **full_labels(pod)) == 420, "counted while down")
    assert s.series(SENT, pod=pod.uid) == []
    assert exporter.get("/readyz")[0] == 200

    api.come_up()
    scrape_until(exporter, lambda s: s.value(UP, source="kubernetes") == 1, "metadata source up again")


def test_pod_deleted_from_the_api_disappears_with_its_cgroup(
    cluster: SimCluster, api: FakeKubeApi, exporter: ExporterProcess
) -> None:
    gone = cluster.add_pod("gone-7f8d9c6b5-abcde", workload="gone")
    stays = cluster.add_pod("stays-7f8d9c6b5-fghij", workload="stays")
    for pod in (gone, stays):
        api.add_pod(pod.pod_json(NODE))
    talk(stays, gone, stays.ip, 8000, send=100, reply=10)
    scrape_until(exporter, lambda s: s.value(SENT, **full_labels(gone)) == 100, "labelled")

    api.delete_pod(gone.uid)
    cluster.remove_pod(gone)  # its processes have exited
    s = scrape_until(
        exporter,
        lambda s: s.series(SENT, pod=gone.name) == [] and s.series(SENT, pod=gone.uid) == [],
        "deleted pod gone from /metrics",
    )
    assert s.series("podnet_tcp_connections_opened_total", pod=gone.name) == []
    assert s.series("podnet_pod_info", pod=gone.name) == []
    # The peer keeps its own totals.
    assert s.value(SENT, **full_labels(stays)) == 10


def test_readiness_does_not_wait_for_the_api(cluster: SimCluster, token_file: str) -> None:
    with FakeKubeApi(token=TOKEN) as down:
        down.go_down()
        proc = start_exporter(down, token_file)
        try:
            proc.wait_ready()
            assert proc.scrape().value(UP, source="kubernetes") == 0
            deadline = time.monotonic() + TIMEOUT
            while "cannot connect" not in proc.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            pod = cluster.add_pod("first", workload_kind="Pod")
            down.add_pod(pod.pod_json(NODE))
            down.come_up()
            scrape_until(proc, lambda s: s.value(UP, source="kubernetes") == 1, "source up once the API is")
            scrape_until(proc, lambda s: s.value("podnet_exporter_pods") == 1, "its pod listed")
        finally:
            assert proc.stop() == 0, proc.log()
        log = proc.log_path.read_text(errors="replace")
        errors = [line for line in log.splitlines() if " ERROR exporter.pods.kube" in line]
        assert len(errors) == 1, errors
        assert "cannot connect (Connection refused)" in errors[0]
