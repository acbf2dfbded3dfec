"""Ground truth on the real kernel: simulated pods run known TCP traffic and the real
exporter (a child process, scraped over HTTP) must report exactly that."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from exporter_proc import ExporterProcess, Scrape
from kernel_maps import cgroups_in_maps
from podsim import (
    SimCluster,
    SimPod,
    client_argv,
    full_labels,
    ready_path,
    server_argv,
    traffic_argv,
    wait_for_file,
)

HERE = Path(__file__).resolve().parent
ACTIONS = str(HERE / "tcp_actions.py")


def actions(*args: object) -> list[str]:
    return [sys.executable, ACTIONS, *map(str, args)]


def finish(p: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, object]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, (out, err)
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def serve(
    pod: SimPod, port: int, connections: int, reply: int = 0, mode: str = "sink"
) -> subprocess.Popen[bytes]:
    ready = ready_path()
    argv = server_argv(port, connections, reply, ready, mode)
    p = pod.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_file(ready, proc=p)
    return p


def run_json(pod: SimPod, argv: list[str]) -> dict[str, object]:
    """Run argv in the pod to completion; its last stdout line, parsed as JSON."""
    return finish(pod.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))


def client(pod: SimPod, host: str, port: int, connections: int, send: int, expect: int) -> dict[str, object]:
    return run_json(pod, client_argv(host, port, connections, send, expect))


def pod_labels(pod: SimPod) -> dict[str, str]:
    return {"namespace": pod.namespace, "pod": pod.name}


def netns_run(pod: SimPod, command: str) -> None:
    """Run a command (words separated by spaces) in the pod's network namespace."""
    subprocess.run(["ip", "netns", "exec", pod.netns, *command.split()], check=True)


def netns_snmp(pod: SimPod, field: str) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", pod.netns, "cat", "/proc/net/snmp"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    tcp = [line.split() for line in out if line.startswith("Tcp:")]
    return int(tcp[1][tcp[0].index(field)])


# ---- issue 2: bytes per pod --------------------------------------------------------------


def test_bytes_per_pod_are_exact_and_labelled(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    web = cluster.add_pod("web-5d8f9c7b6-x2x9q", workload="web", workload_kind="Deployment")
    db = cluster.add_pod(
        "db-0",
        namespace="data",
        workload="db",
        workload_kind="StatefulSet",
        qos="guaranteed",
        driver="cgroupfs",
        runtime="crio",
    )
    lonely = cluster.add_pod("lonely", workload_kind="Pod", qos="besteffort", runtime="docker")
    other_dir, _ = cluster.host_cgroup(f"/system.slice/{cluster.tag}-other.service")
    cluster.write_pods_file(pods_file)

    server = serve(db, 8080, connections=20, reply=5000)
    assert client(web, db.ip, 8080, 20, 1000, 5000)["failed"] == 0
    assert finish(server) == {"connections": 20, "received": 20000, "sent": 100000}

    # Unrelated traffic: inside lonely's own network namespace, and a host service on loopback.
    server = serve(lonely, 7070, connections=3, reply=111)
    client(lonely, "127.0.0.1", 7070, 3, 777, 111)
    finish(server)
    ready = ready_path()
    hs = cluster.cgroup_popen(
        other_dir,
        traffic_argv(
            "server", "--port", 47123, "--connections", 2, "--reply-bytes", 10, "--ready-file", ready
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_file(ready, proc=hs)
    finish(
        cluster.cgroup_popen(
            other_dir,
            traffic_argv(
                "client",
                "--host",
                "127.0.0.1",
                "--port",
                47123,
                "--connections",
                2,
                "--send-bytes",
                50,
                "--expect-bytes",
                10,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )
    finish(hs)

    s = exporter.fresh_scrape()
    sent, recv = "podnet_tcp_sent_bytes_total", "podnet_tcp_received_bytes_total"
    assert s.value(sent, **full_labels(web)) == 20000
    assert s.value(recv, **full_labels(web)) == 100000
    assert s.value(sent, **full_labels(db)) == 100000
    assert s.value(recv, **full_labels(db)) == 20000
    assert s.value(sent, **full_labels(lonely)) == 3 * 777 + 3 * 111
    assert s.value(recv, **full_labels(lonely)) == 3 * 777 + 3 * 111
    # Nothing else is attributed to the pods: one series each, no other containers.
    for pod in (web, db, lonely):
        assert len(s.series(sent, **pod_labels(pod))) == 1
    assert s.series(sent, pod=lonely.name)[0]["workload_kind"] == "Pod"
    # A host service: no namespace or pod, the container is the cgroup's leaf name.
    host = {"namespace": "", "pod": "", "container": f"{cluster.tag}-other.service"}
    assert s.value(sent, **host) == 2 * 50 + 2 * 10
    assert s.value(recv, **host) == 2 * 50 + 2 * 10


def test_pod_without_metadata_is_labelled_when_it_arrives(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    early = cluster.add_pod("early-bird", workload="early")
    server = serve(early, 7000, connections=1, reply=5)
    client(early, "127.0.0.1", 7000, 1, 42, 5)
    finish(server)
    s = exporter.fresh_scrape()
    # Before metadata: the pod UID stands in for the name.
    assert s.value("podnet_tcp_sent_bytes_total", pod=early.uid) == 47
    cluster.write_pods_file(pods_file)
    s = exporter.fresh_scrape()
    assert s.value("podnet_tcp_sent_bytes_total", **full_labels(early)) == 47
    assert s.series("podnet_tcp_sent_bytes_total", pod=early.uid) == []


# ---- issue 3: connections, flows, failures, resets, retransmits, latency --------------------


def test_connections_and_flows_are_exact(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    a = cluster.add_pod("api-6b7c8d9f5-aaaaa", workload="api")
    b = cluster.add_pod("cache-0", namespace="infra", workload="cache", workload_kind="StatefulSet")
    cluster.write_pods_file(pods_file)
    server = serve(b, 6379, connections=12, reply=300)
    client(a, b.ip, 6379, 12, 1234, 300)
    finish(server)

    s = exporter.fresh_scrape()
    opened, closed = "podnet_tcp_connections_opened_total", "podnet_tcp_connections_closed_total"
    assert s.value(opened, **pod_labels(a), direction="outbound") == 12
    assert s.value(opened, **pod_labels(a), direction="inbound") == 0
    assert s.value(opened, **pod_labels(b), direction="inbound") == 12
    assert s.value(closed, **pod_labels(a), direction="outbound") == 12
    assert s.value(closed, **pod_labels(b), direction="inbound") == 12
    active = "podnet_tcp_active_connections"
    assert s.value(active, **pod_labels(a)) == 0
    assert s.value(active, **pod_labels(b)) == 0
    # One connect-duration sample per successful connect.
    assert s.value("podnet_tcp_connect_duration_seconds_count", **pod_labels(a)) == 12
    assert s.value("podnet_tcp_connect_duration_seconds_count", **pod_labels(b)) == 0
    assert s.value("podnet_tcp_connections_failed_total", **pod_labels(a)) == 0

    flow = "podnet_flow_bytes_total"
    to_b = {"peer_namespace": b.namespace, "peer_workload": b.workload, "peer_kind": "pod"}
    to_a = {"peer_namespace": a.namespace, "peer_workload": a.workload, "peer_kind": "pod"}
    assert s.value(flow, **pod_labels(a), direction="sent", **to_b) == 12 * 1234
    assert s.value(flow, **pod_labels(a), direction="received", **to_b) == 12 * 300
    assert s.value(flow, **pod_labels(b), direction="received", **to_a) == 12 * 1234
    assert s.value(flow, **pod_labels(b), direction="sent", **to_a) == 12 * 300
    assert len(s.series(flow, **pod_labels(a))) == 2


def test_active_connections_rise_and_fall(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    a = cluster.add_pod("holder", workload="holder")
    b = cluster.add_pod("sink", workload="sink")
    cluster.write_pods_file(pods_file)
    server = serve(b, 5000, connections=5)
    ready, release = ready_path(), ready_path()
    h = a.popen(
        actions(
            "hold",
            "--host",
            b.ip,
            "--port",
            5000,
            "--connections",
            5,
            "--ready-file",
            ready,
            "--release-file",
            release,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_file(ready, proc=h)
    s = exporter.fresh_scrape()
    assert s.value("podnet_tcp_active_connections", **pod_labels(a), direction="outbound") == 5
    assert s.value("podnet_tcp_active_connections", **pod_labels(b), direction="inbound") == 5
    Path(release).touch()
    finish(h)
    finish(server)
    s = exporter.fresh_scrape()
    assert s.value("podnet_tcp_active_connections", **pod_labels(a)) == 0
    assert s.value("podnet_tcp_active_connections", **pod_labels(b)) == 0
    assert s.value("podnet_tcp_connections_closed_total", **pod_labels(a), direction="outbound") == 5


def test_failed_connects_by_reason(cluster: SimCluster, exporter: ExporterProcess, pods_file: str) -> None:
    a = cluster.add_pod("caller", workload="caller")
    b = cluster.add_pod("callee", workload="callee")
    cluster.write_pods_file(pods_file)
    refused = run_json(a, traffic_argv("connect", "--host", b.ip, "--port", 9, "--timeout", 5))
    assert refused["result"] == "refused"
    # A dropped SYN and a client that gives up after 1 s.
    netns_run(b, "iptables -A INPUT -p tcp --dport 9999 --syn -j DROP")
    timed_out = run_json(a, traffic_argv("connect", "--host", b.ip, "--port", 9999, "--timeout", 1))
    assert timed_out["result"] == "timeout"
    s = exporter.fresh_scrape()
    failed = "podnet_tcp_connections_failed_total"
    assert s.value(failed, **pod_labels(a), reason="refused") == 1
    assert s.value(failed, **pod_labels(a), reason="timeout") == 1
    assert s.value(failed, **pod_labels(a)) == 2
    assert s.value("podnet_tcp_connections_opened_total", **pod_labels(a)) == 0
    assert s.value("podnet_tcp_connect_duration_seconds_count", **pod_labels(a)) == 0
    # The refusing reset arrives at the caller; it was sent by no socket, so by no pod.
    assert s.value("podnet_tcp_resets_total", **pod_labels(a), direction="received") == 1
    assert s.value("podnet_tcp_resets_total", **pod_labels(b)) == 0


def test_resets_sent_and_received(cluster: SimCluster, exporter: ExporterProcess, pods_file: str) -> None:
    a = cluster.add_pod("rst-client", workload="rstc")
    b = cluster.add_pod("rst-server", workload="rsts")
    cluster.write_pods_file(pods_file)
    ready = ready_path()
    srv = b.popen(
        actions("rst-server", "--port", 4000, "--ready-file", ready),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_file(ready, proc=srv)
    assert run_json(a, actions("rst-client", "--host", b.ip, "--port", 4000))["reset"] is True
    finish(srv)
    s = exporter.fresh_scrape()
    resets = "podnet_tcp_resets_total"
    assert s.value(resets, **pod_labels(b), direction="sent") == 1
    assert s.value(resets, **pod_labels(a), direction="received") == 1
    assert s.value(resets, **pod_labels(a), direction="sent") == 0
    assert s.value(resets, **pod_labels(b), direction="received") == 0


def test_retransmits_match_the_kernels_count(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    a = cluster.add_pod("lossy-client", workload="lossy")
    b = cluster.add_pod("lossy-server", workload="lossysrv")
    cluster.write_pods_file(pods_file)
    # Drop every 4th data segment arriving at the server: the client must retransmit.
    netns_run(
        b,
        "iptables -A INPUT -p tcp --dport 3000 -m length --length 100:65535 "
        "-m statistic --mode nth --every 4 --packet 0 -j DROP",
    )
    before = netns_snmp(a, "RetransSegs")
    server = serve(b, 3000, connections=4, reply=10)
    client(a, b.ip, 3000, 4, 200_000, 10)
    finish(server)
    # Closing connections may still retransmit a FIN after the client returns: compare once
    # the kernel's counters stood still across a whole scrape.
    for _ in range(20):
        kernel_a, kernel_b = netns_snmp(a, "RetransSegs") - before, netns_snmp(b, "RetransSegs")
        s = exporter.fresh_scrape()
        if (kernel_a, kernel_b) == (netns_snmp(a, "RetransSegs") - before, netns_snmp(b, "RetransSegs")):
            break
    assert kernel_a > 0
    assert s.value("podnet_tcp_retransmits_total", **pod_labels(a)) == kernel_a
    assert s.value("podnet_tcp_retransmits_total", **pod_labels(b)) == kernel_b


def _hist(s: Scrape, name: str, **labels: str) -> list[tuple[float, float]]:
    out = []
    for (n, ls), v in s.samples.items():
        d = dict(ls)
        if n == name + "_bucket" and all(d.get(k) == val for k, val in labels.items()):
            out.append((float(d["le"]), v))
    return sorted(out)


def _bucket_of(buckets: list[tuple[float, float]], q: float) -> tuple[float, float]:
    """(lower, upper] of the bucket holding quantile q."""
    total = buckets[-1][1]
    prev = 0.0
    for le, cum in buckets:
        if cum >= q * total:
            return prev, le
        prev = le
    raise AssertionError("empty histogram")


def _delta(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    earlier = dict(before)
    return [(le, cum - earlier.get(le, 0.0)) for le, cum in after]


def test_rtt_agrees_with_ss(cluster: SimCluster, exporter: ExporterProcess, pods_file: str) -> None:
    a = cluster.add_pod("pinger", workload="pinger")
    b = cluster.add_pod("ponger", workload="ponger")
    cluster.write_pods_file(pods_file)
    server = serve(b, 2000, connections=1, mode="echo")
    ready, hold = ready_path(), ready_path()
    pp = a.popen(
        actions(
            "pingpong",
            "--host",
            b.ip,
            "--port",
            2000,
            "--rounds",
            200,
            "--ready-file",
            ready,
            "--hold-file",
            hold,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_file(ready, proc=pp)
    # Compare the samples taken while the connection keeps pinging with what ss reports
    # meanwhile: the median of each must fall in the same or a neighbouring bucket.
    before = _hist(exporter.fresh_scrape(), "podnet_tcp_rtt_seconds", **pod_labels(a))
    readings = []
    for _ in range(10):
        ss = subprocess.run(
            ["ip", "netns", "exec", a.netns, "ss", "-tinH", "dst", b.ip],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        readings.append(float(ss.split(" rtt:")[1].split("/")[0]) / 1000)
        time.sleep(0.05)
    after = _hist(exporter.fresh_scrape(), "podnet_tcp_rtt_seconds", **pod_labels(a))
    Path(hold).touch()
    finish(pp)
    finish(server)
    window = _delta(after, before)
    assert window[-1][1] >= 5, window  # samples were taken during the window
    lo, hi = _bucket_of(window, 0.5)
    rtt = statistics.median(readings)
    assert lo / 2 < rtt <= hi * 2, (lo, hi, readings)


def test_delay_line_moves_rtt_and_connect_time(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    from delayline import setup

    delay_ms = 20
    a = cluster.add_pod("far-client", workload="far")
    b = cluster.add_pod("far-server", workload="farsrv")
    cluster.write_pods_file(pods_file)
    setup(a.netns, b.netns, "dl0", "10.252.0.1", "10.252.0.2")
    ready = ready_path()
    relay = subprocess.Popen(
        [sys.executable, str(HERE / "delayline.py"), a.netns, b.netns, "dl0", str(delay_ms), ready],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_file(ready, proc=relay)
        server = serve(b, 2000, connections=5, mode="echo")
        run_json(
            a, actions("pingpong", "--host", "10.252.0.2", "--port", 2000, "--connections", 5, "--rounds", 10)
        )
        finish(server)
    finally:
        relay.kill()
        relay.wait()
    s = exporter.fresh_scrape()
    two_d = 2 * delay_ms / 1000
    connect = _hist(s, "podnet_tcp_connect_duration_seconds", **pod_labels(a))
    assert connect[-1][1] == 5
    # Every connect took one round trip through the delay line: about 2D, never less.
    lo, hi = _bucket_of(connect, 0.0001)
    assert lo < two_d <= hi * 1.01 or two_d <= lo < 2 * two_d, (lo, hi)
    _, hi_all = _bucket_of(connect, 1.0)
    assert hi_all <= 4 * two_d
    rtt = _hist(s, "podnet_tcp_rtt_seconds", **pod_labels(a))
    lo, hi = _bucket_of(rtt, 0.5)
    assert lo < two_d * 1.6 and hi >= two_d, (lo, hi)


# ---- lifecycle: dead cgroups -----------------------------------------------------------------


def test_dead_container_is_freed_and_its_pod_keeps_counting(
    cluster: SimCluster, exporter: ExporterProcess, pods_file: str
) -> None:
    a = cluster.add_pod("restarter", workload="restarter")
    b = cluster.add_pod("steady", workload="steady")
    cluster.write_pods_file(pods_file)
    server = serve(b, 8000, connections=3, reply=10)
    # Paused, the exporter does not take the entries out of the kernel: they can be seen.
    exporter.proc.send_signal(signal.SIGSTOP)
    try:
        client(a, b.ip, 8000, 3, 100, 10)
        finish(server)
        old_id = a.cgroup_id
        # (Its bytes were counted in its sockets' storage, which bpftool cannot list.)
        assert old_id in cgroups_in_maps(exporter.proc.pid)["tcp_conn_by_cgroup"]
        assert old_id in cgroups_in_maps(exporter.proc.pid)["tcp_rtt_hist"]
    finally:
        exporter.proc.send_signal(signal.SIGCONT)
    sent = "podnet_tcp_sent_bytes_total"
    assert exporter.fresh_scrape().value(sent, **full_labels(a)) == 300

    cluster.restart_container(a)
    cluster.write_pods_file(pods_file)
    server = serve(b, 8000, connections=2, reply=10)
    client(a, b.ip, 8000, 2, 100, 10)
    finish(server)
    s = exporter.fresh_scrape(polls=3)
    # The restarted container continues its series: the counter never went backwards.
    assert s.value(sent, **full_labels(a)) == 500
    assert len(s.series(sent, **pod_labels(a))) == 1
    assert s.value("podnet_tcp_connections_opened_total", **pod_labels(a), direction="outbound") == 5
    assert old_id not in cgroups_in_maps(exporter.proc.pid)["tcp_conn_by_cgroup"]
    assert old_id not in cgroups_in_maps(exporter.proc.pid)["tcp_rtt_hist"]

    cluster.remove_pod(a)
    cluster.write_pods_file(pods_file)
    s = exporter.fresh_scrape(polls=3)
    assert s.series(sent, pod=a.name) == []
    assert s.series("podnet_tcp_connections_opened_total", pod=a.name) == []
    assert a.cgroup_id not in cgroups_in_maps(exporter.proc.pid)["tcp_flow_bytes"]
    # The peer keeps its own totals.
    assert s.value(sent, **full_labels(b)) == 50
