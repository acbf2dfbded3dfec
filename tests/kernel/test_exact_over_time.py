"""Exact under churn and over time, on the real kernel with the real exporter:

- a peer deleted and its IP reused by another workload never rewrites a flow's history;
- the exporter killed with SIGKILL mid-traffic and restarted loses nothing, resets nothing
  (the programs keep counting while it is down) and knows the connections still open;
- a fresh start counts the connections that already exist as active;
- one pod meeting 100,000 distinct peers leaves every other pod's flows exact and labelled,
  the kernel maps bounded and the exporter's memory flat.

The drip client (this file run as a script) keeps one connection open and sends fixed chunks
on it, and opens short connections now and then, so traffic flows all through a restart.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from exporter_proc import ExporterProcess, Scrape, new_state_dirs, reset, rss_kib
from podsim import SimCluster, SimPod, ready_path, server_argv, traffic_argv, wait_for_file
from prometheus_client.openmetrics.parser import text_string_to_metric_families

HERE = Path(__file__).resolve()
SENT = "podnet_tcp_sent_bytes_total"
FLOW = "podnet_flow_bytes_total"
ACTIVE = "podnet_tcp_active_connections"


def labels(pod: SimPod) -> dict[str, str]:
    return {"namespace": pod.namespace, "pod": pod.name}


def flow(s: Scrape, pod: SimPod, **peer: str) -> float:
    return s.value(FLOW, **labels(pod), direction="sent", **peer)


def serve(pod: SimPod, port: int, connections: int) -> subprocess.Popen[bytes]:
    ready = ready_path()
    p = pod.popen(
        server_argv(port, connections, 0, ready, "sink"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for_file(ready, proc=p)
    return p


def finish(p: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, int]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, (out, err)
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def send(pod: SimPod, host: str, port: int, nbytes: int) -> None:
    argv = traffic_argv("client", "--host", host, "--port", port, "--connections", 1, "--send-bytes", nbytes)
    pod.run(argv)


@pytest.fixture
def state() -> Iterator[tuple[str, str]]:
    """Pinned maps and saved totals shared by the exporters of one test."""
    dirs = new_state_dirs()
    try:
        yield dirs
    finally:
        reset(dirs)


def start(pods_file: str, state: tuple[str, str], *extra: str) -> ExporterProcess:
    exp = ExporterProcess(["--pods-file", pods_file, "--poll-interval", "0.2", *extra], state=state)
    exp.wait_ready()
    return exp


def created(exp: ExporterProcess, pod: SimPod) -> float:
    """The OpenMetrics `_created` of the pod's sent-bytes counter."""
    status, _, body = exp.get("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == "podnet_tcp_sent_bytes_created" and s.labels.get("pod") == pod.name:
                return float(s.value)
    raise AssertionError("no _created sample")


# ---- peers deleted, IPs reused ------------------------------------------------------------------


def test_peer_deletion_and_ip_reuse_never_rewrite_history(
    cluster: SimCluster, tmp_path: Path, state: tuple[str, str]
) -> None:
    pods_file = str(tmp_path / "pods.json")
    a = cluster.add_pod("frontend-1", namespace="shop", workload="frontend")
    b = cluster.add_pod("backend-1", namespace="shop", workload="backend")
    cluster.write_pods_file(pods_file)
    exp = start(pods_file, state)
    try:
        server = serve(b, 8000, 1)
        send(a, b.ip, 8000, 100_000)
        finish(server)
        s = exp.fresh_scrape(polls=3)
        assert flow(s, a, peer_workload="backend") == 100_000
        reused_ip = b.ip

        # B is deleted: out of the pods file, its cgroup gone, its address free.
        cluster.remove_pod(b)
        cluster.release_ip(b)
        cluster.write_pods_file(pods_file)
        s = exp.fresh_scrape(polls=3)
        assert flow(s, a, peer_workload="backend") == 100_000, "a deleted peer keeps its bytes"
        assert flow(s, a, peer_kind="external") == 0, "never re-labelled external"

        # C, of another workload, gets B's address; A talks to it.
        c = cluster.add_pod("ledger-1", namespace="billing", workload="ledger", ip=reused_ip)
        assert c.ip == reused_ip
        cluster.write_pods_file(pods_file)
        exp.fresh_scrape(polls=2)  # the exporter knows C before A talks to it
        server = serve(c, 8000, 1)
        send(a, c.ip, 8000, 10_000)
        finish(server)
        s = exp.fresh_scrape(polls=3)
        assert flow(s, a, peer_namespace="billing", peer_workload="ledger") == 10_000, (
            "IP reuse carries no history"
        )
        assert flow(s, a, peer_namespace="shop", peer_workload="backend") == 100_000
        assert flow(s, a, peer_kind="external") == 0
        assert s.value(SENT, **labels(a)) == 110_000
    finally:
        assert exp.stop() == 0, exp.log()


# ---- SIGKILL and restart --------------------------------------------------------------------------

CHUNKS, CHUNK, EVERY, SHORT = 150, 1000, 15, 777  # a short connection every EVERY chunks


def drip(host: str, port: int, gap_s: float, release: str, chunks: int = CHUNKS) -> int:
    """One long connection sending `chunks` x CHUNK bytes, a short connection of SHORT bytes
    every EVERY chunks; the long one stays open until `release` exists. Prints its totals."""
    sent = 0
    with socket.create_connection((host, port), timeout=30) as long:
        for i in range(chunks):
            long.sendall(b"d" * CHUNK)
            sent += CHUNK
            if i % EVERY == 0:
                with socket.create_connection((host, port), timeout=30) as short:
                    short.sendall(b"s" * SHORT)
                    sent += SHORT
            time.sleep(gap_s)
        print(json.dumps({"sent": sent, "chunks_done": True}), flush=True)
        while not os.path.exists(release):
            time.sleep(0.02)
    return 0


def test_sigkill_mid_traffic_then_restart_loses_nothing_and_resets_nothing(
    cluster: SimCluster, tmp_path: Path, state: tuple[str, str]
) -> None:
    pods_file = str(tmp_path / "pods.json")
    a = cluster.add_pod("dripper-1", workload="dripper")
    b = cluster.add_pod("sink-1", workload="sink")
    cluster.write_pods_file(pods_file)
    shorts = len(range(0, CHUNKS, EVERY))
    expected = CHUNKS * CHUNK + shorts * SHORT
    release = str(tmp_path / "release")
    first = start(pods_file, state)
    server = serve(b, 8100, 1 + shorts)
    client = a.popen(
        [sys.executable, str(HERE), "--drip", b.ip, "8100", "0.04", release], stdout=subprocess.PIPE
    )
    try:
        time.sleep(1.5)
        before = first.fresh_scrape()
        sent_before = before.value(SENT, **labels(a))
        since = created(first, a)
        assert 0 < sent_before < expected, "killed mid-traffic"
        first.stop(signal.SIGKILL)
        time.sleep(1.5)  # traffic goes on while no exporter runs

        second = start(pods_file, state)
        try:
            assert client.stdout is not None
            assert json.loads(client.stdout.readline())["sent"] == expected
            s = second.fresh_scrape(polls=3)
            assert s.value(SENT, **labels(a)) == expected, second.log()
            assert flow(s, a, peer_workload="sink") == expected
            assert s.value(SENT, **labels(a)) >= sent_before
            assert created(second, a) == since, "no reset: the counters' start stays"
            # The long connection opened before the restart is still active, counted once.
            assert s.value(ACTIVE, **labels(a), direction="outbound") == 1
            Path(release).touch()
            assert client.wait(30) == 0
            assert finish(server)["received"] == expected
            s = second.fresh_scrape(polls=3)
            assert s.value(ACTIVE, **labels(a), direction="outbound") == 0
            assert (
                s.value("podnet_tcp_connections_closed_total", **labels(a), direction="outbound")
                == 1 + shorts
            )
            assert s.value("podnet_exporter_errors_total") == 0, second.log()
            assert "continuing the counts" in second.log()
        finally:
            second.stop()
    finally:
        Path(release).touch()
        client.kill()
        server.kill()


def test_a_container_restarted_while_no_exporter_runs_keeps_its_pods_totals(
    cluster: SimCluster, tmp_path: Path, state: tuple[str, str]
) -> None:
    """The dead container's cgroup can no longer be resolved when the exporter comes back:
    its totals stay with its pod under the name saved with them."""
    pods_file = str(tmp_path / "pods.json")
    a = cluster.add_pod("restarted-1", workload="restarted")
    b = cluster.add_pod("peer-1", workload="peer")
    cluster.write_pods_file(pods_file)
    first = start(pods_file, state)
    server = serve(b, 8500, 2)
    send(a, b.ip, 8500, 3000)
    assert first.fresh_scrape(polls=3).value(SENT, **labels(a)) == 3000
    first.stop(signal.SIGKILL)
    cluster.restart_container(a)
    cluster.write_pods_file(pods_file)
    second = start(pods_file, state)
    try:
        send(a, b.ip, 8500, 500)
        finish(server)
        s = second.fresh_scrape(polls=4)
        assert s.value(SENT, **labels(a)) == 3500, second.log()
        assert len(s.series(SENT, **labels(a))) == 1
        assert flow(s, a, peer_workload="peer") == 3500
    finally:
        second.stop()


def test_a_surge_upgrade_waits_for_the_old_exporter_then_continues_its_counts(
    cluster: SimCluster, tmp_path: Path, state: tuple[str, str]
) -> None:
    """Two exporters on one state would each take the kernel's final entries and miss the
    other's: the new one waits until the old one has gone, then adopts its programs."""
    pods_file = str(tmp_path / "pods.json")
    a = cluster.add_pod("client-1", workload="client")
    b = cluster.add_pod("server-1", workload="server")
    cluster.write_pods_file(pods_file)
    old = start(pods_file, state)
    new = ExporterProcess(["--pods-file", pods_file, "--poll-interval", "0.2"], state=state)
    try:
        server = serve(b, 8400, 2)
        send(a, b.ip, 8400, 5000)
        deadline = time.monotonic() + 30
        while "waiting for the exporter holding" not in new.log():
            assert time.monotonic() < deadline, new.log()
            time.sleep(0.1)
        assert new.proc.poll() is None, "waiting, not failed"
        assert old.stop() == 0
        new.wait_ready()
        send(a, b.ip, 8400, 7000)
        finish(server)
        s = new.fresh_scrape(polls=3)
        assert s.value(SENT, **labels(a)) == 12_000
        assert "continuing the counts" in new.log()
    finally:
        old.stop()
        new.stop()


def test_fresh_start_counts_open_connections_as_active(
    cluster: SimCluster, tmp_path: Path, state: tuple[str, str]
) -> None:
    pods_file = str(tmp_path / "pods.json")
    a = cluster.add_pod("early-1", workload="early")
    b = cluster.add_pod("late-1", workload="late")
    cluster.write_pods_file(pods_file)
    release = str(tmp_path / "release")
    # One connection more than the drip makes: the listener stays open while the exporter
    # starts (sock_diag tells accepted connections by their listener).
    server = serve(b, 8200, 2 + len(range(0, 3, EVERY)))
    client = a.popen(
        [sys.executable, str(HERE), "--drip", b.ip, "8200", "0", release, "3"], stdout=subprocess.PIPE
    )
    try:
        assert client.stdout is not None
        client.stdout.readline()  # the connection is up before the exporter starts
        exp = start(pods_file, state, "--fresh")
        try:
            s = exp.fresh_scrape(polls=2)
            assert s.value(ACTIVE, **labels(a), direction="outbound") == 1
            assert s.value(ACTIVE, **labels(b), direction="inbound") == 1
            Path(release).touch()
            assert client.wait(30) == 0
            send(a, b.ip, 8200, 0)
            finish(server)
            s = exp.fresh_scrape(polls=3)
            assert s.value(ACTIVE, **labels(a), direction="outbound") == 0
            assert s.value(ACTIVE, **labels(b), direction="inbound") == 0
            # The drip's connection, and the last one (opened and closed while counting).
            assert s.value("podnet_tcp_connections_closed_total", **labels(a), direction="outbound") == 2
        finally:
            exp.stop()
    finally:
        Path(release).touch()
        client.kill()
        server.kill()


def test_pins_asked_for_where_there_is_no_bpffs_is_one_line_with_the_fix(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter",
            "run",
            "--listen",
            "127.0.0.1:1",
            "--pin-dir",
            str(tmp_path / "pins"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        cwd=HERE.parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "is not a bpf filesystem" in lines[0] and "--pin-dir none" in lines[0], lines[0]


# ---- 100,000 peers ---------------------------------------------------------------------------------

PEERS = 100_000
CRAWLS = 2
PEER_NET = "10.96.0.0/15"  # 131,072 addresses, all local in the crawler's own network namespace


def crawl(peers: int, port: int) -> int:
    """Connect to `peers` distinct addresses of PEER_NET (all local: the server in this
    namespace accepts them), send one byte on each; print the count."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(4096)
    done = 0
    for i in range(peers):
        addr = f"10.{96 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
        with socket.create_connection((addr, port), timeout=10) as c:
            c.sendall(b"x")
            conn, _ = srv.accept()
            conn.recv(1)
            conn.close()
        done += 1
    print(json.dumps({"peers": done}), flush=True)
    return 0


def test_one_pod_meeting_100000_peers_leaves_other_flows_exact_and_state_bounded(
    cluster: SimCluster, tmp_path: Path, state: tuple[str, str]
) -> None:
    pods_file = str(tmp_path / "pods.json")
    crawler = cluster.add_pod("crawler-1", workload="crawler")
    q = cluster.add_pod("shopper-1", workload="shopper")
    r = cluster.add_pod("store-1", workload="store")
    cluster.write_pods_file(pods_file)
    subprocess.run(["ip", "-n", crawler.netns, "route", "add", "local", PEER_NET, "dev", "lo"], check=True)
    # Small maps: 8192 sockets' slots, 32768 flows and hand-overs: the crawl overflows them
    # many times over unless state is bounded by what each poll interval sees (with room
    # for a poll slowed down by the crawl itself on a busy machine).
    exp = start(pods_file, state, "--map-entries", "8192")
    try:
        exp.fresh_scrape()
        rounds = 0
        max_entries = 0.0
        rss = [rss_kib(exp.proc.pid)]
        for crawl_round in range(CRAWLS):
            argv = [sys.executable, str(HERE), "--crawl", str(PEERS), str(9000 + crawl_round)]
            crawl_proc = crawler.popen(argv, stdout=subprocess.PIPE)
            while crawl_proc.poll() is None:
                server = serve(r, 8300, 1)
                send(q, r.ip, 8300, 1000)
                finish(server)
                rounds += 1
                max_entries = max(max_entries, exp.scrape().value("podnet_exporter_map_entries"))
                time.sleep(0.3)
            out, _ = crawl_proc.communicate()
            assert crawl_proc.returncode == 0
            assert json.loads(out.decode().splitlines()[-1])["peers"] == PEERS
            exp.fresh_scrape(polls=3)
            rss.append(rss_kib(exp.proc.pid))
        s = exp.scrape()
        print(
            f"exporter RSS (KiB) before, after each crawl: {rss}; max entries {max_entries}; rounds {rounds}"
        )
        # Every one of the crawler's bytes, every one of its peers external, none unknown.
        # Both ends are in the crawler pod: one byte sent and one received per peer.
        assert s.value(SENT, **labels(crawler)) == CRAWLS * PEERS
        assert s.value("podnet_tcp_received_bytes_total", **labels(crawler)) == CRAWLS * PEERS
        assert flow(s, crawler, peer_kind="external") == CRAWLS * PEERS
        assert flow(s, crawler, peer_kind="unknown") == 0
        # The other pods: exact and labelled by workload throughout.
        assert flow(s, q, peer_workload="store") == 1000 * rounds
        assert flow(s, q, peer_kind="unknown") == 0
        assert s.value(
            "podnet_flow_bytes_total", **labels(r), direction="received", peer_workload="shopper"
        ) == (1000 * rounds)
        failures = {
            k: v for (n, k), v in s.samples.items() if n == "podnet_exporter_map_update_failures_total" and v
        }
        assert failures == {}, failures
        # Bounded: a few polls' worth of entries, not one per peer; memory flat.
        assert max_entries < 20_000, max_entries
        assert s.value("podnet_exporter_map_entries", map="tcp_flow_bytes") < 32768
        # Memory: the second 100,000 peers cost no more than the first; nothing per peer is kept.
        assert rss[2] - rss[1] < 8 * 1024, rss
        assert len(s.series(FLOW, **labels(crawler))) <= 4, "per-workload series, never per IP"
    finally:
        exp.stop()


if __name__ == "__main__":
    if len(sys.argv) in (6, 7) and sys.argv[1] == "--drip":
        chunks = int(sys.argv[6]) if len(sys.argv) == 7 else CHUNKS
        sys.exit(drip(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], chunks))
    if len(sys.argv) == 4 and sys.argv[1] == "--crawl":
        sys.exit(crawl(int(sys.argv[2]), int(sys.argv[3])))
    sys.exit(f"usage: {sys.argv[0]} --drip HOST PORT GAP_S RELEASE [CHUNKS] | --crawl PEERS PORT")
