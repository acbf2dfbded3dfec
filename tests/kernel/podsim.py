"""Simulated Kubernetes pods on the real kernel, for kernel tests.

To the kernel a pod is a cgroup (v2) plus a network namespace. ``SimCluster`` builds both the way a
kubelet with containerd/CRI-O/docker would lay them out, so an exporter under test sees exactly what
it would see on a node, and ``SimPod.pod_json`` gives the matching Pod object as the API server would.

Topology (everything outside the root network namespace; the root namespace is never touched)::

    netns <tag>-node:  br0 10.251.0.1/24   <tag>v0  <tag>v1 ...     (node; processes: node_popen)
                                              |        |
    netns <tag>-pod0:                       eth0     (10.251.0.2/24, default via 10.251.0.1)
    netns <tag>-pod1:                                eth0 (10.251.0.3/24, ...)

``<tag>`` is ``<prefix>`` plus 6 random hex digits, unique per ``SimCluster``. Every resource a cluster
creates is recorded (before it is created) in ``/run/podnet-podsim/<tag>.json`` together with the owner's
pid, so a later cluster with the same prefix can remove what a crashed run left behind without touching
clusters that are still alive.

Needs root, iproute2 and a cgroup2 mount (found through /proc/self/mountinfo).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STATE_DIR = "/run/podnet-podsim"
SUBNET_PREFIX = "10.251.0."
NODE_IP = SUBNET_PREFIX + "1"
MAX_PODS = 253  # .2 .. .254
TRAFFIC_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traffic.py")

QOS_CLASSES = {"guaranteed": "Guaranteed", "burstable": "Burstable", "besteffort": "BestEffort"}
DRIVERS = ("systemd", "cgroupfs")
# runtime -> (systemd scope prefix, containerID scheme in the Pod status)
RUNTIMES = {
    "containerd": ("cri-containerd", "containerd"),
    "crio": ("crio", "cri-o"),
    "docker": ("docker", "docker"),
}
WORKLOAD_KINDS = ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod")
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for pod-template-hash
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,4}$")


class PodCommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the tail of stdout/stderr."""

    def __str__(self) -> str:
        msg = super().__str__()
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
                msg += f"\n--- {label} (tail) ---\n{text[-2000:]}"
        return msg


# --------------------------------------------------------------------------------------------------
# small helpers


def cgroup2_mount() -> str | None:
    """Mount point of the cgroup2 hierarchy, from /proc/self/mountinfo; None when absent."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        if right.split(" ", 1)[0] == "cgroup2":
            mount_point = left.split(" ")[4]
            return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mount_point)
    return None


def proc_cgroup_v2(pid: int) -> str:
    """The cgroup-v2 path of a process as /proc/<pid>/cgroup shows it (the ``0::`` line)."""
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].rstrip("\n")
    raise LookupError(f"pid {pid} has no cgroup v2 entry")


def netns_inode(pid: int | str = "self") -> int:
    """Inode of a process's network namespace (what BPF's netns inum shows)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def wait_for_file(path: str, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait (bounded) until ``path`` exists. If ``proc`` exits first, fail with its output."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate(timeout=5) if proc.stdout or proc.stderr else (b"", b"")
            raise RuntimeError(
                f"process {proc.args!r} exited with {proc.returncode} before creating {path}:\n"
                f"{(out or b'').decode(errors='replace')}\n{(err or b'').decode(errors='replace')}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def wait_exec(proc: subprocess.Popen[bytes], argv: Sequence[str], timeout: float = 5.0) -> None:
    """Wait (bounded) until a process from popen()/node_popen() has exec'd ``argv`` itself, i.e. has
    joined its cgroup and netns: popen() returns while the wrapper shell may still be running."""
    want = "\0".join(argv) + "\0"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{proc.pid}/cmdline", encoding="utf-8", errors="replace") as f:
                if f.read() == want:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before exec'ing {argv!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {proc.pid} did not exec {argv!r} within {timeout} s")
        time.sleep(0.002)


def traffic_argv(*args: str | float | os.PathLike[str]) -> list[str]:
    """argv running traffic.py with this interpreter, e.g. traffic_argv("server", "--port", 80)."""
    return [sys.executable, TRAFFIC_PY, *(str(a) for a in args)]


def ready_path() -> str:
    """A fresh path for traffic.py's --ready-file."""
    return os.path.join(tempfile.gettempdir(), f"podnet-ready-{uuid.uuid4().hex}")


def server_argv(port: int, connections: int, reply: int, ready: str, mode: str = "sink") -> list[str]:
    """traffic.py server: accept `connections`, answer each with `reply` bytes (per `mode`)."""
    return traffic_argv(
        *("server", "--port", port, "--connections", connections, "--reply-bytes", reply),
        *("--mode", mode, "--ready-file", ready),
    )


def client_argv(host: str, port: int, connections: int, send: int, expect: int) -> list[str]:
    """traffic.py client: `connections` connections, each sending `send` and expecting `expect` bytes."""
    return traffic_argv(
        *("client", "--host", host, "--port", port, "--connections", connections),
        *("--send-bytes", send, "--expect-bytes", expect),
    )


def full_labels(pod: SimPod) -> dict[str, str]:
    """The pod labels podnet puts on every pod series."""
    return {
        "namespace": pod.namespace,
        "pod": pod.name,
        "container": pod.container_name,
        "workload": pod.workload,
        "workload_kind": pod.workload_kind,
    }


def _ip(*args: str, netns: str | None = None, batch: str | None = None, check: bool = True) -> str:
    argv = ["ip"]
    if netns is not None:
        argv += ["-n", netns]
    if batch is not None:
        argv += ["-batch", "-"]
    argv += list(args)
    r = subprocess.run(argv, input=(batch or "").encode(), capture_output=True, timeout=30, check=False)
    if check and r.returncode != 0:
        raise PodCommandError(r.returncode, argv, r.stdout, r.stderr)
    return r.stdout.decode()


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir("/var/run/netns"))
    except FileNotFoundError:
        return []


def _proc_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # field 22, starttime


def _alive(pid: int, start: int | None) -> bool:
    now = _proc_start_time(pid)
    return now is not None and (start is None or now == start)


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """Serialises cgroup-tree and registry changes between all podsim users on the machine."""
    os.makedirs(STATE_DIR, exist_ok=True)
    fd = os.open(os.path.join(STATE_DIR, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_parents() -> set[str]:
    try:
        with open(os.path.join(STATE_DIR, "parents.json"), encoding="utf-8") as f:
            return set(json.load(f))
    except (FileNotFoundError, ValueError):
        return set()


def _save_parents(parents: set[str]) -> None:
    _write_json(os.path.join(STATE_DIR, "parents.json"), sorted(parents))


def _kill_cgroup(cg: str) -> None:
    if not os.path.isdir(cg):
        return
    try:
        with open(os.path.join(cg, "cgroup.kill"), "w") as f:
            f.write("1")
        return
    except OSError:
        pass
    for _ in range(5):  # kernels before 5.14: no cgroup.kill
        try:
            with open(os.path.join(cg, "cgroup.procs"), encoding="ascii") as f:
                pids = [int(x) for x in f.read().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _rmdir_cgroups(dirs: Sequence[str], timeout: float) -> list[str]:
    """rmdir deepest first, retrying while processes exit. Returns the dirs that could not be removed."""
    pending = sorted(set(dirs), key=lambda d: d.count("/"), reverse=True)
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for d in pending:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise
                left.append(d)
        if not left or time.monotonic() > deadline:
            return left
        for d in left:  # a wrapper shell may have joined after the first kill
            _kill_cgroup(d)
        pending = left
        time.sleep(0.01)


def _remove_empty_parents() -> None:
    """rmdir harness-created parent cgroups that are empty now. Caller holds _state_lock()."""
    parents = _load_parents()
    for d in sorted(parents, key=lambda d: d.count("/"), reverse=True):
        try:
            os.rmdir(d)
            parents.discard(d)
        except FileNotFoundError:
            parents.discard(d)
        except OSError:
            pass  # still used by another cluster (or by something else): keep it
    _save_parents(parents)


def _teardown(record: Mapping[str, Any], timeout: float = 5.0, locked: bool = False) -> list[str]:
    """Remove what ``record`` lists: kill processes in its cgroups, delete its netns, rmdir its cgroups,
    then empty harness-created parents. Returns a list of problems (empty when everything is gone).
    ``locked``: the caller already holds _state_lock()."""
    problems: list[str] = []
    cgroups = list(record.get("cgroups", []))
    for cg in sorted(cgroups, key=lambda d: d.count("/"), reverse=True):
        _kill_cgroup(cg)
    existing = set(_list_netns())
    for ns in reversed(record.get("netns", [])):
        if ns in existing:
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
            if r.returncode != 0:
                problems.append(f"ip netns del {ns}: {r.stderr.decode().strip()}")
    left = _rmdir_cgroups(cgroups, timeout)
    problems += [f"cgroup not removable (still busy): {d}" for d in left]
    if locked:
        _remove_empty_parents()
    else:
        with _state_lock():
            _remove_empty_parents()
    return problems


def cleanup_leftovers(prefix: str) -> list[str]:
    """Remove resources of earlier, no longer running clusters with this prefix (their owner process
    is gone). Clusters whose owner is alive are left alone. Returns the tags removed."""
    removed: list[str] = []
    tag_re = re.compile(rf"^{re.escape(prefix)}[0-9a-f]{{6}}$")
    ns_re = re.compile(rf"^({re.escape(prefix)}[0-9a-f]{{6}})-")
    # Whole scan under the lock: a cluster registers itself (under the lock) before creating anything,
    # so nothing that is being built right now can be mistaken for a leftover.
    with _state_lock():
        live: set[str] = set()
        for fname in sorted(os.listdir(STATE_DIR)):
            if not fname.endswith(".json") or not tag_re.match(fname[:-5]):
                continue
            path = os.path.join(STATE_DIR, fname)
            try:
                with open(path, encoding="utf-8") as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                rec = {"tag": fname[:-5], "pid": -1}
            if rec.get("pid", -1) > 0 and _alive(int(rec["pid"]), rec.get("start")):
                live.add(fname[:-5])
                continue
            if _teardown(rec, locked=True):
                continue  # keep the record: the next cleanup retries
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            removed.append(fname[:-5])
        # netns without a live registry entry, e.g. when the registry was lost
        for ns in _list_netns():
            m = ns_re.match(ns)
            if m and m.group(1) not in live:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
                if m.group(1) not in removed:
                    removed.append(m.group(1))
    return removed


def _k8s_hash(n: int = 10) -> str:
    return "".join(secrets.choice(_HASH_ALPHABET) for _ in range(n))


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------
# pods


@dataclass
class SimPod:
    name: str
    namespace: str
    uid: str
    container_id: str  # 64 hex, without the runtime scheme
    container_name: str
    ip: str
    netns: str  # `ip netns` name
    cgroup_dir: str  # absolute directory of the container's cgroup
    cgroup_id: int  # os.stat(cgroup_dir).st_ino == bpf_get_current_cgroup_id() of its processes
    workload: str
    workload_kind: str
    qos: str = "burstable"
    driver: str = "systemd"
    runtime: str = "containerd"
    pod_cgroup_dir: str = ""  # the pod-level cgroup (parent of cgroup_dir)
    cgroup_path: str = ""  # cgroup_dir relative to the cgroup2 mount, as in /proc/<pid>/cgroup
    ifname: str = "eth0"  # interface inside the pod netns
    host_veth: str = ""  # peer of eth0, in the node netns, enslaved to br0
    image: str = "docker.io/library/python:3.11-slim"
    labels: dict[str, str] = field(default_factory=dict)
    owner: dict[str, Any] | None = None  # the controller ownerReference, None for a bare Pod
    created: str = ""
    own_ip: bool = True  # False: shares another pod's netns (add_pod_in_netns); no podIP shown
    _cluster: SimCluster | None = field(default=None, repr=False, compare=False)

    @property
    def netns_inode(self) -> int:
        return os.stat(f"/var/run/netns/{self.netns}").st_ino

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start argv in this pod's cgroup and network namespace (cgroup joined first)."""
        assert self._cluster is not None
        return self._cluster.cgroup_popen(self.cgroup_dir, argv, netns=self.netns, **kw)

    def run(
        self, argv: Sequence[str], timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run argv to completion in the pod; stdout/stderr are captured."""
        return _run(self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE), argv, timeout, check)

    def pod_json(self, node_name: str) -> dict[str, Any]:
        """The Pod as `kubectl get pod -o json` would show it on node ``node_name``."""
        scheme = RUNTIMES[self.runtime][1]
        qos_class = QOS_CLASSES[self.qos]
        resources: dict[str, Any] = {}
        if qos_class == "Guaranteed":
            resources = {
                "limits": {"cpu": "100m", "memory": "64Mi"},
                "requests": {"cpu": "100m", "memory": "64Mi"},
            }
        elif qos_class == "Burstable":
            resources = {"requests": {"cpu": "50m", "memory": "32Mi"}}
        node_ip = self._cluster.node_ip if self._cluster is not None else NODE_IP
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "resourceVersion": str(100000 + int(self.uid[:4], 16)),
            "creationTimestamp": self.created,
            "labels": dict(self.labels),
        }
        if self.owner is not None:
            metadata["ownerReferences"] = [dict(self.owner)]
            if self.workload_kind != "StatefulSet":
                metadata["generateName"] = f"{self.owner['name']}-"
        restart = "Never" if self.workload_kind in ("Job", "CronJob") else "Always"
        image_digest = hashlib.sha256(self.image.encode()).hexdigest()
        container_status = {
            "name": self.container_name,
            "containerID": f"{scheme}://{self.container_id}",
            "image": self.image,
            "imageID": f"{self.image.rsplit(':', 1)[0]}@sha256:{image_digest}",
            "ready": True,
            "started": True,
            "restartCount": 0,
            "lastState": {},
            "state": {"running": {"startedAt": self.created}},
        }
        conditions = [
            {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": self.created}
            for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")
        ]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": {
                "nodeName": node_name,
                "containers": [
                    {
                        "name": self.container_name,
                        "image": self.image,
                        "imagePullPolicy": "IfNotPresent",
                        "resources": resources,
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File",
                    }
                ],
                "restartPolicy": restart,
                "dnsPolicy": "ClusterFirst",
                "schedulerName": "default-scheduler",
                "serviceAccountName": "default",
                "terminationGracePeriodSeconds": 30,
                "enableServiceLinks": True,
                "preemptionPolicy": "PreemptLowerPriority",
                "priority": 0,
            },
            "status": {
                "phase": "Running",
                "conditions": conditions,
                "hostIP": node_ip,
                "hostIPs": [{"ip": node_ip}],
                **({"podIP": self.ip, "podIPs": [{"ip": self.ip}]} if self.own_ip else {}),
                "qosClass": qos_class,
                "startTime": self.created,
                "containerStatuses": [container_status],
            },
        }


def _run(
    proc: subprocess.Popen[bytes], argv: Sequence[str], timeout: float, check: bool
) -> subprocess.CompletedProcess[bytes]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise subprocess.TimeoutExpired(list(argv), timeout, out, err) from None
    if check and proc.returncode != 0:
        raise PodCommandError(proc.returncode, list(argv), out, err)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


# --------------------------------------------------------------------------------------------------
# the cluster


class SimCluster:
    """A node (network namespace with bridge br0) plus pods (cgroup + netns + veth on br0)."""

    def __init__(self, prefix: str = "pn") -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must match {_PREFIX_RE.pattern} (interface names are 15 chars max)")
        if os.geteuid() != 0:
            raise PermissionError("SimCluster needs root")
        root = cgroup2_mount()
        if root is None:
            raise RuntimeError("no cgroup2 mount in /proc/self/mountinfo")
        self.prefix = prefix
        self.cgroup_root = root
        self.node_ip = NODE_IP
        self.pods: list[SimPod] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._netns: list[str] = []
        self._cgroups: list[str] = []
        self._owners: dict[tuple[str, str, str], dict[str, str]] = {}
        self._next_idx = 0
        self._closed = False
        self.leftovers_removed = cleanup_leftovers(prefix)

        with _state_lock():
            taken = {n.split("-", 1)[0] for n in _list_netns()} | {
                f[:-5] for f in os.listdir(STATE_DIR) if f.endswith(".json")
            }
            for _ in range(100):
                tag = prefix + secrets.token_hex(3)
                if tag not in taken:
                    break
            else:
                raise RuntimeError("could not find a free cluster tag")
            self.tag = tag
            self._registry = os.path.join(STATE_DIR, f"{tag}.json")
            self._save_registry()
        atexit.register(self.close)

        try:
            self.node_ns = f"{tag}-node"
            self._add_netns(self.node_ns)
            _ip(
                netns=self.node_ns,
                batch=(
                    "link set lo up\n"
                    "link add br0 type bridge\n"
                    f"addr add {NODE_IP}/24 dev br0\n"
                    "link set br0 up\n"
                ),
            )
            self.node_cgroup_dir, self.node_cgroup_id = self.host_cgroup(f"/system.slice/{tag}-node.service")
        except BaseException:
            self.close()
            raise

    # -- registry ----------------------------------------------------------------------------------
    def _save_registry(self) -> None:
        _write_json(
            self._registry,
            {
                "tag": self.tag,
                "prefix": self.prefix,
                "pid": os.getpid(),
                "start": _proc_start_time(os.getpid()),
                "netns": self._netns,
                "cgroups": self._cgroups,
            },
        )

    def _add_netns(self, name: str) -> None:
        self._netns.append(name)
        self._save_registry()
        _ip("netns", "add", name)

    def _make_cgroup(self, rel: str, leaves: int) -> list[str]:
        """mkdir the chain ``rel`` under the cgroup2 root. The last ``leaves`` components belong to this
        cluster (they must not exist yet); missing parents are created and recorded as harness parents
        (removed on teardown when empty). Returns the absolute leaf dirs, outermost first."""
        parts = [p for p in rel.strip("/").split("/") if p]
        if not parts or any(p in (".", "..") for p in parts) or leaves > len(parts):
            raise ValueError(f"bad cgroup path {rel!r}")
        dirs = [os.path.join(self.cgroup_root, *parts[: i + 1]) for i in range(len(parts))]
        own = dirs[len(dirs) - leaves :]
        with _state_lock():
            for d in own:
                if os.path.exists(d):
                    raise FileExistsError(f"cgroup {d} already exists; refusing to adopt it")
            parents = _load_parents()
            new_parents = False
            for d in dirs[: len(dirs) - leaves]:
                if not os.path.isdir(d):
                    os.mkdir(d)
                    parents.add(d)
                    new_parents = True
            if new_parents:
                _save_parents(parents)
            self._cgroups.extend(own)
            self._save_registry()
            for d in own:
                os.mkdir(d)
        return own

    # -- processes ---------------------------------------------------------------------------------
    def cgroup_popen(
        self, cgroup_dir: str, argv: Sequence[str], netns: str | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        """Start argv in ``cgroup_dir`` (joined first), then in ``netns`` if given. With netns=None the
        process stays in the root network namespace: it may then only talk to loopback."""
        if self._closed:
            raise RuntimeError("cluster is closed")
        if not argv:
            raise ValueError("empty argv")
        script = 'echo $$ > "$1/cgroup.procs" || exit 125; shift'
        if netns is not None:
            script = 'echo $$ > "$1/cgroup.procs" || exit 125; ns=$2; shift 2; exec ip netns exec "$ns" "$@"'
            full = ["sh", "-c", script, "sh", cgroup_dir, netns, *argv]
        else:
            full = ["sh", "-c", script + '; exec "$@"', "sh", cgroup_dir, *argv]
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = subprocess.Popen(full, **kw)
        self._procs.append(proc)
        return proc

    def node_popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start argv in the node netns, in the host cgroup /system.slice/<tag>-node.service."""
        return self.cgroup_popen(self.node_cgroup_dir, argv, netns=self.node_ns, **kw)

    def node_run(
        self, argv: Sequence[str], timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        return _run(
            self.node_popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE), argv, timeout, check
        )

    def host_cgroup(self, name: str) -> tuple[str, int]:
        """Create a non-pod cgroup, e.g. "/system.slice/pn-other.service" (relative to the cgroup2
        mount). It must not exist yet. Removed by close(). Returns (dir, cgroup id)."""
        (d,) = self._make_cgroup(name, leaves=1)
        return d, os.stat(d).st_ino

    # -- pods --------------------------------------------------------------------------------------
    def _owner_for(self, namespace: str, kind: str, workload: str) -> dict[str, str]:
        key = (namespace, kind, workload)
        if key not in self._owners:
            self._owners[key] = {
                "uid": str(uuid.uuid4()),
                "hash": _k8s_hash(10),
                "cron": str(int(time.time()) // 60),
            }
        return self._owners[key]

    def add_pod(
        self,
        name: str,
        namespace: str = "default",
        workload: str | None = None,
        workload_kind: str = "Deployment",
        qos: str = "burstable",
        driver: str = "systemd",
        runtime: str = "containerd",
        container_name: str | None = None,
        image: str = "docker.io/library/python:3.11-slim",
        labels: Mapping[str, str] | None = None,
        ip: str | None = None,
    ) -> SimPod:
        """Create a pod: cgroup in the kubelet layout, netns with eth0 on the node bridge, next free IP
        (or ``ip``: a removed pod's, freed with release_ip(), as a real cluster reuses them).
        ``workload`` defaults to ``name``; ``container_name`` defaults to the workload name."""
        if self._closed:
            raise RuntimeError("cluster is closed")
        qos = qos.lower()
        if qos not in QOS_CLASSES:
            raise ValueError(f"qos must be one of {sorted(QOS_CLASSES)}")
        if driver not in DRIVERS:
            raise ValueError(f"driver must be one of {DRIVERS}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {sorted(RUNTIMES)}")
        if workload_kind not in WORKLOAD_KINDS:
            raise ValueError(f"workload_kind must be one of {WORKLOAD_KINDS}")
        idx = self._next_idx
        if idx >= MAX_PODS:
            raise RuntimeError("subnet full")
        self._next_idx += 1  # never reused, even when this add_pod fails half-way
        workload = workload or name
        uid = str(uuid.uuid4())
        container_id = secrets.token_hex(32)

        # cgroup, kubelet layout
        if driver == "systemd":
            scope = f"{RUNTIMES[runtime][0]}-{container_id}.scope"
            uid_ = uid.replace("-", "_")
            if qos == "guaranteed":
                chain = ["kubepods.slice", f"kubepods-pod{uid_}.slice"]
            else:
                chain = ["kubepods.slice", f"kubepods-{qos}.slice", f"kubepods-{qos}-pod{uid_}.slice"]
            chain.append(scope)
        else:
            chain = ["kubepods"] + ([] if qos == "guaranteed" else [qos]) + [f"pod{uid}", container_id]
        pod_dir, cg_dir = self._make_cgroup("/".join(chain), leaves=2)

        # network
        ip = ip or f"{SUBNET_PREFIX}{idx + 2}"
        netns = f"{self.tag}-pod{idx}"
        host_veth = f"{self.tag}v{idx}"
        self._add_netns(netns)
        _ip(
            netns=self.node_ns,
            batch=(
                f"link add {host_veth} type veth peer name eth0 netns {netns}\n"
                f"link set {host_veth} master br0\n"
                f"link set {host_veth} up\n"
            ),
        )
        _ip(
            netns=netns,
            batch=(
                "link set lo up\n"
                f"addr add {ip}/24 dev eth0\n"
                "link set eth0 up\n"
                f"route add default via {NODE_IP} dev eth0\n"
            ),
        )

        # metadata
        own = self._owner_for(namespace, workload_kind, workload)
        pod_labels: dict[str, str] = {"app": workload}
        owner: dict[str, Any] | None = None
        if workload_kind == "Deployment":
            pod_labels["pod-template-hash"] = own["hash"]
            owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{workload}-{own['hash']}"}
        elif workload_kind == "ReplicaSet":
            owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": workload}
        elif workload_kind == "StatefulSet":
            pod_labels["controller-revision-hash"] = f"{workload}-{own['hash']}"
            pod_labels["statefulset.kubernetes.io/pod-name"] = name
            m = re.search(r"-(\d+)$", name)
            if m:
                pod_labels["apps.kubernetes.io/pod-index"] = m.group(1)
            owner = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": workload}
        elif workload_kind == "DaemonSet":
            pod_labels["controller-revision-hash"] = own["hash"]
            pod_labels["pod-template-generation"] = "1"
            owner = {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": workload}
        elif workload_kind in ("Job", "CronJob"):
            job = workload if workload_kind == "Job" else f"{workload}-{own['cron']}"
            job_uid = own["uid"] if workload_kind == "Job" else str(uuid.uuid5(uuid.UUID(own["uid"]), job))
            pod_labels = {
                "batch.kubernetes.io/controller-uid": job_uid,
                "batch.kubernetes.io/job-name": job,
                "controller-uid": job_uid,
                "job-name": job,
            }
            owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": job_uid}
        else:  # bare Pod
            pod_labels = {"run": name}
        if owner is not None:
            owner.setdefault("uid", own["uid"])
            owner["controller"] = True
            owner["blockOwnerDeletion"] = True
        pod_labels.update(labels or {})

        pod = SimPod(
            name=name,
            namespace=namespace,
            uid=uid,
            container_id=container_id,
            container_name=container_name or workload,
            ip=ip,
            netns=netns,
            cgroup_dir=cg_dir,
            cgroup_id=os.stat(cg_dir).st_ino,
            workload=workload,
            workload_kind=workload_kind,
            qos=qos,
            driver=driver,
            runtime=runtime,
            pod_cgroup_dir=pod_dir,
            cgroup_path="/" + os.path.relpath(cg_dir, self.cgroup_root),
            host_veth=host_veth,
            image=image,
            labels=pod_labels,
            owner=owner,
            created=_timestamp(),
            _cluster=self,
        )
        self.pods.append(pod)
        return pod

    def add_pod_in_netns(self, host: SimPod, name: str, namespace: str = "default") -> SimPod:
        """A cheap pod for churn tests: its own cgroup (kubelet layout, systemd driver,
        containerd, a Deployment's pod) but the network namespace of ``host``, so creating
        it costs two mkdirs and no netns or veth. Its Pod object shows no podIP (the address
        is ``host``'s). Remove it with remove_pod()."""
        if self._closed:
            raise RuntimeError("cluster is closed")
        uid = str(uuid.uuid4())
        container_id = secrets.token_hex(32)
        uid_ = uid.replace("-", "_")
        chain = [
            "kubepods.slice",
            "kubepods-burstable.slice",
            f"kubepods-burstable-pod{uid_}.slice",
            f"cri-containerd-{container_id}.scope",
        ]
        pod_dir, cg_dir = self._make_cgroup("/".join(chain), leaves=2)
        workload = name.rsplit("-", 1)[0] if "-" in name else name
        own = self._owner_for(namespace, "Deployment", workload)
        pod = SimPod(
            name=name,
            namespace=namespace,
            uid=uid,
            container_id=container_id,
            container_name=workload,
            ip=host.ip,
            netns=host.netns,
            cgroup_dir=cg_dir,
            cgroup_id=os.stat(cg_dir).st_ino,
            workload=workload,
            workload_kind="Deployment",
            pod_cgroup_dir=pod_dir,
            cgroup_path="/" + os.path.relpath(cg_dir, self.cgroup_root),
            labels={"app": workload, "pod-template-hash": own["hash"]},
            owner={
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": f"{workload}-{own['hash']}",
                "uid": own["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            },
            created=_timestamp(),
            own_ip=False,
            _cluster=self,
        )
        self.pods.append(pod)
        return pod

    def pods_json(self, node_name: str = "sim-node") -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "List",
            "items": [p.pod_json(node_name) for p in self.pods],
            "metadata": {"resourceVersion": ""},
        }

    def restart_container(self, pod: SimPod) -> None:
        """What the kubelet does when a container restarts: a new container id and cgroup in
        the same pod cgroup; the old cgroup is removed (its processes must have exited)."""
        new_id = secrets.token_hex(32)
        old_leaf = os.path.basename(pod.cgroup_dir)
        new_leaf = old_leaf.replace(pod.container_id, new_id)
        rel = os.path.relpath(os.path.join(pod.pod_cgroup_dir, new_leaf), self.cgroup_root)
        (new_dir,) = self._make_cgroup(rel, leaves=1)
        self._remove_cgroup(pod.cgroup_dir)
        pod.container_id = new_id
        pod.cgroup_dir = new_dir
        pod.cgroup_id = os.stat(new_dir).st_ino
        pod.cgroup_path = "/" + rel

    def remove_pod(self, pod: SimPod) -> None:
        """Delete the pod's cgroups (its processes must have exited) and drop it from the pods
        file; its network namespace stays until close()."""
        self._remove_cgroup(pod.cgroup_dir)
        self._remove_cgroup(pod.pod_cgroup_dir)
        self.pods.remove(pod)

    def release_ip(self, pod: SimPod) -> None:
        """Take a removed pod's address off its network namespace, free for add_pod(ip=...),
        and forget its MAC everywhere (as the gratuitous ARP of a real pod's new owner does)."""
        _ip("addr", "del", f"{pod.ip}/24", "dev", "eth0", netns=pod.netns)
        for ns in [self.node_ns, *(p.netns for p in self.pods)]:
            _ip("neigh", "flush", "to", pod.ip, netns=ns, check=False)

    def _remove_cgroup(self, d: str) -> None:
        left = _rmdir_cgroups([d], timeout=5.0)
        if left:
            raise RuntimeError(f"cgroup {d} could not be removed: {left}")
        with _state_lock():
            if d in self._cgroups:
                self._cgroups.remove(d)
            self._save_registry()

    def write_pods_file(self, path: str, node_name: str = "sim-node") -> None:
        """Write a PodList (as `kubectl get pods -A -o json`) of all pods; atomic replace."""
        _write_json(path, self.pods_json(node_name))

    # -- teardown ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill every process started here, delete netns (and so the veths), rmdir cgroups.
        Idempotent; resources that could not be removed are retried by the next call and by the
        leftover cleanup of the next SimCluster with the same prefix."""
        if self._closed and not self._netns and not self._cgroups:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        problems = _teardown({"netns": self._netns, "cgroups": self._cgroups})
        deadline = time.monotonic() + 5
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.01, deadline - time.monotonic()))
        existing = set(_list_netns())
        self._netns = [n for n in self._netns if n in existing]
        self._cgroups = [d for d in self._cgroups if os.path.isdir(d)]
        if self._netns or self._cgroups:
            self._save_registry()
            raise RuntimeError("SimCluster.close left resources behind: " + "; ".join(problems))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._registry)
        atexit.unregister(self.close)

    def __enter__(self) -> SimCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
