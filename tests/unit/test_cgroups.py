from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.pods.cgroups import (
    CgroupError,
    CgroupIndex,
    CgroupRef,
    find_cgroup2_mount,
    parse_cgroup_path,
)

UID = "5f1d3c1e-8a2b-4c3d-9e4f-0123456789ab"
UID_US = UID.replace("-", "_")
STATIC_UID = "8d9bcf3c0ab7c3e1e3a5f8c51b1a2f3e"  # kubelet's md5 UID for a static pod
OTHER_CID = "c" * 64
CID = "3efb8417ec5becbd398719f2fbedc3bb13c6c121abeb4909b6a6842439634041"

# (path, pod_uid, container_id, runtime, qos, leaf)
PARSE_CASES: list[tuple[str, str | None, str | None, str | None, str | None, str]] = [
    # systemd driver, every runtime and QoS class
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/cri-containerd-{CID}.scope",
        UID,
        CID,
        "containerd",
        "burstable",
        f"cri-containerd-{CID}.scope",
    ),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice/crio-{CID}.scope",
        UID,
        CID,
        "crio",
        "besteffort",
        f"crio-{CID}.scope",
    ),
    (
        f"/kubepods.slice/kubepods-pod{UID_US}.slice/docker-{CID}.scope",
        UID,
        CID,
        "docker",
        "guaranteed",
        f"docker-{CID}.scope",
    ),
    (
        f"/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-{CID}.scope",
        UID,
        CID,
        "containerd",
        "guaranteed",
        f"cri-containerd-{CID}.scope",
    ),
    # CRI-O's conmon sits in the pod but is not the container
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/crio-conmon-{CID}.scope",
        UID,
        None,
        "crio",
        "burstable",
        f"crio-conmon-{CID}.scope",
    ),
    # pod-level slices
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice",
        UID,
        None,
        None,
        "burstable",
        f"kubepods-burstable-pod{UID_US}.slice",
    ),
    (
        f"/kubepods.slice/kubepods-pod{UID_US}.slice",
        UID,
        None,
        None,
        "guaranteed",
        f"kubepods-pod{UID_US}.slice",
    ),
    # static pod: md5 UID without separators
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{CID}.scope",
        STATIC_UID,
        CID,
        "containerd",
        "burstable",
        f"cri-containerd-{CID}.scope",
    ),
    # kind node seen from the host: the node's own cgroup, then cgroup-root /kubelet prefixes slices
    (
        f"/system.slice/docker-{'a' * 64}.scope/kubelet.slice/kubelet-kubepods.slice/"
        f"kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_US}.slice/"
        f"cri-containerd-{CID}.scope",
        UID,
        CID,
        "containerd",
        "besteffort",
        f"cri-containerd-{CID}.scope",
    ),
    (
        f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_US}.slice/cri-containerd-{CID}.scope",
        UID,
        CID,
        "containerd",
        "guaranteed",
        f"cri-containerd-{CID}.scope",
    ),
    # sub-cgroups inside a container still belong to it
    (
        f"/kubepods.slice/kubepods-pod{UID_US}.slice/crio-{CID}.scope/container",
        UID,
        CID,
        "crio",
        "guaranteed",
        "container",
    ),
    # cgroupfs driver
    (f"/kubepods/burstable/pod{UID}/{CID}", UID, CID, None, "burstable", CID),
    (f"/kubepods/besteffort/pod{UID}/{CID}", UID, CID, None, "besteffort", CID),
    (f"/kubepods/pod{UID}/{CID}", UID, CID, None, "guaranteed", CID),
    (f"/kubepods/pod{UID}", UID, None, None, "guaranteed", f"pod{UID}"),
    (f"/kubepods/besteffort/pod{UID}", UID, None, None, "besteffort", f"pod{UID}"),
    (f"/kubepods/burstable/pod{UID}/crio-{CID}", UID, CID, "crio", "burstable", f"crio-{CID}"),
    (f"/kubepods/burstable/pod{UID}/crio-conmon-{CID}", UID, None, "crio", "burstable", f"crio-conmon-{CID}"),
    (f"/kubepods/pod{STATIC_UID}/{CID}", STATIC_UID, CID, None, "guaranteed", CID),
    # k3s in docker (k3d): the node container's cgroup sits above kubepods
    (f"/docker/{'b' * 64}/kubepods/besteffort/pod{UID}/{CID}", UID, CID, None, "besteffort", CID),
    # short-but-valid container id (>= 12 hex)
    (f"/kubepods/pod{UID}/{CID[:12]}", UID, CID[:12], None, "guaranteed", CID[:12]),
    # uppercase hex is normalised
    (f"/kubepods/pod{UID.upper()}/{CID.upper()}", UID, CID, None, "guaranteed", CID.upper()),
    # host cgroups
    ("/system.slice/nginx.service", None, None, None, None, "nginx.service"),
    ("/user.slice/user-1000.slice/session-3.scope", None, None, None, None, "session-3.scope"),
    (f"/system.slice/docker-{CID}.scope", None, None, None, None, f"docker-{CID}.scope"),
    ("/", None, None, None, None, ""),
    ("", None, None, None, None, ""),
    ("/system.slice/", None, None, None, None, "system.slice"),
    # kubepods levels that are not a pod
    ("/kubepods.slice", None, None, None, None, "kubepods.slice"),
    ("/kubepods.slice/kubepods-burstable.slice", None, None, None, None, "kubepods-burstable.slice"),
    ("/kubepods/burstable", None, None, None, None, "burstable"),
    ("/kubepods", None, None, None, None, "kubepods"),
]

NEGATIVE_PATHS = [
    # UID with the wrong separators for the layout
    f"/kubepods.slice/kubepods-pod{UID}.slice/cri-containerd-{CID}.scope",
    f"/kubepods/pod{UID_US}/{CID}",
    # mixed separators
    f"/kubepods/pod{UID[:8]}_{UID[9:]}/{CID}",
    # not a UID: wrong group lengths, non-hex, too short
    "/kubepods/pod5f1d3c1e-8a2b-4c3d-9e4f-0123456789a/" + CID,
    "/kubepods/pod5f1d3c1e-8a2b-4c3d-9e4f-0123456789ag/" + CID,
    "/kubepods/podnot-a-uid/" + CID,
    "/kubepods/pod/" + CID,
    f"/kubepods/pod{STATIC_UID}0/{CID}",
    # non-ASCII digits are not hex
    "/kubepods/pod" + "\u0661" * 32 + "/" + CID,
    # QoS level and pod slice disagree
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{UID_US}.slice",
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-pod{UID_US}.slice",
    # unknown QoS
    f"/kubepods.slice/kubepods-gold.slice/kubepods-gold-pod{UID_US}.slice",
    f"/kubepods/gold/pod{UID}",
    # prefix mismatch between kubepods slice and pod slice
    f"/kubelet.slice/kubelet-kubepods.slice/kubepods-pod{UID_US}.slice",
    # not a slice
    f"/kubepods.slice/kubepods-pod{UID_US}.scope",
    "/xkubepods.slice/xkubepods-pod" + UID_US + ".slice",
]

# Pod recognised, container part is garbage: the pod is still known, the container is not.
POD_ONLY_PATHS = [
    f"/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-{CID[:11]}.scope",
    f"/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-{CID}xyz.scope",
    f"/kubepods.slice/kubepods-pod{UID_US}.slice/podman-{CID}.scope",
    f"/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-{CID}.service",
    f"/kubepods.slice/kubepods-pod{UID_US}.slice/crio-conmon-nothex.scope",
    f"/kubepods/pod{UID}/not-hex-at-all",
    f"/kubepods/pod{UID}/{CID[:11]}",
    f"/kubepods/pod{UID}/crio-zz",
]


@pytest.mark.parametrize(("path", "uid", "cid", "runtime", "qos", "leaf"), PARSE_CASES)
def test_parse_layouts(
    path: str, uid: str | None, cid: str | None, runtime: str | None, qos: str | None, leaf: str
) -> None:
    assert parse_cgroup_path(path) == CgroupRef(path, uid, cid, runtime, qos, leaf)


@pytest.mark.parametrize("path", NEGATIVE_PATHS)
def test_parse_rejects_non_pod(path: str) -> None:
    ref = parse_cgroup_path(path)
    assert (ref.pod_uid, ref.container_id, ref.runtime, ref.qos) == (None, None, None, None)
    assert ref.path == path


@pytest.mark.parametrize("path", POD_ONLY_PATHS)
def test_parse_garbage_container_is_pod_level(path: str) -> None:
    ref = parse_cgroup_path(path)
    assert ref.pod_uid == UID
    assert ref.container_id is None


def test_outermost_kubepods_wins() -> None:
    inner = "1" * 8 + "_" + "2" * 4 + "_" + "3" * 4 + "_" + "4" * 4 + "_" + "5" * 12
    path = (
        f"/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-{CID}.scope/"
        f"kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{inner}.slice/cri-containerd-{OTHER_CID}.scope"
    )
    ref = parse_cgroup_path(path)
    assert (ref.pod_uid, ref.container_id) == (UID, CID)


def test_later_kubepods_used_when_first_is_garbage() -> None:
    ref = parse_cgroup_path(f"/kubepods/garbage/kubepods.slice/kubepods-pod{UID_US}.slice")
    assert ref.pod_uid == UID


@given(st.text())
def test_parse_never_raises_on_text(path: str) -> None:
    ref = parse_cgroup_path(path)
    assert ref.path == path


_segments = st.sampled_from(
    [
        "kubepods",
        "kubepods.slice",
        "kubepods-pod",
        "burstable",
        "besteffort",
        "pod",
        UID,
        UID_US,
        CID,
        "-",
        "_",
    ]
)


@given(st.lists(st.one_of(_segments, st.text(max_size=8)), max_size=8).map("/".join))
def test_parse_never_raises_on_near_misses(path: str) -> None:
    ref = parse_cgroup_path(path)
    if ref.pod_uid is not None:
        assert ref.qos in {"guaranteed", "burstable", "besteffort"}
    else:
        assert ref.container_id is None and ref.qos is None


_hex_ids = st.text(alphabet="0123456789abcdef", min_size=12, max_size=64)
_uids = st.one_of(st.uuids().map(str), st.text(alphabet="0123456789abcdef", min_size=32, max_size=32))
_outer = st.sampled_from(["", "/system.slice/docker-" + "d" * 64 + ".scope", "/docker/" + "e" * 64])


def _build(
    driver: str, outer: str, cgroup_root: str, uid: str, qos: str, runtime: str | None, cid: str | None
) -> str:
    if driver == "systemd":
        pre = f"{cgroup_root}-kubepods" if cgroup_root else "kubepods"
        parts = [f"{cgroup_root}.slice"] if cgroup_root else []
        parts.append(f"{pre}.slice")
        if qos != "guaranteed":
            parts.append(f"{pre}-{qos}.slice")
            pre = f"{pre}-{qos}"
        parts.append(f"{pre}-pod{uid.replace('-', '_')}.slice")
        if cid is not None:
            unit = {"containerd": "cri-containerd", "crio": "crio", "docker": "docker"}[str(runtime)]
            parts.append(f"{unit}-{cid}.scope")
    else:
        parts = [cgroup_root] if cgroup_root else []
        parts.append("kubepods")
        if qos != "guaranteed":
            parts.append(qos)
        parts.append(f"pod{uid}")
        if cid is not None:
            parts.append(f"crio-{cid}" if runtime == "crio" else cid)
    return outer + "/" + "/".join(parts)


@settings(max_examples=300)
@given(
    driver=st.sampled_from(["systemd", "cgroupfs"]),
    outer=_outer,
    cgroup_root=st.sampled_from(["", "kubelet"]),
    uid=_uids,
    qos=st.sampled_from(["guaranteed", "burstable", "besteffort"]),
    runtime=st.sampled_from(["containerd", "crio", "docker"]),
    cid=st.one_of(st.none(), _hex_ids),
)
def test_round_trip(
    driver: str, outer: str, cgroup_root: str, uid: str, qos: str, runtime: str, cid: str | None
) -> None:
    path = _build(driver, outer, cgroup_root, uid, qos, runtime, cid)
    ref = parse_cgroup_path(path)
    if cid is None:
        want_runtime = None
    elif driver == "systemd":
        want_runtime = runtime
    else:
        # cgroupfs directories name the runtime only for CRI-O
        want_runtime = "crio" if runtime == "crio" else None
    assert (ref.pod_uid, ref.container_id, ref.runtime, ref.qos) == (uid, cid, want_runtime, qos)
    assert ref.path == path
    assert ref.leaf == path.rsplit("/", 1)[-1]


# --- find_cgroup2_mount -------------------------------------------------------

HYBRID = """\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
28 26 0:26 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec shared:11 - cgroup cgroup rw,xattr,name=systemd
31 26 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
"""

PURE_V2 = """\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""

V1_ONLY = """\
26 22 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 26 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
"""

# no optional fields, an escaped space, and a bind mount of a sub-tree listed first
ESCAPED = """\
40 30 0:30 /kubepods /mnt/sub rw - cgroup2 cgroup2 rw
41 30 0:30 / /run/my\\040cgroup rw - cgroup2 none rw
"""


@pytest.mark.parametrize(
    ("content", "want"),
    [(HYBRID, "/sys/fs/cgroup/unified"), (PURE_V2, "/sys/fs/cgroup"), (ESCAPED, "/run/my cgroup")],
)
def test_find_cgroup2_mount(tmp_path: Path, content: str, want: str) -> None:
    f = tmp_path / "mountinfo"
    f.write_text(content)
    assert find_cgroup2_mount(str(f)) == want


@pytest.mark.parametrize("content", [V1_ONLY, "", "garbage\n- - -\n1 2 3\n"])
def test_find_cgroup2_mount_missing(tmp_path: Path, content: str) -> None:
    f = tmp_path / "mountinfo"
    f.write_text(content)
    with pytest.raises(CgroupError) as exc:
        find_cgroup2_mount(str(f))
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg == (f"no cgroup v2 mount found in {f}; mount it: mount -t cgroup2 none /sys/fs/cgroup/unified")


def test_find_cgroup2_mount_unreadable(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="cannot read"):
        find_cgroup2_mount(str(tmp_path / "absent"))


def test_find_cgroup2_mount_real() -> None:
    if not os.path.exists("/proc/self/mountinfo"):
        pytest.skip("no /proc")
    try:
        mount = find_cgroup2_mount()
    except CgroupError:
        pytest.skip("host has no cgroup2 mount")
    assert os.path.isfile(os.path.join(mount, "cgroup.procs"))


# --- CgroupIndex --------------------------------------------------------------


def _tree(root: Path, rels: list[str]) -> dict[str, int]:
    inodes = {"/": root.stat().st_ino}
    for rel in rels:
        d = root / rel.lstrip("/")
        d.mkdir(parents=True)
        inodes[rel] = d.stat().st_ino
    return inodes


def test_index_temp_tree(tmp_path: Path) -> None:
    rels = ["/a", "/a/b", "/a/b/c", "/d", "/d/e f"]
    inodes = _tree(tmp_path, rels)
    (tmp_path / "a" / "file").write_text("x")  # files are not cgroups
    (tmp_path / "link").symlink_to(tmp_path / "a")  # never followed
    idx = CgroupIndex(str(tmp_path))
    assert len(idx) == 0
    assert idx.lookup(inodes["/"]) is None  # nothing before the first rescan
    assert idx.rescan() == 6
    assert len(idx) == 6
    for rel, ino in inodes.items():
        assert idx.lookup(ino) == rel
    assert idx.lookup((tmp_path / "a" / "file").stat().st_ino) is None
    assert idx.dropped == 0
    assert idx.unreadable == 0

    (tmp_path / "a" / "b" / "c").rmdir()
    assert idx.rescan() == 5
    assert idx.lookup(inodes["/a/b/c"]) is None


def test_index_cap_drops_and_counts(tmp_path: Path) -> None:
    _tree(tmp_path, [f"/p{i}/c{j}" for i in range(3) for j in range(3)])  # 3 + 9 dirs below root
    idx = CgroupIndex(str(tmp_path), max_entries=5)
    assert idx.rescan() == 5
    assert len(idx) == 5
    assert idx.dropped == 13 - 5
    idx.rescan()
    assert idx.dropped == 2 * (13 - 5)  # cumulative


def test_index_rejects_bad_cap(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CgroupIndex(str(tmp_path), max_entries=0)


def test_index_missing_root(tmp_path: Path) -> None:
    idx = CgroupIndex(str(tmp_path / "absent"))
    with pytest.raises(CgroupError, match="cannot read cgroup root"):
        idx.rescan()


def test_index_tolerates_vanishing_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inodes = _tree(tmp_path, ["/keep", "/gone", "/gone/child"])
    real_scandir = os.scandir
    gone = str(tmp_path / "gone")

    def racing_scandir(path: str) -> object:
        # the pod exits between its parent's listing and its own
        if os.fspath(path) == gone:
            (tmp_path / "gone" / "child").rmdir()
            (tmp_path / "gone").rmdir()
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", racing_scandir)
    idx = CgroupIndex(str(tmp_path))
    idx.rescan()
    assert idx.lookup(inodes["/keep"]) == "/keep"
    assert idx.lookup(inodes["/gone/child"]) is None
    assert idx.unreadable == 0
    assert idx.dropped == 0


def test_index_counts_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path, ["/ok", "/locked", "/locked/inner"])
    real_scandir = os.scandir
    locked = str(tmp_path / "locked")

    def denying_scandir(path: str) -> object:
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", denying_scandir)
    idx = CgroupIndex(str(tmp_path))
    assert idx.rescan() == 3  # root, ok, locked; inner could not be listed
    assert idx.unreadable == 1


def test_index_concurrent_churn(tmp_path: Path) -> None:
    """Rescans while another thread creates and removes directories never raise."""
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            d = tmp_path / f"pod{n % 7}" / "ctr"
            try:
                d.mkdir(parents=True)
                d.rmdir()
                d.parent.rmdir()
            except OSError:
                pass
            n += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        idx = CgroupIndex(str(tmp_path))
        for _ in range(200):
            assert idx.rescan() >= 1
            assert idx.lookup(tmp_path.stat().st_ino) == "/"
    finally:
        stop.set()
        t.join()
    assert idx.unreadable == 0


def _real_cgroup2() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        mount = find_cgroup2_mount()
    except CgroupError:
        return None
    return mount if os.access(mount, os.W_OK) else None


@pytest.mark.skipif(_real_cgroup2() is None, reason="needs root and a writable cgroup2 mount")
def test_index_real_cgroup2() -> None:
    mount = _real_cgroup2()
    assert mount is not None
    idx = CgroupIndex(mount)
    idx.rescan()
    # the root cgroup's id is its inode number, which the kernel fixes at 1
    root_ino = os.stat(mount).st_ino
    assert idx.lookup(root_ino) == "/"

    name = f"podnet-test-{uuid.uuid4().hex[:12]}"
    child = os.path.join(mount, name)
    os.mkdir(child)
    try:
        child_ino = os.stat(child).st_ino
        assert idx.lookup(child_ino) is None  # lookup never does I/O
        idx.rescan()
        assert idx.lookup(child_ino) == f"/{name}"
        assert parse_cgroup_path(f"/{name}").leaf == name
    finally:
        os.rmdir(child)
    idx.rescan()
    assert idx.lookup(child_ino) is None
