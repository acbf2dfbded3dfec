"""Pod churn on the real kernel: hundreds of pods created, given traffic and deleted while the
real exporter polls every 0.2 s. Deleted pods' series must be gone within two polls, their
kernel map entries freed, and the exporter's memory flat.

Churned pods are cheap: each is a cgroup pair in the kubelet layout that shares one of two
anchor pods' network namespaces (podsim.add_pod_in_netns). Their traffic comes from one
helper process (this file run as a script) that moves itself into a pod's cgroup, opens
connections to a server in the other anchor pod and moves back: a socket belongs to the
cgroup it was created in, for its whole life.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator

import pytest
from exporter_proc import ExporterProcess, Scrape, rss_kib
from kernel_maps import cgroups_in_maps
from podsim import SimCluster, SimPod, traffic_argv, wait_for_file

ROUNDS = 100
BATCH = 5  # pods created (and the previous round's deleted) per round: 500 pod lifetimes
CONNECTIONS = 2  # per pod
SEND, REPLY = 300, 70  # bytes per connection
PORT = 7100
WARMUP_ROUNDS = 10
RSS_SLACK_KIB = 20 * 1024


# ---- the traffic helper (this file as a script) -------------------------------------------------


def _move_self(cgroup_dir: str) -> None:
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def _enter_netns(name: str) -> None:
    # Not `ip netns exec`: its private /sys hides the cgroup2 mount this process moves in.
    import ctypes

    clone_newnet = 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{name}") as f:
        if libc.setns(f.fileno(), clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")


def churn_client(home: str, netns: str, host: str, port: int) -> int:
    """Reads "<cgroup dir> <connections>" lines; for each, from inside that cgroup, makes the
    connections (send SEND bytes, read REPLY), goes home and answers "ok"."""
    _enter_netns(netns)
    for line in sys.stdin:
        cgroup_dir, n = line.split()
        _move_self(cgroup_dir)
        try:
            for _ in range(int(n)):
                with socket.create_connection((host, port), timeout=10) as s:
                    s.sendall(b"c" * SEND)
                    s.shutdown(socket.SHUT_WR)
                    got = 0
                    while chunk := s.recv(65536):
                        got += len(chunk)
                    assert got == REPLY, got
        finally:
            _move_self(home)  # the pod's cgroup must be empty to be removed
        print("ok", flush=True)
    return 0


def pod_series(s: Scrape, pods: list[SimPod]) -> list[tuple[str, dict[str, str]]]:
    """Every sample naming one of `pods` (by name, or by UID before its metadata is known)."""
    names = {p.name for p in pods} | {p.uid for p in pods}
    return [(n, dict(ls)) for (n, ls) in s.samples if dict(ls).get("pod") in names]


# ---- the test ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def churn_exporter(pods_file: str) -> Iterator[ExporterProcess]:
    proc = ExporterProcess(["--pods-file", pods_file, "--poll-interval", "0.2"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


def test_pod_churn_leaves_no_series_no_map_entries_and_flat_memory(
    cluster: SimCluster, churn_exporter: ExporterProcess, pods_file: str
) -> None:
    exp = churn_exporter
    client_host = cluster.add_pod("churn-clients", workload="churn-clients")
    server = cluster.add_pod("churn-server", workload="churn-server")
    cluster.write_pods_file(pods_file)
    total = ROUNDS * BATCH * CONNECTIONS
    ready = os.path.join(tempfile.gettempdir(), f"podnet-ready-{uuid.uuid4().hex}")
    srv = server.popen(
        traffic_argv(
            *("server", "--port", PORT, "--connections", total, "--reply-bytes", REPLY),
            *("--ready-file", ready),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_file(ready, proc=srv)
    helper = cluster.cgroup_popen(
        client_host.cgroup_dir,
        [
            *(sys.executable, __file__, "--churn-client", client_host.cgroup_dir),
            *(client_host.netns, server.ip, str(PORT)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert helper.stdin is not None and helper.stdout is not None

    def traffic(pod: SimPod) -> None:
        assert helper.stdin is not None and helper.stdout is not None
        helper.stdin.write(f"{pod.cgroup_dir} {CONNECTIONS}\n".encode())
        helper.stdin.flush()
        assert helper.stdout.readline().strip() == b"ok", "traffic helper failed"

    churned: set[int] = set()
    previous: list[SimPod] = []
    rss_warm = 0
    try:
        for r in range(ROUNDS):
            batch = [cluster.add_pod_in_netns(client_host, f"churn-{r}-{i}") for i in range(BATCH)]
            churned |= {p.cgroup_id for p in batch}
            cluster.write_pods_file(pods_file)
            if r == WARMUP_ROUNDS - 1:
                # The map inspection below sees pods' entries (it is not vacuous): paused, the
                # exporter does not take them out of the kernel.
                exp.proc.send_signal(signal.SIGSTOP)
                try:
                    for pod in batch:
                        traffic(pod)
                    live = cgroups_in_maps(exp.proc.pid)
                    # (Bytes live in socket storage, which bpftool cannot list.)
                    for name in ("tcp_rtt_hist", "tcp_conn_by_cgroup"):
                        assert {p.cgroup_id for p in batch} <= live[name], name
                finally:
                    exp.proc.send_signal(signal.SIGCONT)
            else:
                for pod in batch:
                    traffic(pod)
            for pod in previous:
                cluster.remove_pod(pod)
            cluster.write_pods_file(pods_file)

            s = exp.fresh_scrape(polls=2)
            # The previous round's pods, deleted before these two polls: nothing left.
            assert pod_series(s, previous) == [], f"round {r}: stale series"
            # This round's pods: exact traffic, so the churn really went through the maps.
            for pod in batch:
                labels = {"namespace": pod.namespace, "pod": pod.name}
                assert s.value("podnet_tcp_sent_bytes_total", **labels) == CONNECTIONS * SEND, pod.name
                assert s.value("podnet_tcp_received_bytes_total", **labels) == CONNECTIONS * REPLY
                assert s.value("podnet_pod_info", **labels) == 1
            previous = batch
            if r == WARMUP_ROUNDS - 1:
                rss_warm = rss_kib(exp.proc.pid)

        for pod in previous:
            cluster.remove_pod(pod)
        cluster.write_pods_file(pods_file)
        s = exp.fresh_scrape(polls=2)
        assert pod_series(s, previous) == []
        assert s.value("podnet_exporter_errors_total") == 0, exp.log()
        assert s.value("podnet_exporter_series_dropped_total") == 0
        rss_end = rss_kib(exp.proc.pid)
        leaked = {name: ids & churned for name, ids in cgroups_in_maps(exp.proc.pid).items()}
    finally:
        if helper.stdin is not None:
            helper.stdin.close()
        helper.wait(10)
    result = srv.communicate(timeout=30)[0]
    assert json.loads(result.decode().splitlines()[-1])["connections"] == total

    assert len(churned) == ROUNDS * BATCH
    assert {name: ids for name, ids in leaked.items() if ids} == {}, "map entries of deleted pods"
    assert set(leaked) >= {"tcp_flow_bytes", "tcp_conn_by_cgroup", "tcp_socks_open"}, leaked.keys()
    # Memory is not wall-clock: flat means within a generous bound after warm-up.
    print(f"exporter RSS after warm-up {rss_warm} KiB, at the end {rss_end} KiB")
    assert rss_end - rss_warm <= RSS_SLACK_KIB, (rss_warm, rss_end)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--churn-client":
        sys.exit(churn_client(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
    sys.exit(f"usage: {sys.argv[0]} --churn-client HOME_CGROUP NETNS HOST PORT")
