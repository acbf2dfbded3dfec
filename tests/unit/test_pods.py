from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.pods.pods import (
    PodMeta,
    PodMetadataError,
    PodsFileError,
    cronjob_of_job,
    load_pod_list,
    parse_pod_list,
    pod_from_json,
    workload_of,
)

UID = "5f1d3c1e-8a2b-4c3d-9e4f-0123456789ab"
CID = "3efb8417ec5becbd398719f2fbedc3bb13c6c121abeb4909b6a6842439634041"
CID2 = "9a2c1b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809"


def make_pod(
    name: str = "web-7c9f8d6b5-x2x4q",
    namespace: str = "shop",
    uid: str = UID,
    owner: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Pod shaped like one item of real `kubectl get pods -o json` output."""
    if owner is None:
        owner = {
            "apiVersion": "apps/v1",
            "blockOwnerDeletion": True,
            "controller": True,
            "kind": "ReplicaSet",
            "name": "web-7c9f8d6b5",
            "uid": "0b7a4f7e-1c1d-4f0e-a1d6-3f0c1b2a9e11",
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "creationTimestamp": "2024-05-02T09:14:07Z",
            "generateName": "web-7c9f8d6b5-",
            "labels": labels if labels is not None else {"app": "web", "pod-template-hash": "7c9f8d6b5"},
            "name": name,
            "namespace": namespace,
            "ownerReferences": [owner] if owner else [],
            "resourceVersion": "48213",
            "uid": uid,
        },
        "spec": {
            "containers": [
                {
                    "image": "nginx:1.25",
                    "imagePullPolicy": "IfNotPresent",
                    "name": "nginx",
                    "ports": [{"containerPort": 80, "protocol": "TCP"}],
                    "resources": {},
                },
                {"image": "envoyproxy/envoy:v1.29.1", "name": "envoy", "resources": {}},
            ],
            "dnsPolicy": "ClusterFirst",
            "enableServiceLinks": True,
            "nodeName": "node-a",
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
        },
        "status": {
            "conditions": [{"lastProbeTime": None, "status": "True", "type": "Ready"}],
            "containerStatuses": [
                {
                    "containerID": f"containerd://{CID}",
                    "image": "docker.io/library/nginx:1.25",
                    "imageID": "docker.io/library/nginx@sha256:" + "0" * 64,
                    "lastState": {},
                    "name": "nginx",
                    "ready": True,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": "2024-05-02T09:14:09Z"}},
                },
                {
                    "containerID": f"containerd://{CID2}",
                    "image": "docker.io/envoyproxy/envoy:v1.29.1",
                    "imageID": "docker.io/envoyproxy/envoy@sha256:" + "1" * 64,
                    "lastState": {},
                    "name": "envoy",
                    "ready": True,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": "2024-05-02T09:14:10Z"}},
                },
            ],
            "hostIP": "10.0.0.11",
            "hostIPs": [{"ip": "10.0.0.11"}],
            "phase": "Running",
            "podIP": "10.244.1.17",
            "podIPs": [{"ip": "10.244.1.17"}],
            "qosClass": "BestEffort",
            "startTime": "2024-05-02T09:14:07Z",
        },
    }


def owner(kind: str, name: str, *, controller: bool = True, api: str = "apps/v1") -> dict[str, Any]:
    return {
        "apiVersion": api,
        "blockOwnerDeletion": True,
        "controller": controller,
        "kind": kind,
        "name": name,
        "uid": "0b7a4f7e-1c1d-4f0e-a1d6-3f0c1b2a9e11",
    }


def pod_list(*items: object, kind: str = "List") -> bytes:
    return json.dumps(
        {"apiVersion": "v1", "items": list(items), "kind": kind, "metadata": {"resourceVersion": ""}}
    ).encode()


# --- workload ---------------------------------------------------------------

JOB_LABELS = {
    "batch.kubernetes.io/controller-uid": "7d1f4e2a-0c9b-4b43-9a77-5b3c9d1e2f00",
    "batch.kubernetes.io/job-name": "nightly-backup-28391040",
    "controller-uid": "7d1f4e2a-0c9b-4b43-9a77-5b3c9d1e2f00",
    "job-name": "nightly-backup-28391040",
}

WORKLOAD_CASES: list[tuple[str, dict[str, Any] | None, dict[str, str], tuple[str, str]]] = [
    (
        "deployment",
        owner("ReplicaSet", "web-7c9f8d6b5"),
        {"app": "web", "pod-template-hash": "7c9f8d6b5"},
        ("web", "Deployment"),
    ),
    (
        "deployment with dashes in its name",
        owner("ReplicaSet", "my-api-v2-5d8f9b7c4d"),
        {"pod-template-hash": "5d8f9b7c4d"},
        ("my-api-v2", "Deployment"),
    ),
    ("bare replicaset", owner("ReplicaSet", "legacy-rs"), {"app": "legacy"}, ("legacy-rs", "ReplicaSet")),
    (
        "replicaset whose name does not end with the hash",
        owner("ReplicaSet", "legacy-rs"),
        {"pod-template-hash": "7c9f8d6b5"},
        ("legacy-rs", "ReplicaSet"),
    ),
    (
        "replicaset named exactly like the hash",
        owner("ReplicaSet", "-7c9f8d6b5"),
        {"pod-template-hash": "7c9f8d6b5"},
        ("-7c9f8d6b5", "ReplicaSet"),
    ),
    (
        "statefulset",
        owner("StatefulSet", "db"),
        {"controller-revision-hash": "db-6b9f7c", "statefulset.kubernetes.io/pod-name": "db-0"},
        ("db", "StatefulSet"),
    ),
    (
        "daemonset",
        owner("DaemonSet", "kube-proxy"),
        {"controller-revision-hash": "5c7d8b9f", "pod-template-generation": "1"},
        ("kube-proxy", "DaemonSet"),
    ),
    (
        "replicationcontroller",
        owner("ReplicationController", "old-rc", api="v1"),
        {},
        ("old-rc", "ReplicationController"),
    ),
    ("job", owner("Job", "db-migrate", api="batch/v1"), {"job-name": "db-migrate"}, ("db-migrate", "Job")),
    (
        "cronjob job",
        owner("Job", "nightly-backup-28391040", api="batch/v1"),
        JOB_LABELS,
        ("nightly-backup", "CronJob"),
    ),
    (
        "cronjob job, old label only",
        owner("Job", "report-29000000", api="batch/v1"),
        {"controller-uid": "7d1f4e2a-0c9b-4b43-9a77-5b3c9d1e2f00"},
        ("report", "CronJob"),
    ),
    (
        "job with short numeric suffix",
        owner("Job", "import-1234567", api="batch/v1"),
        JOB_LABELS,
        ("import-1234567", "Job"),
    ),
    (
        "job with cronjob-like name but no controller-uid label",
        owner("Job", "nightly-backup-28391040", api="batch/v1"),
        {"app": "backup"},
        ("nightly-backup-28391040", "Job"),
    ),
    ("bare pod", None, {"run": "debug"}, ("web-7c9f8d6b5-x2x4q", "Pod")),
    (
        "custom controller",
        owner("Rollout", "checkout", api="argoproj.io/v1alpha1"),
        {},
        ("checkout", "Rollout"),
    ),
    (
        "custom statefulset-like kind",
        owner("CloneSet", "frontend", api="apps.kruise.io/v1alpha1"),
        {"pod-template-hash": "abc"},
        ("frontend", "CloneSet"),
    ),
]


@pytest.mark.parametrize(
    ("case", "own", "labels", "want"), WORKLOAD_CASES, ids=[c[0] for c in WORKLOAD_CASES]
)
def test_workload(
    case: str, own: dict[str, Any] | None, labels: dict[str, str], want: tuple[str, str]
) -> None:
    pod = make_pod(owner=own or {}, labels=labels)
    assert workload_of(pod) == want
    meta = pod_from_json(pod)
    assert (meta.workload, meta.workload_kind) == want


def test_workload_prefers_controller_owner() -> None:
    pod = make_pod()
    pod["metadata"]["ownerReferences"] = [
        owner("ConfigMap", "not-a-controller", controller=False, api="v1"),
        owner("StatefulSet", "db"),
    ]
    assert workload_of(pod) == ("db", "StatefulSet")


def test_workload_first_owner_when_no_controller() -> None:
    pod = make_pod()
    first = owner("Node", "node-a", controller=False, api="v1")
    del first["controller"]
    pod["metadata"]["ownerReferences"] = [first, owner("Thing", "other", controller=False)]
    assert workload_of(pod) == ("node-a", "Node")


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("nightly-backup-28391040", "nightly-backup"),
        ("a-12345678", "a"),
        ("x-123456789012", "x"),
        ("import-1234567", None),
        ("28391040", None),
        ("-28391040", None),
        ("backup-2839104a", None),
        ("backup-\u0662\u0668\u0663\u0669\u0661\u0660\u0664\u0660", None),  # Arabic-Indic digits
    ],
)
def test_cronjob_of_job(name: str, want: str | None) -> None:
    assert cronjob_of_job(name) == want


# --- pod fields -------------------------------------------------------------


def test_pod_from_json_full() -> None:
    meta = pod_from_json(make_pod())
    assert meta == PodMeta(
        uid=UID,
        namespace="shop",
        name="web-7c9f8d6b5-x2x4q",
        node="node-a",
        workload="web",
        workload_kind="Deployment",
        pod_ips=("10.244.1.17",),
        host_network=False,
        containers=((CID, "nginx"), (CID2, "envoy")),
        phase="Running",
    )
    assert meta.container_name(CID) == "nginx"
    assert meta.container_name(f"containerd://{CID2}") == "envoy"
    assert meta.container_name("f" * 64) is None
    assert meta.cgroup_uids == (UID,)
    assert meta.static_uid is None


@pytest.mark.parametrize("prefix", ["containerd://", "cri-o://", "docker://", ""])
def test_container_id_prefixes(prefix: str) -> None:
    pod = make_pod()
    pod["status"]["containerStatuses"][0]["containerID"] = prefix + CID
    assert pod_from_json(pod).containers[0] == (CID, "nginx")


def test_init_and_ephemeral_containers_and_waiting() -> None:
    pod = make_pod()
    pod["status"]["initContainerStatuses"] = [
        {"containerID": "cri-o://" + "a" * 64, "name": "init-db", "ready": True, "restartCount": 0}
    ]
    pod["status"]["ephemeralContainerStatuses"] = [
        {"containerID": "cri-o://" + "b" * 64, "name": "debugger-x7k2p", "ready": False, "restartCount": 0}
    ]
    # waiting containers have no containerID yet
    pod["status"]["containerStatuses"][1] = {
        "image": "envoy",
        "name": "envoy",
        "ready": False,
        "restartCount": 0,
        "state": {"waiting": {"reason": "ContainerCreating"}},
    }
    meta = pod_from_json(pod)
    assert meta.containers == ((CID, "nginx"), ("a" * 64, "init-db"), ("b" * 64, "debugger-x7k2p"))
    assert meta.container_name("b" * 64) == "debugger-x7k2p"


def test_pending_pod_without_status_or_node() -> None:
    pod = make_pod()
    del pod["spec"]["nodeName"]
    pod["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
    meta = pod_from_json(pod)
    assert (meta.node, meta.pod_ips, meta.containers) == ("", (), ())


# (case, status.phase or None for absent, IPs, hostNetwork, parsed phase, finished, names peers by IP)
PHASES: list[tuple[str, str | None, bool, bool, str, bool, bool]] = [
    ("running", "Running", True, False, "Running", False, True),
    ("pending with IP", "Pending", True, False, "Pending", False, True),
    ("pending without IP", "Pending", False, False, "Pending", False, False),
    ("succeeded", "Succeeded", True, False, "Succeeded", True, False),
    ("failed", "Failed", True, False, "Failed", True, False),
    ("unknown", "Unknown", True, False, "Unknown", False, True),
    ("absent: taken as running", None, True, False, "", False, True),
    ("running hostNetwork", "Running", True, True, "Running", False, False),
]


@pytest.mark.parametrize(
    ("case", "phase", "with_ip", "host", "want_phase", "finished", "names_peers"),
    PHASES,
    ids=[c[0] for c in PHASES],
)
def test_phase(
    case: str,
    phase: str | None,
    with_ip: bool,
    host: bool,
    want_phase: str,
    finished: bool,
    names_peers: bool,
) -> None:
    pod = make_pod()
    if phase is None:
        del pod["status"]["phase"]
    else:
        pod["status"]["phase"] = phase
    if not with_ip:
        del pod["status"]["podIP"], pod["status"]["podIPs"]
    pod["spec"]["hostNetwork"] = host
    meta = pod_from_json(pod)
    assert (meta.phase, meta.finished, meta.names_peers_by_ip) == (want_phase, finished, names_peers)


def test_phase_absent_without_status() -> None:
    pod = make_pod()
    del pod["status"]
    assert pod_from_json(pod).phase == ""


def test_ip_claim_rank_order() -> None:
    def rank(phase: str) -> int:
        return PodMeta(UID, "ns", "p", "n", "p", "Pod", ("10.0.0.1",), False, (), phase=phase).ip_claim_rank

    assert rank("Running") < rank("") < rank("Pending") < rank("Unknown") == rank("Whatever")


def test_host_network_has_no_pod_ips() -> None:
    pod = make_pod()
    pod["spec"]["hostNetwork"] = True
    pod["status"]["podIP"] = "10.0.0.11"
    pod["status"]["podIPs"] = [{"ip": "10.0.0.11"}]
    meta = pod_from_json(pod)
    assert meta.host_network is True
    assert meta.pod_ips == ()


def test_dual_stack_pod_ips() -> None:
    pod = make_pod()
    pod["status"]["podIP"] = "10.244.1.17"
    pod["status"]["podIPs"] = [{"ip": "10.244.1.17"}, {"ip": "fd00:10:244:1:0:0:0:11"}]
    assert pod_from_json(pod).pod_ips == ("10.244.1.17", "fd00:10:244:1::11")


def test_pod_ip_fallback_when_no_pod_ips() -> None:
    pod = make_pod()
    del pod["status"]["podIPs"]
    pod["status"]["podIP"] = "10.244.1.18"
    assert pod_from_json(pod).pod_ips == ("10.244.1.18",)


def test_mirror_pod_static_uid() -> None:
    static = "8D9BCF3C0AB7C3E1E3A5F8C51B1A2F3E"
    pod = make_pod(
        name="kube-apiserver-node-a", namespace="kube-system", owner=owner("Node", "node-a", api="v1")
    )
    pod["metadata"]["annotations"] = {
        "kubernetes.io/config.hash": static.lower(),
        "kubernetes.io/config.mirror": static.lower(),
        "kubernetes.io/config.seen": "2024-05-02T09:10:00.000000000Z",
        "kubernetes.io/config.source": "file",
    }
    meta = pod_from_json(pod)
    assert meta.static_uid == static.lower()
    assert meta.cgroup_uids == (UID, static.lower())
    assert (meta.workload, meta.workload_kind) == ("node-a", "Node")
    pods, problems = parse_pod_list(pod_list(pod), "pods.json")
    assert problems == []
    assert pods[UID] is pods[static.lower()]


def test_mirror_annotation_not_a_uid_is_ignored() -> None:
    pod = make_pod()
    pod["metadata"]["annotations"] = {"kubernetes.io/config.mirror": "not-a-uid"}
    assert pod_from_json(pod).static_uid is None


MALFORMED: list[tuple[str, Any, str]] = [
    (
        "metadata.uid",
        lambda p: p["metadata"].pop("uid"),
        "pod shop/web-7c9f8d6b5-x2x4q: metadata.uid missing",
    ),
    ("metadata.uid", lambda p: p["metadata"].update(uid=""), "metadata.uid is empty"),
    ("metadata.uid", lambda p: p["metadata"].update(uid=12), "metadata.uid must be a string, got number"),
    ("metadata.name", lambda p: p["metadata"].pop("name"), "pod ?: metadata.name missing"),
    ("metadata.namespace", lambda p: p["metadata"].pop("namespace"), "metadata.namespace missing"),
    ("metadata", lambda p: p.update(metadata=[]), "pod ?: metadata must be an object, got array"),
    ("metadata", lambda p: p.pop("metadata"), "pod ?: metadata missing"),
    ("labels", lambda p: p["metadata"].update(labels=["a"]), "metadata.labels must be an object, got array"),
    (
        "label value",
        lambda p: p["metadata"]["labels"].update(app=1),
        "metadata.labels['app'] must be a string",
    ),
    (
        "owners",
        lambda p: p["metadata"].update(ownerReferences={}),
        "metadata.ownerReferences must be an array",
    ),
    ("owner", lambda p: p["metadata"].update(ownerReferences=["x"]), "ownerReferences[0] must be an object"),
    (
        "owner kind",
        lambda p: p["metadata"]["ownerReferences"][0].pop("kind"),
        "ownerReferences[0].kind missing",
    ),
    ("owner name", lambda p: p["metadata"]["ownerReferences"][0].update(name=None), ".name missing"),
    ("spec", lambda p: p.update(spec="x"), "spec must be an object, got string"),
    ("hostNetwork", lambda p: p["spec"].update(hostNetwork="true"), "spec.hostNetwork must be a boolean"),
    ("nodeName", lambda p: p["spec"].update(nodeName=5), "spec.nodeName must be a string, got number"),
    ("status", lambda p: p.update(status=True), "status must be an object, got boolean"),
    ("podIPs", lambda p: p["status"].update(podIPs="10.0.0.1"), "status.podIPs must be an array"),
    ("podIPs[0]", lambda p: p["status"].update(podIPs=[{}]), "status.podIPs[0].ip missing"),
    (
        "podIPs ip",
        lambda p: p["status"].update(podIPs=[{"ip": "10.0.0.300"}]),
        "status.podIPs[0].ip is not an IP",
    ),
    ("podIP", lambda p: p["status"].update(podIPs=[], podIP="nope"), "status.podIP is not an IP address"),
    ("phase", lambda p: p["status"].update(phase=1), "status.phase must be a string, got number"),
    (
        "containerStatuses",
        lambda p: p["status"].update(containerStatuses={"name": "x"}),
        "status.containerStatuses must be an array, got object",
    ),
    (
        "containerID",
        lambda p: p["status"]["containerStatuses"][1].update(containerID=["x"]),
        "status.containerStatuses[1].containerID must be a string, got array",
    ),
    (
        "container name",
        lambda p: p["status"]["containerStatuses"][0].pop("name"),
        "status.containerStatuses[0].name missing",
    ),
    ("kind", lambda p: p.update(kind="Service"), "kind is 'Service', not 'Pod'"),
    (
        "newline in name",
        lambda p: p["metadata"].update(name="a\nb", uid=None),
        "pod shop/a\\nb: metadata.uid missing",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "message"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_pod(case: str, mutate: Any, message: str) -> None:
    pod = make_pod()
    mutate(pod)
    with pytest.raises(PodMetadataError) as exc:
        pod_from_json(pod)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)

    # in a list the bad pod is skipped and reported; the good one survives
    good = make_pod(name="ok-0", uid="11111111-2222-3333-4444-555555555555")
    pods, problems = parse_pod_list(pod_list(pod, good), "/tmp/pods.json")
    assert list(pods) == ["11111111-2222-3333-4444-555555555555"]
    assert len(problems) == 1
    assert problems[0].startswith("pods file /tmp/pods.json: items[0] skipped: pod ")
    assert message in problems[0]


@pytest.mark.parametrize("item", [None, 3, "pod", [], True])
def test_non_object_items_skipped(item: object) -> None:
    pods, problems = parse_pod_list(pod_list(item, make_pod()), "p.json")
    assert list(pods) == [UID]
    assert problems == [f"pods file p.json: items[0] skipped: pod ?: must be a JSON object, got {_jt(item)}"]


def _jt(v: object) -> str:
    return {type(None): "null", int: "number", str: "string", list: "array", bool: "boolean"}[type(v)]


def test_duplicate_uid_reported() -> None:
    a = make_pod(name="a")
    b = make_pod(name="b")
    pods, problems = parse_pod_list(pod_list(a, b), "p.json")
    assert pods[UID].name == "a"
    assert problems == [f"pods file p.json: items[1] skipped: pod shop/b: uid {UID} already used by items[0]"]


# --- whole file ---------------------------------------------------------------


def test_load_pod_list_file(tmp_path: Path) -> None:
    f = tmp_path / "pods.json"
    second = make_pod(
        name="db-0", uid="11111111-2222-3333-4444-555555555555", owner=owner("StatefulSet", "db")
    )
    f.write_bytes(pod_list(make_pod(), second, kind="PodList"))
    pods, problems = load_pod_list(str(f))
    assert problems == []
    assert {p.name for p in pods.values()} == {"web-7c9f8d6b5-x2x4q", "db-0"}
    assert pods["11111111-2222-3333-4444-555555555555"].workload == "db"


def test_empty_list() -> None:
    assert parse_pod_list(pod_list(), "p.json") == ({}, [])


def test_utf8_bom_accepted() -> None:
    pods, _ = parse_pod_list(b"\xef\xbb\xbf" + pod_list(make_pod()), "p.json")
    assert list(pods) == [UID]


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.json")
    with pytest.raises(PodsFileError) as exc:
        load_pod_list(path)
    assert str(exc.value) == f"pods file {path}: no such file; pass an existing file to --pods-file"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(PodsFileError, match="is a directory"):
        load_pod_list(str(tmp_path))


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied")

    # chmod 0 does not stop root, so fake the failure
    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(PodsFileError) as exc:
        load_pod_list(str(tmp_path / "pods.json"))
    assert str(exc.value) == (
        f"pods file {tmp_path / 'pods.json'}: cannot read (Permission denied); "
        "pass a readable file to --pods-file"
    )


FILE_ERRORS: list[tuple[bytes, str]] = [
    (
        b'{\n  "kind": "List",\n    "items": [,]\n}',
        "pods file /x.json: not valid JSON (line 3 column 15: Expecting value); "
        "produce it with: kubectl get pods -o json > /x.json",
    ),
    (b"", "pods file /x.json: not valid JSON (line 1 column 1: Expecting value); "),
    (b"\xff\xfe\xfd", "pods file /x.json: not valid JSON (not UTF-8/16/32 text"),
    (b"[" * 100_000 + b"]" * 100_000, "pods file /x.json: not valid JSON (nested too deeply)"),
    (b"[1, 2]", "pods file /x.json: top level is a JSON array, expected an object; produce it"),
    (b'"List"', "top level is a JSON string, expected an object"),
    (b"null", "top level is a JSON null, expected an object"),
    (b'{"kind": "Pod", "metadata": {}}', "kind is 'Pod', expected 'List' or 'PodList'"),
    (b'{"items": []}', "kind missing, expected 'List' or 'PodList'"),
    (b'{"kind": 1, "items": []}', "kind is a JSON number, expected 'List' or 'PodList'"),
    (b'{"kind": "List"}', "pods file /x.json: items must be an array, got null"),
    (b'{"kind": "PodList", "items": {}}', "items must be an array, got object"),
    (b'{"kind": "List", "items": ' + b"1" * 5000 + b"}", "not valid JSON ("),
]


@pytest.mark.parametrize(("data", "message"), FILE_ERRORS)
def test_file_errors(data: bytes, message: str) -> None:
    with pytest.raises(PodsFileError) as exc:
        parse_pod_list(data, "/x.json")
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_file_error_via_load(tmp_path: Path) -> None:
    f = tmp_path / "pods.json"
    f.write_text("Error from server (Forbidden): pods is forbidden\n")
    with pytest.raises(
        PodsFileError, match=r"not valid JSON \(line 1 column 1: .*kubectl get pods -o json >"
    ):
        load_pod_list(str(f))


# --- properties -------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
_json_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)

_FIELD_PATHS: list[tuple[str, ...]] = [
    ("metadata",),
    ("metadata", "uid"),
    ("metadata", "name"),
    ("metadata", "namespace"),
    ("metadata", "labels"),
    ("metadata", "labels", "pod-template-hash"),
    ("metadata", "annotations"),
    ("metadata", "annotations", "kubernetes.io/config.mirror"),
    ("metadata", "ownerReferences"),
    ("spec",),
    ("spec", "hostNetwork"),
    ("spec", "nodeName"),
    ("status",),
    ("status", "podIP"),
    ("status", "podIPs"),
    ("status", "containerStatuses"),
    ("status", "initContainerStatuses"),
    ("kind",),
]


def _set_path(obj: dict[str, Any], path: tuple[str, ...], value: object) -> None:
    node: Any = obj
    for key in path[:-1]:
        if not isinstance(node, dict):
            return
        node = node.setdefault(key, {})
    if isinstance(node, dict):
        node[path[-1]] = value


@st.composite
def _mutated_pods(draw: st.DrawFn) -> object:
    pod = copy.deepcopy(make_pod())
    for _ in range(draw(st.integers(0, 3))):
        _set_path(pod, draw(st.sampled_from(_FIELD_PATHS)), draw(_json_values))
    return pod


def _check_result(data: bytes) -> None:
    try:
        pods, problems = parse_pod_list(data, "/x.json")
    except PodsFileError as exc:
        assert "\n" not in str(exc)
        return
    assert all(isinstance(p, PodMeta) for p in pods.values())
    assert all("\n" not in p for p in problems)


@settings(max_examples=300)
@given(st.lists(st.one_of(_json_values, _mutated_pods()), max_size=4), st.sampled_from(["List", "PodList"]))
def test_parse_pod_list_json_items(items: list[object], kind: str) -> None:
    _check_result(pod_list(*items, kind=kind))


@given(_json_values)
def test_parse_pod_list_any_json(value: object) -> None:
    _check_result(json.dumps(value).encode())


@given(st.binary(max_size=200))
def test_parse_pod_list_any_bytes(data: bytes) -> None:
    _check_result(data)


@given(st.dictionaries(st.sampled_from(["kind", "items", "apiVersion"]), _json_values))
def test_parse_pod_list_near_list(doc: dict[str, object]) -> None:
    _check_result(json.dumps(doc).encode())


@given(_mutated_pods())
def test_pod_from_json_only_raises_metadata_error(pod: object) -> None:
    try:
        meta = pod_from_json(pod)
    except PodMetadataError as exc:
        assert "\n" not in str(exc)
        return
    assert meta.uid
    assert workload_of(pod)  # type: ignore[arg-type]
