"""cgroup v2 helpers: parse Kubernetes cgroup paths and map cgroup ids back to paths.

The BPF side only knows a socket's cgroup id (bpf_get_current_cgroup_id(), which is the
inode number of the cgroup's directory on the cgroup2 mount). Turning that into a pod takes
two steps: CgroupIndex maps id -> path, parse_cgroup_path maps path -> pod UID / container id.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

__all__ = [
    "CgroupError",
    "CgroupIndex",
    "CgroupRef",
    "find_cgroup2_mount",
    "parse_cgroup_path",
]

DEFAULT_MOUNTINFO = "/proc/self/mountinfo"

# Explicit ASCII classes: \d and re.IGNORECASE would also accept non-ASCII digits/letters.
_HEX = "[0-9a-fA-F]"
_UID_DASHED = re.compile(f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}")
# systemd treats "-" in a slice name as hierarchy, so the kubelet writes the UID's dashes as "_".
_UID_UNDERSCORED = re.compile(f"{_HEX}{{8}}_{_HEX}{{4}}_{_HEX}{{4}}_{_HEX}{{4}}_{_HEX}{{12}}")
# Static pods (kubelet manifests) get an md5-hex UID with no separators; the mirror pod in the
# API server carries it in the kubernetes.io/config.mirror annotation.
_UID_PLAIN = re.compile(f"{_HEX}{{32}}")
_CONTAINER_ID = re.compile(f"{_HEX}{{12,}}")

# Under a kind/k3d node the kubelet's cgroup root is e.g. /kubelet, so every systemd slice name
# below it gains that prefix: kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice.
_SYSTEMD_KUBEPODS = re.compile(r"(?P<prefix>(?:.+-)?kubepods)\.slice")
_QOS_LEVELS = ("burstable", "besteffort")
_GUARANTEED = "guaranteed"

# (unit-name prefix, runtime) for container scopes under a systemd pod slice; order matters
# because "crio-conmon-" also starts with "crio-".
_CONMON_PREFIX = "crio-conmon-"
_SCOPE_PREFIXES = (("cri-containerd-", "containerd"), ("crio-", "crio"), ("docker-", "docker"))


class CgroupError(RuntimeError):
    """A cgroup setup problem; the message is one line and says how to fix it."""


@dataclass(frozen=True)
class CgroupRef:
    """What a cgroup path says about the pod/container whose processes live in it."""

    path: str
    pod_uid: str | None
    container_id: str | None
    runtime: str | None
    qos: str | None
    leaf: str


@dataclass(frozen=True)
class _Match:
    pod_uid: str
    qos: str
    container_id: str | None
    runtime: str | None


def parse_cgroup_path(path: str) -> CgroupRef:
    """Recognise kubelet cgroup layouts (systemd and cgroupfs drivers) anywhere in ``path``.

    Cgroups below a container's own cgroup (e.g. ``.../cri-containerd-<id>.scope/init.scope``
    made by systemd-in-a-container or crun's ``container`` sub-cgroup) are attributed to that
    container, because the kernel guarantees their processes belong to it. When the path holds
    more than one kubepods level (a kind cluster running inside a pod), the outermost wins: an
    exporter that can see the outer level is the one exporting for the outer cluster.
    """
    parts = [p for p in path.split("/") if p]
    leaf = parts[-1] if parts else ""
    for i, part in enumerate(parts):
        match: _Match | None = None
        systemd = _SYSTEMD_KUBEPODS.fullmatch(part)
        if systemd is not None:
            match = _match_systemd(systemd.group("prefix"), parts[i + 1 :])
        elif part == "kubepods":
            match = _match_cgroupfs(parts[i + 1 :])
        if match is not None:
            return CgroupRef(path, match.pod_uid, match.container_id, match.runtime, match.qos, leaf)
    return CgroupRef(path, None, None, None, None, leaf)


def _canonical_uid(uid: str, separator: str) -> str | None:
    if _UID_PLAIN.fullmatch(uid):
        return uid.lower()
    pattern = _UID_UNDERSCORED if separator == "_" else _UID_DASHED
    if pattern.fullmatch(uid):
        return uid.replace("_", "-").lower()
    return None


def _container_id(text: str) -> str | None:
    return text.lower() if _CONTAINER_ID.fullmatch(text) else None


def _match_systemd(prefix: str, rest: list[str]) -> _Match | None:
    if not rest:
        return None
    qos = _GUARANTEED
    pod_prefix = f"{prefix}-pod"
    for level in _QOS_LEVELS:
        if rest[0] == f"{prefix}-{level}.slice":
            qos = level
            pod_prefix = f"{prefix}-{level}-pod"
            rest = rest[1:]
            break
    if not rest:
        return None
    pod_slice = rest[0]
    if not (pod_slice.startswith(pod_prefix) and pod_slice.endswith(".slice")):
        return None
    uid = _canonical_uid(pod_slice[len(pod_prefix) : -len(".slice")], "_")
    if uid is None:
        return None
    if len(rest) == 1:
        return _Match(uid, qos, None, None)
    container_id, runtime = _match_scope(rest[1])
    return _Match(uid, qos, container_id, runtime)


def _match_scope(unit: str) -> tuple[str | None, str | None]:
    """(container id, runtime) from a container's systemd scope name; (None, None) if unknown."""
    if not unit.endswith(".scope"):
        return None, None
    name = unit[: -len(".scope")]
    if name.startswith(_CONMON_PREFIX):
        # conmon supervises a container but is not in it: count its traffic to the pod only.
        ok = _container_id(name[len(_CONMON_PREFIX) :]) is not None
        return None, ("crio" if ok else None)
    for unit_prefix, runtime in _SCOPE_PREFIXES:
        if name.startswith(unit_prefix):
            container_id = _container_id(name[len(unit_prefix) :])
            return (container_id, runtime) if container_id is not None else (None, None)
    return None, None


def _match_cgroupfs(rest: list[str]) -> _Match | None:
    qos = _GUARANTEED
    if rest and rest[0] in _QOS_LEVELS:
        qos = rest[0]
        rest = rest[1:]
    if not rest or not rest[0].startswith("pod"):
        return None
    uid = _canonical_uid(rest[0][len("pod") :], "-")
    if uid is None:
        return None
    if len(rest) == 1:
        return _Match(uid, qos, None, None)
    name = rest[1]
    # containerd and dockershim name the directory by bare id; CRI-O's cgroupfs manager
    # prefixes it like its systemd scopes.
    if name.startswith(_CONMON_PREFIX):
        ok = _container_id(name[len(_CONMON_PREFIX) :]) is not None
        return _Match(uid, qos, None, "crio" if ok else None)
    if name.startswith("crio-"):
        container_id = _container_id(name[len("crio-") :])
        return _Match(uid, qos, container_id, "crio" if container_id is not None else None)
    return _Match(uid, qos, _container_id(name), None)


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mountinfo paths as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_cgroup2_mount(mountinfo: str = DEFAULT_MOUNTINFO) -> str:
    """Mount point of the cgroup2 hierarchy, e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified (hybrid).

    If several cgroup2 mounts exist, the first one showing the hierarchy's root ("/") wins,
    since a bind mount of a sub-tree would give ids a wrong path prefix.
    """
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as exc:
        raise CgroupError(
            f"cannot read {mountinfo} ({exc.strerror or exc}); run on Linux with /proc mounted"
        ) from None
    candidates: list[tuple[str, str]] = []
    for line in text.splitlines():
        fields = line.split(" ")
        # id parent major:minor root mountpoint options [optional...] - fstype source superopts
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) <= sep + 1 or fields[sep + 1] != "cgroup2":
            continue
        candidates.append((_unescape_mountinfo(fields[3]), _unescape_mountinfo(fields[4])))
    for root, mount_point in candidates:
        if root == "/":
            return mount_point
    if candidates:
        return candidates[0][1]
    raise CgroupError(
        f"no cgroup v2 mount found in {mountinfo}; mount it: mount -t cgroup2 none /sys/fs/cgroup/unified"
    )


class CgroupIndex:
    """Maps cgroup v2 ids (= directory inode numbers, what bpf_get_current_cgroup_id() returns) to paths.

    lookup() reads a dict that rescan() replaces wholesale, so a lookup on the event loop never
    sees a half-built map while a rescan runs in a worker thread.
    """

    def __init__(self, root: str, max_entries: int = 65536) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._root = root
        self._max_entries = max_entries
        self._paths: dict[int, str] = {}
        self._dropped = 0
        self._unreadable = 0
        # Two overlapping rescans would race on the counters and waste a tree walk.
        self._rescan_lock = threading.Lock()

    @property
    def root(self) -> str:
        return self._root

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def lookup(self, cgroup_id: int) -> str | None:
        """Path relative to the root ("/" for the root itself) as of the last rescan; no I/O."""
        return self._paths.get(cgroup_id)

    def rescan(self) -> int:
        """Walk the tree and replace the map; returns the number of entries. Blocking.

        Raises CgroupError only if the root itself cannot be read.
        """
        with self._rescan_lock:
            paths, dropped, unreadable = _walk(self._root, self._max_entries)
            self._paths = paths
            self._dropped += dropped
            self._unreadable += unreadable
            return len(paths)

    @property
    def dropped(self) -> int:
        """Directories not indexed because max_entries was reached (cumulative over rescans)."""
        return self._dropped

    @property
    def unreadable(self) -> int:
        """Directories that existed but could not be listed, e.g. EACCES (cumulative over rescans).

        Directories that vanish mid-walk are normal pod churn and are not counted here.
        """
        return self._unreadable

    def __len__(self) -> int:
        return len(self._paths)


def _walk(root: str, max_entries: int) -> tuple[dict[int, str], int, int]:
    """(inode -> relative path, dropped, unreadable) for every directory under root."""
    try:
        root_stat = os.stat(root)
        with os.scandir(root):
            pass
    except OSError as exc:
        raise CgroupError(
            f"cannot read cgroup root {root} ({exc.strerror or exc}); "
            "pass the cgroup2 mount point, e.g. /sys/fs/cgroup"
        ) from None
    paths: dict[int, str] = {root_stat.st_ino: "/"}
    dropped = 0
    unreadable = 0
    # Depth-first keeps the stack small; when the cap is hit the rest is still walked, so
    # that `dropped` is an exact count rather than a lower bound.
    stack: list[tuple[str, str]] = [(root, "")]
    while stack:
        abs_dir, rel_dir = stack.pop()
        try:
            with os.scandir(abs_dir) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed since its parent was listed: a pod went away
        except OSError:
            unreadable += 1
            continue
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            rel = f"{rel_dir}/{entry.name}"
            # inode() comes from readdir's d_ino, which kernfs sets to the cgroup id: no stat needed.
            if len(paths) < max_entries:
                paths[entry.inode()] = rel
            else:
                dropped += 1
            stack.append((entry.path, rel))
    return paths, dropped, unreadable
