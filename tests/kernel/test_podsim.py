"""Tests of the kernel-test harness itself: podsim.py and traffic.py."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import podsim
import pytest
from podsim import SimCluster, SimPod, traffic_argv, wait_for_file

TIMEOUT = 20.0
_ready_seq = itertools.count()


def _json(out: bytes) -> dict[str, object]:
    lines = out.decode().strip().splitlines()
    assert len(lines) == 1, out
    result: dict[str, object] = json.loads(lines[0])
    return result


def _start_server(pod: SimPod, tmp_path: Path, *args: str | float) -> subprocess.Popen[bytes]:
    ready = tmp_path / f"ready-{pod.name}-{next(_ready_seq)}"  # a fresh file per server
    proc = pod.popen(
        traffic_argv("server", "--ready-file", ready, "--timeout", TIMEOUT, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_file(str(ready), timeout=TIMEOUT, proc=proc)
    return proc


def _finish(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err.decode()
    return _json(out)


def _expected_cgroup_path(pod: SimPod) -> str:
    uid_ = pod.uid.replace("-", "_")
    if pod.driver == "systemd":
        scope = {"containerd": "cri-containerd", "crio": "crio", "docker": "docker"}[pod.runtime]
        pod_slice = (
            f"kubepods-pod{uid_}.slice"
            if pod.qos == "guaranteed"
            else f"kubepods-{pod.qos}.slice/kubepods-{pod.qos}-pod{uid_}.slice"
        )
        return f"/kubepods.slice/{pod_slice}/{scope}-{pod.container_id}.scope"
    qos = "" if pod.qos == "guaranteed" else f"{pod.qos}/"
    return f"/kubepods/{qos}pod{pod.uid}/{pod.container_id}"


def test_pods_get_their_cgroup_and_netns(cluster: SimCluster) -> None:
    pods = [
        cluster.add_pod("web-0", qos="burstable", driver="systemd", runtime="containerd"),
        cluster.add_pod("db-0", namespace="data", qos="guaranteed", driver="cgroupfs", runtime="crio"),
        cluster.add_pod("job-0", qos="besteffort", driver="systemd", runtime="docker", workload_kind="Job"),
    ]
    root_netns = podsim.netns_inode()
    seen_netns = set()
    for pod in pods:
        assert len(pod.container_id) == 64
        assert pod.cgroup_path == _expected_cgroup_path(pod)
        assert pod.cgroup_dir == cluster.cgroup_root + pod.cgroup_path
        assert os.stat(pod.cgroup_dir).st_ino == pod.cgroup_id
        assert os.path.dirname(pod.cgroup_dir) == pod.pod_cgroup_dir
        # a process started in the pod: its own view, and the view from outside through /proc/<pid>
        probe = "import os; print(os.getpid()); print(open('/proc/self/cgroup').read())"
        r = pod.run([sys.executable, "-c", probe], timeout=TIMEOUT)
        lines = r.stdout.decode().splitlines()
        assert f"0::{pod.cgroup_path}" in lines
        proc = pod.popen(["sleep", "30"])
        try:
            podsim.wait_exec(proc, ["sleep", "30"])
            assert podsim.proc_cgroup_v2(proc.pid) == pod.cgroup_path
            assert f"0::{pod.cgroup_path}\n" in Path(f"/proc/{proc.pid}/cgroup").read_text()
            inode = podsim.netns_inode(proc.pid)
            assert inode == pod.netns_inode
            assert inode != root_netns
            seen_netns.add(inode)
        finally:
            proc.kill()
            proc.wait(TIMEOUT)
    assert len(seen_netns) == len(pods)
    # the pod's interface: eth0 with its IP, default route via the node
    r = pods[0].run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"], timeout=TIMEOUT)
    assert f"inet {pods[0].ip}/24" in r.stdout.decode()
    r = pods[0].run(["ip", "route", "show", "default"], timeout=TIMEOUT)
    assert f"default via {cluster.node_ip} dev eth0" in r.stdout.decode()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_pod_to_pod_traffic_is_exact(cluster: SimCluster, tmp_path: Path, concurrency: int) -> None:
    a = cluster.add_pod("client-a", workload="client")
    b = cluster.add_pod("server-b", workload="server", driver="cgroupfs")
    server = _start_server(b, tmp_path, "--port", 8080, "--reply-bytes", 3000, "--connections", 5)
    r = a.run(
        traffic_argv(
            "client",
            "--host",
            b.ip,
            "--port",
            8080,
            "--connections",
            5,
            "--send-bytes",
            1000,
            "--expect-bytes",
            3000,
            "--concurrency",
            concurrency,
            "--timeout",
            TIMEOUT,
        ),
        timeout=TIMEOUT,
    )
    assert _json(r.stdout) == {"connections": 5, "sent": 5000, "received": 15000, "failed": 0}
    assert _finish(server) == {"connections": 5, "received": 5000, "sent": 15000}


def test_echo_delay_and_failed_connects(cluster: SimCluster, tmp_path: Path) -> None:
    a = cluster.add_pod("a")
    b = cluster.add_pod("b")
    # nothing listens yet: refused; the client counts the failure and exits non-zero
    r = a.run(traffic_argv("connect", "--host", b.ip, "--port", 9000, "--timeout", 5), timeout=TIMEOUT)
    assert _json(r.stdout) == {"result": "refused", "errno": 111}
    r = a.run(
        traffic_argv("client", "--host", b.ip, "--port", 9000, "--send-bytes", 10, "--timeout", 5),
        timeout=TIMEOUT,
        check=False,
    )
    assert r.returncode == 1
    assert _json(r.stdout) == {"connections": 1, "sent": 0, "received": 0, "failed": 1}
    # echo mode
    server = _start_server(b, tmp_path, "--port", 9000, "--mode", "echo", "--connections", 1)
    script = textwrap.dedent(
        f"""
        import socket
        s = socket.create_connection(({b.ip!r}, 9000), timeout=10)
        s.sendall(b"hello\\nworld\\n")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(100):
            got += chunk
        print(got.decode().replace("\\n", "|"))
        """
    )
    r = a.run([sys.executable, "-c", script], timeout=TIMEOUT)
    assert r.stdout.decode().strip() == "hello|world|"
    assert _finish(server) == {"connections": 1, "received": 12, "sent": 12}
    # delayed reply, and a wrong --expect-bytes is reported as a failure
    server = _start_server(b, tmp_path, "--port", 9001, "--reply-bytes", 7, "--delay-ms", 50)
    r = a.run(
        traffic_argv("client", "--host", b.ip, "--port", 9001, "--send-bytes", 3, "--expect-bytes", 8),
        timeout=TIMEOUT,
        check=False,
    )
    assert r.returncode == 1
    assert _json(r.stdout) == {"connections": 1, "sent": 3, "received": 7, "failed": 1}
    assert _finish(server) == {"connections": 1, "received": 3, "sent": 7}


def test_node_reaches_pod_and_close_leaves_nothing(cluster: SimCluster, tmp_path: Path) -> None:
    pod = cluster.add_pod("web-1", workload="web")
    other_dir, other_id = cluster.host_cgroup(f"/system.slice/{cluster.tag}-other.service")
    assert os.stat(other_dir).st_ino == other_id
    server = _start_server(pod, tmp_path, "--port", 80, "--reply-bytes", 100, "--connections", 2)
    r = cluster.node_run(
        traffic_argv("client", "--host", pod.ip, "--port", 80, "--connections", 2, "--send-bytes", 10),
        timeout=TIMEOUT,
    )
    assert _json(r.stdout) == {"connections": 2, "sent": 20, "received": 200, "failed": 0}
    assert _finish(server) == {"connections": 2, "received": 20, "sent": 200}
    # node processes: node netns, host cgroup /system.slice/<tag>-node.service
    r = cluster.node_run(["sh", "-c", "grep ^0:: /proc/self/cgroup; ip -o -4 addr show dev br0"])
    out = r.stdout.decode()
    assert f"0::/system.slice/{cluster.tag}-node.service\n" in out
    assert f"inet {cluster.node_ip}/24" in out
    assert os.stat(cluster.node_cgroup_dir).st_ino == cluster.node_cgroup_id
    # leave processes running: close() must kill them
    pod.popen(["sleep", "60"])
    cluster.node_popen(["sleep", "60"])
    cluster.cgroup_popen(other_dir, ["sleep", "60"])

    cluster.close()
    cluster.close()  # idempotent
    assert not [n for n in os.listdir("/var/run/netns") if n.startswith(cluster.tag)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, check=True).stdout.decode()
    assert cluster.tag not in links
    for d in (pod.cgroup_dir, pod.pod_cgroup_dir, cluster.node_cgroup_dir, other_dir):
        assert not os.path.exists(d), d
    assert not os.path.exists(os.path.join(podsim.STATE_DIR, f"{cluster.tag}.json"))
    with pytest.raises(RuntimeError):
        cluster.add_pod("late")


def test_leftovers_of_a_crashed_run_are_removed() -> None:
    prefix = "x" + secrets.token_hex(2)  # private prefix: parallel runs must not clean ours first
    crash = textwrap.dedent(
        f"""
        import os, subprocess, sys
        sys.path.insert(0, {os.path.dirname(podsim.__file__)!r})
        import podsim
        c = podsim.SimCluster(prefix={prefix!r})
        p = c.add_pod("crashy")
        proc = p.popen(["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        podsim.wait_exec(proc, ["sleep", "60"])
        print(c.tag, p.cgroup_dir, p.pod_cgroup_dir, c.node_cgroup_dir, flush=True)
        os._exit(0)  # no close(), no atexit: like a crash
        """
    )
    try:
        r = subprocess.run([sys.executable, "-c", crash], capture_output=True, timeout=TIMEOUT, check=True)
        tag, *dirs = r.stdout.decode().split()
        assert any(n.startswith(tag) for n in os.listdir("/var/run/netns"))
        assert all(os.path.isdir(d) for d in dirs)
        with SimCluster(prefix=prefix) as c:
            assert c.leftovers_removed == [tag]
            assert not any(n.startswith(tag) for n in os.listdir("/var/run/netns"))
            assert not any(os.path.exists(d) for d in dirs)
        assert not any(n.startswith(c.tag) for n in os.listdir("/var/run/netns"))
    finally:
        podsim.cleanup_leftovers(prefix)


def test_pod_json_is_realistic(cluster: SimCluster, tmp_path: Path) -> None:
    d1 = cluster.add_pod("web-7d4b9c8f5-abcde", workload="web")
    d2 = cluster.add_pod("web-7d4b9c8f5-fghij", workload="web", qos="guaranteed")
    sts = cluster.add_pod("db-0", namespace="data", workload="db", workload_kind="StatefulSet")
    ds = cluster.add_pod("agent-x1", workload="agent", workload_kind="DaemonSet", runtime="crio")
    job = cluster.add_pod("migrate-q2", workload="migrate", workload_kind="Job", qos="besteffort")
    bare = cluster.add_pod("debug", workload_kind="Pod", runtime="docker")

    j = d1.pod_json("node-a")
    md, spec, st = j["metadata"], j["spec"], j["status"]
    assert (j["apiVersion"], j["kind"]) == ("v1", "Pod")
    assert (md["name"], md["namespace"], md["uid"]) == (d1.name, "default", d1.uid)
    tmpl = md["labels"]["pod-template-hash"]
    assert md["ownerReferences"] == [
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": f"web-{tmpl}",
            "uid": md["ownerReferences"][0]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert d2.pod_json("n")["metadata"]["ownerReferences"] == md["ownerReferences"]  # same ReplicaSet
    assert spec["nodeName"] == "node-a"
    assert spec["containers"][0]["name"] == d1.container_name == "web"
    assert st["phase"] == "Running"
    assert (st["podIP"], st["podIPs"], st["hostIP"]) == (d1.ip, [{"ip": d1.ip}], cluster.node_ip)
    cs = st["containerStatuses"][0]
    assert cs["containerID"] == f"containerd://{d1.container_id}"
    assert (cs["name"], cs["ready"]) == ("web", True)
    assert st["qosClass"] == "Burstable"
    assert d2.pod_json("n")["status"]["qosClass"] == "Guaranteed"

    owner = sts.pod_json("n")["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("StatefulSet", "db", True)
    ds_json = ds.pod_json("n")
    assert ds_json["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
    assert ds_json["status"]["containerStatuses"][0]["containerID"] == f"cri-o://{ds.container_id}"
    owner = job.pod_json("n")["metadata"]["ownerReferences"][0]
    assert (owner["apiVersion"], owner["kind"], owner["name"]) == ("batch/v1", "Job", "migrate")
    assert job.pod_json("n")["status"]["qosClass"] == "BestEffort"
    bare_json = bare.pod_json("n")
    assert "ownerReferences" not in bare_json["metadata"]
    assert bare_json["status"]["containerStatuses"][0]["containerID"] == f"docker://{bare.container_id}"

    path = tmp_path / "pods.json"
    cluster.write_pods_file(str(path), node_name="node-a")
    podlist = json.loads(path.read_text())
    assert (podlist["apiVersion"], podlist["kind"]) == ("v1", "List")
    assert [p["metadata"]["uid"] for p in podlist["items"]] == [p.uid for p in cluster.pods]
    assert podlist["items"][0] == j
