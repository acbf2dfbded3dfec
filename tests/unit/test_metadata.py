"""Tests for exporter.pods.metadata: the pod store and the pods-file source."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.pods import metadata as metadata_module
from exporter.pods.metadata import PodsFileSource, PodStore
from exporter.pods.pods import PodMeta, PodsFileError

UID_WEB = "5f1d3c1e-8a2b-4c3d-9e4f-0123456789ab"
UID_DB = "9a9b9c9d-0000-4111-8222-333344445555"
UID_PROXY = "c0ffee00-1111-4222-8333-444455556666"
UID_MIRROR = "e3b0c442-98fc-4c14-9afb-f4c8996fb924"
STATIC_UID = "8d9bcf3c0ab7c3e1e3a5f8c51b1a2f3e"
CID = "3efb8417ec5becbd398719f2fbedc3bb13c6c121abeb4909b6a6842439634041"


def pod_json(
    name: str,
    uid: str,
    *,
    namespace: str = "shop",
    ip: str | None = "10.244.1.17",
    host_network: bool = False,
    owner: tuple[str, str] | None = ("ReplicaSet", "web-7c9f8d6b5"),
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    phase: str | None = "Running",
) -> dict[str, Any]:
    """One item of `kubectl get pods -o json`, trimmed to realistic essentials."""
    meta: dict[str, Any] = {
        "creationTimestamp": "2024-05-02T09:14:07Z",
        "labels": labels if labels is not None else {"app": "web", "pod-template-hash": "7c9f8d6b5"},
        "name": name,
        "namespace": namespace,
        "resourceVersion": "48213",
        "uid": uid,
    }
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "blockOwnerDeletion": True,
                "controller": True,
                "kind": owner[0],
                "name": owner[1],
                "uid": "0b7a4f7e-1c1d-4f0e-a1d6-3f0c1b2a9e11",
            }
        ]
    if annotations:
        meta["annotations"] = annotations
    status: dict[str, Any] = {
        "containerStatuses": [
            {
                "containerID": f"containerd://{CID}",
                "image": "docker.io/library/nginx:1.25",
                "name": "nginx",
                "ready": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": "2024-05-02T09:14:09Z"}},
            }
        ],
        "hostIP": "10.0.0.11",
    }
    if phase is not None:
        status["phase"] = phase
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    spec: dict[str, Any] = {
        "containers": [{"image": "nginx:1.25", "name": "nginx"}],
        "nodeName": "node-a",
    }
    if host_network:
        spec["hostNetwork"] = True
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


WEB = pod_json("web-7c9f8d6b5-x2x4q", UID_WEB)
DB = pod_json(
    "db-0",
    UID_DB,
    namespace="data",
    ip="10.244.2.5",
    owner=("StatefulSet", "db"),
    labels={"app": "db"},
)
PROXY = pod_json(
    "kube-proxy-abcde",
    UID_PROXY,
    namespace="kube-system",
    ip="10.0.0.11",
    host_network=True,
    owner=("DaemonSet", "kube-proxy"),
    labels={},
)
MIRROR = pod_json(
    "etcd-node-a",
    UID_MIRROR,
    namespace="kube-system",
    ip="10.0.0.11",
    host_network=True,
    owner=("Node", "node-a"),
    labels={"component": "etcd"},
    annotations={"kubernetes.io/config.mirror": STATIC_UID, "kubernetes.io/config.source": "file"},
)


def pod_list(*items: dict[str, Any]) -> str:
    return json.dumps(
        {"apiVersion": "v1", "items": list(items), "kind": "List", "metadata": {"resourceVersion": ""}}
    )


def meta(
    uid: str, name: str = "p", ips: tuple[str, ...] = (), host_network: bool = False, phase: str = "Running"
) -> PodMeta:
    return PodMeta(uid, "ns", name, "node-a", name, "Pod", ips, host_network, (), phase=phase)


# ---- PodStore --------------------------------------------------------------------------


def test_empty_store() -> None:
    store = PodStore()
    assert len(store) == 0
    assert store.by_uid(UID_WEB) is None
    assert store.by_ip("10.244.1.17") is None
    assert store.dropped == 0
    assert store.version == 0


def test_replace_all_and_lookups() -> None:
    store = PodStore()
    a = meta(UID_WEB, "a", ("10.244.1.17", "fd00::17"))
    b = meta(UID_DB, "b", ("10.244.2.5",))
    store.replace_all({a.uid: a, b.uid: b})
    assert len(store) == 2
    assert store.by_uid(UID_WEB) is a
    assert store.by_ip("10.244.1.17") is a
    assert store.by_ip("fd00::17") is a
    assert store.by_ip("10.244.2.5") is b
    assert store.version == 1
    assert store.updated_at > 0
    # A second replace forgets pods not in it, and their IPs.
    store.replace_all({b.uid: b})
    assert store.by_uid(UID_WEB) is None
    assert store.by_ip("10.244.1.17") is None
    assert store.by_ip("10.244.2.5") is b
    assert store.version == 2


def test_replace_all_copies_its_input() -> None:
    store = PodStore()
    pods = {UID_WEB: meta(UID_WEB)}
    store.replace_all(pods)
    pods.clear()
    assert store.by_uid(UID_WEB) is not None


def test_host_network_pods_are_not_indexed_by_ip() -> None:
    store = PodStore()
    proxy = meta(UID_PROXY, "proxy", ("10.0.0.11",), host_network=True)
    store.replace_all({proxy.uid: proxy})
    assert store.by_uid(UID_PROXY) is proxy
    assert store.by_ip("10.0.0.11") is None
    store.upsert(meta(UID_DB, "db", ("10.0.0.11",), host_network=True))
    assert store.by_ip("10.0.0.11") is None


# (case, phase, IPs, indexed by IP): which pods name the peer of a flow by their IP.
IP_INDEX_BY_PHASE: list[tuple[str, str, tuple[str, ...], bool]] = [
    ("running", "Running", ("10.244.1.17", "fd00::17"), True),
    ("pending with IP", "Pending", ("10.244.1.17", "fd00::17"), True),
    ("pending without IP", "Pending", (), False),
    ("succeeded: IP free for reuse", "Succeeded", ("10.244.1.17", "fd00::17"), False),
    ("failed: IP free for reuse", "Failed", ("10.244.1.17", "fd00::17"), False),
    ("absent phase: taken as running", "", ("10.244.1.17", "fd00::17"), True),
    ("unknown: node not reporting", "Unknown", ("10.244.1.17", "fd00::17"), True),
]


@pytest.mark.parametrize("via", ["replace_all", "upsert"])
@pytest.mark.parametrize(
    ("case", "phase", "ips", "indexed"), IP_INDEX_BY_PHASE, ids=[c[0] for c in IP_INDEX_BY_PHASE]
)
def test_ip_index_by_phase(case: str, phase: str, ips: tuple[str, ...], indexed: bool, via: str) -> None:
    store = PodStore()
    pod = meta(UID_WEB, "web", ips, phase=phase)
    if via == "replace_all":
        store.replace_all({pod.uid: pod})
    else:
        store.upsert(pod)
    assert store.by_uid(UID_WEB) is pod, "every pod keeps its metadata, finished or not"
    assert store.pods() == [pod]
    for ip in ips:
        assert store.by_ip(ip) is (pod if indexed else None)


# (case, winner's phase, loser's phase); both claim one IP. The loser gets the lower UID, so
# only the phase can make the winner win.
IP_CLAIMS: list[tuple[str, str, str]] = [
    ("running over succeeded", "Running", "Succeeded"),
    ("running over failed", "Running", "Failed"),
    ("pending over succeeded", "Pending", "Succeeded"),
    ("absent phase over failed", "", "Failed"),
    ("running over pending", "Running", "Pending"),
    ("running over absent phase", "Running", ""),
    ("absent phase over pending", "", "Pending"),
    ("pending over unknown", "Pending", "Unknown"),
]
IP = "10.244.1.17"


@pytest.mark.parametrize("winner_first", [True, False], ids=["winner first", "winner last"])
@pytest.mark.parametrize(("case", "win_phase", "lose_phase"), IP_CLAIMS, ids=[c[0] for c in IP_CLAIMS])
def test_ip_claimed_twice(case: str, win_phase: str, lose_phase: str, winner_first: bool) -> None:
    winner = meta(UID_DB, "winner", (IP,), phase=win_phase)
    loser = meta(UID_WEB, "loser", (IP, "10.244.9.9"), phase=lose_phase)
    assert loser.uid < winner.uid
    order = [winner, loser] if winner_first else [loser, winner]

    replaced = PodStore()
    replaced.replace_all({p.uid: p for p in order})
    upserted = PodStore()
    for p in order:
        upserted.upsert(p)
    for store in (replaced, upserted):
        assert store.by_ip(IP) is winner
        assert store.by_uid(UID_WEB) is loser
        # The loser's other IPs are its own if it may name peers at all.
        assert store.by_ip("10.244.9.9") is (loser if loser.names_peers_by_ip else None)


@pytest.mark.parametrize("phase", ["Running", "Pending", "", "Succeeded"])
def test_ip_claimed_twice_in_one_phase_goes_to_the_lower_uid(phase: str) -> None:
    a = meta(UID_WEB, "a", (IP,), phase=phase)
    b = meta(UID_DB, "b", (IP,), phase=phase)
    assert a.uid < b.uid
    want = a if a.names_peers_by_ip else None
    for order in ([a, b], [b, a]):
        store = PodStore()
        store.replace_all({p.uid: p for p in order})
        assert store.by_ip(IP) is want


def test_ip_handover_through_watch_events() -> None:
    store = PodStore()
    old = meta(UID_DB, "job-a", (IP,), phase="Running")
    store.upsert(old)
    assert store.by_ip(IP) is old
    # The old pod's IP goes to a new pod before the old pod's final status arrives.
    new = meta(UID_WEB, "web", (IP,), phase="Pending")
    store.upsert(new)
    assert store.by_ip(IP) is old, "a stale Running status still wins over Pending"
    store.upsert(meta(UID_DB, "job-a", (IP,), phase="Succeeded"))
    assert store.by_ip(IP) is new
    running = meta(UID_WEB, "web", (IP,), phase="Running")
    store.upsert(running)
    assert store.by_ip(IP) is running
    # The finished pod stays for its own metrics, its IP no longer its own.
    assert store.by_uid(UID_DB) is not None
    assert store.by_uid(UID_DB).phase == "Succeeded"  # type: ignore[union-attr]
    store.delete(UID_WEB)
    assert store.by_ip(IP) is None, "a finished pod never takes back its old IP"


@pytest.mark.parametrize("finished_first", [True, False])
def test_pods_file_finished_pod_does_not_name_peers(tmp_path: Path, finished_first: bool) -> None:
    job = pod_json("job-x7k2p", UID_DB, ip=IP, owner=("Job", "report"), labels={}, phase="Succeeded")
    web = pod_json("web-7c9f8d6b5-x2x4q", UID_WEB, ip=IP)
    no_phase = pod_json("hand-written", UID_PROXY, ip="10.244.3.3", owner=None, labels={}, phase=None)
    path = tmp_path / "pods.json"
    path.write_text(pod_list(*([job, web] if finished_first else [web, job]), no_phase))
    store = PodStore()
    PodsFileSource(str(path), store).load_initial()
    assert len(store) == 3
    assert store.by_ip(IP) is store.by_uid(UID_WEB)
    assert store.by_uid(UID_DB) is not None
    assert store.by_ip("10.244.3.3") is store.by_uid(UID_PROXY), "absent phase is taken as running"


def test_upsert_inserts_and_replaces() -> None:
    store = PodStore()
    store.upsert(meta(UID_WEB, "a", ("10.244.1.17",)))
    assert store.version == 1
    moved = meta(UID_WEB, "a", ("10.244.1.99",))
    store.upsert(moved)
    assert len(store) == 1
    assert store.by_uid(UID_WEB) is moved
    assert store.by_ip("10.244.1.99") is moved
    assert store.by_ip("10.244.1.17") is None, "the old IP no longer names the pod"
    assert store.version == 2


def test_delete() -> None:
    store = PodStore()
    a = meta(UID_WEB, "a", ("10.244.1.17",))
    b = meta(UID_DB, "b", ("10.244.2.5",))
    store.replace_all({a.uid: a, b.uid: b})
    store.delete(UID_WEB)
    assert store.by_uid(UID_WEB) is None
    assert store.by_ip("10.244.1.17") is None
    assert store.by_uid(UID_DB) is b
    assert len(store) == 1
    version = store.version
    store.delete("no-such-uid")
    assert store.version == version
    assert len(store) == 1


def test_replace_all_is_bounded() -> None:
    store = PodStore(max_pods=2)
    pods = {f"uid-{i}": meta(f"uid-{i}", f"p{i}", (f"10.0.1.{i}",)) for i in range(5)}
    store.replace_all(pods)
    assert len(store) == 2
    assert store.dropped == 3
    kept = [uid for uid in pods if store.by_uid(uid) is not None]
    assert len(kept) == 2
    for uid in pods:
        if uid not in kept:
            assert store.by_ip(pods[uid].pod_ips[0]) is None, "a dropped pod leaves no IP behind"


def test_upsert_is_bounded_but_updates_known_pods() -> None:
    store = PodStore(max_pods=2)
    store.upsert(meta("uid-1"))
    store.upsert(meta("uid-2"))
    store.upsert(meta("uid-3"))
    assert len(store) == 2
    assert store.dropped == 1
    assert store.by_uid("uid-3") is None
    updated = meta("uid-1", "renamed")
    store.upsert(updated)
    assert store.by_uid("uid-1") is updated
    assert store.dropped == 1
    store.delete("uid-2")
    store.upsert(meta("uid-3"))
    assert store.by_uid("uid-3") is not None
    assert store.dropped == 1


@settings(deadline=None, max_examples=50)
@given(
    st.lists(
        st.tuples(st.sampled_from(["upsert", "delete"]), st.integers(min_value=0, max_value=9)),
        max_size=40,
    ),
    st.integers(min_value=1, max_value=6),
)
def test_store_model_property(ops: list[tuple[str, int]], max_pods: int) -> None:
    store = PodStore(max_pods=max_pods)
    model: dict[str, PodMeta] = {}
    dropped = 0
    for op, n in ops:
        uid = f"uid-{n}"
        if op == "upsert":
            pod = meta(uid, f"p{n}", (f"10.0.0.{n}",))
            if uid in model or len(model) < max_pods:
                model[uid] = pod
            else:
                dropped += 1
            store.upsert(pod)
        else:
            model.pop(uid, None)
            store.delete(uid)
        assert len(store) == len(model) <= max_pods
        assert store.dropped == dropped
        for i in range(10):
            u = f"uid-{i}"
            assert store.by_uid(u) == model.get(u)
            assert store.by_ip(f"10.0.0.{i}") == model.get(u)


def test_len_counts_a_mirror_pod_once(tmp_path: Path) -> None:
    path = tmp_path / "pods.json"
    path.write_text(pod_list(WEB, MIRROR))
    store = PodStore()
    PodsFileSource(str(path), store).load_initial()
    assert store.by_uid(STATIC_UID) is store.by_uid(UID_MIRROR)
    assert len(store) == 2


def test_upsert_mirror_pod_is_found_by_its_static_uid() -> None:
    mirror = PodMeta(
        UID_MIRROR, "kube-system", "etcd-node-a", "node-a", "etcd-node-a", "Node", (), True, (), STATIC_UID
    )
    store = PodStore()
    store.upsert(mirror)
    assert store.by_uid(UID_MIRROR) is mirror
    assert store.by_uid(STATIC_UID) is mirror


# ---- PodsFileSource -------------------------------------------------------------------


@pytest.fixture
def pods_path(tmp_path: Path) -> Path:
    path = tmp_path / "pods.json"
    path.write_text(pod_list(WEB, DB, PROXY))
    return path


def bump_mtime(path: Path, step_ns: int = 1_000_000_000) -> None:
    """Move mtime on explicitly, so that change detection never depends on clock granularity."""
    st_ = path.stat()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + step_ns))


def rewrite(path: Path, text: str) -> None:
    """Rewrite in place (same inode), making sure the stamp changes."""
    path.write_text(text)
    bump_mtime(path)


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_initial_load(pods_path: Path) -> None:
    store = PodStore()
    src = PodsFileSource(str(pods_path), store)
    src.load_initial()
    assert len(store) == 3
    web = store.by_uid(UID_WEB)
    assert web is not None
    assert (web.namespace, web.name, web.workload, web.workload_kind) == (
        "shop",
        "web-7c9f8d6b5-x2x4q",
        "web",
        "Deployment",
    )
    assert web.container_name(CID) == "nginx"
    assert store.by_ip("10.244.2.5") is store.by_uid(UID_DB)
    assert store.by_ip("10.0.0.11") is None, "hostNetwork pod"
    assert src.errors == 0


def test_initial_load_skips_bad_items_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = pod_json("broken", UID_DB)
    bad["metadata"]["name"] = 42
    path = tmp_path / "pods.json"
    path.write_text(pod_list(WEB, bad))
    store = PodStore()
    with caplog.at_level(logging.WARNING, logger="exporter.pods.metadata"):
        PodsFileSource(str(path), store).load_initial()
    assert len(store) == 1
    assert any("items[1]" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such file"),
        ("not json", "not valid JSON"),
        ('{"kind": "Pod", "items": []}', "expected 'List' or 'PodList'"),
        ("[]", "top level is a JSON array"),
    ],
)
def test_initial_load_failure_is_fatal(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "pods.json"
    if content is not None:
        path.write_text(content)
    store = PodStore()
    with pytest.raises(PodsFileError) as exc:
        PodsFileSource(str(path), store).load_initial()
    assert problem in str(exc.value)
    assert str(path) in str(exc.value)
    assert "\n" not in str(exc.value)
    assert len(store) == 0


def test_no_reload_when_unchanged(pods_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = PodStore()
    src = PodsFileSource(str(pods_path), store)
    src.load_initial()
    calls: list[str] = []
    real = metadata_module.load_pod_list

    def counting(path: str) -> Any:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(metadata_module, "load_pod_list", counting)
    version = store.version
    for _ in range(3):
        assert src.refresh() is False
    assert calls == [], "an unchanged file is not even read"
    assert store.version == version


def test_reload_on_in_place_change(pods_path: Path) -> None:
    store = PodStore()
    src = PodsFileSource(str(pods_path), store)
    src.load_initial()
    rewrite(pods_path, pod_list(WEB))
    assert src.refresh() is True
    assert len(store) == 1
    assert store.by_uid(UID_DB) is None
    assert src.refresh() is False


def test_reload_on_same_size_change_by_mtime(pods_path: Path) -> None:
    store = PodStore()
    src = PodsFileSource(str(pods_path), store)
    src.load_initial()
    original = pods_path.read_text()
    renamed = original.replace("db-0", "db-1")
    assert len(renamed) == len(original)
    rewrite(pods_path, renamed)
    assert src.refresh() is True
    db = store.by_uid(UID_DB)
    assert db is not None and db.name == "db-1"


def test_reload_on_atomic_rename(pods_path: Path) -> None:
    store = PodStore()
    src = PodsFileSource(str(pods_path), store)
    src.load_initial()
    replace_atomically(pods_path, pod_list(DB))
    assert src.refresh() is True
    assert store.by_uid(UID_WEB) is None
    assert store.by_uid(UID_DB) is not None
    assert src.refresh() is False
    # Again, with the same size and mtime as before: the new inode alone gives it away.
    before = pods_path.stat()
    text = pods_path.read_text().replace("db-0", "db-9")
    replace_atomically(pods_path, text)
    os.utime(pods_path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert pods_path.stat().st_size == before.st_size
    assert src.refresh() is True
    db = store.by_uid(UID_DB)
    assert db is not None and db.name == "db-9"


def test_malformed_update_keeps_last_good_metadata(pods_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = PodStore()
    src = PodsFileSource(str(pods_path), store)
    src.load_initial()
    version = store.version
    with caplog.at_level(logging.ERROR, logger="exporter.pods.metadata"):
        rewrite(pods_path, '{"kind": "Pod", "items": []}')
        assert src.refresh() is False
        assert src.errors == 1
        assert len(store) == 3 and store.version == version
        # Unchanged bad file: not re-read, not re-counted.
        assert src.refresh() is False
        assert src.errors == 1
        # Another bad write with the same problem: counted, not logged again.
        rewrite(pods_path, '{"kind": "Pod",  "items": []}')
        assert src.refresh() is False
        assert src.errors == 2
        # Half-written JSON (a non-atomic writer caught mid-write).
        rewrite(pods_path, pod_list(WEB, DB)[:50])
        assert src.refresh() is False
        assert src.errors == 3
        assert store.by_uid(UID_DB) is not None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, [r.getMessage() for r in errors]
    assert "keeping the last good pod metadata" in errors[0].getMessage()
    assert "expected 'List' or 'PodList'" in errors[0].getMessage()
    assert "not valid JSON" in errors[1].getMessage()
    # A good file again is loaded; a later identical problem is logged again.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="exporter.pods.metadata"):
        rewrite(pods_path, pod_list(WEB))
        assert src.refresh() is True
        assert len(store) == 1
        rewrite(pods_path, '{"kind": "Pod", "items": []}')
        assert src.refresh() is False
    assert src.errors == 4
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_deleted_file_keeps_metadata_until_it_comes_back(pods_path: Path) -> None:
    store = PodStore()
    src = PodsFileSource(str(pods_path), store)
    src.load_initial()
    pods_path.unlink()
    assert src.refresh() is False
    assert src.errors == 1
    assert len(store) == 3
    assert src.refresh() is False
    assert src.errors == 1, "a missing file is reported once, not every poll"
    pods_path.write_text(pod_list(DB))
    assert src.refresh() is True
    assert len(store) == 1


def test_reload_keeps_dropped_counter_and_bumps_version(pods_path: Path) -> None:
    store = PodStore(max_pods=2)
    src = PodsFileSource(str(pods_path), store)
    src.load_initial()
    assert len(store) == 2 and store.dropped == 1
    rewrite(pods_path, pod_list(WEB))
    v = store.version
    assert src.refresh() is True
    assert store.version == v + 1
    assert store.dropped == 1
