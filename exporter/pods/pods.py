"""Pod metadata from Kubernetes Pod objects (a `kubectl get pods -o json` file, or a watch).

Everything here is pure except load_pod_list, which only reads one file. Input is untrusted:
every field is type-checked, one malformed pod never spoils the others, and every error
message is a single line that names the pod and field at fault.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exporter.pods.labelvalues import clean

__all__ = [
    "PodMeta",
    "PodMetadataError",
    "PodsFileError",
    "cronjob_of_job",
    "load_pod_list",
    "parse_pod_list",
    "pod_from_json",
    "workload_of",
]

# On a mirror pod (the API's copy of a kubelet static pod) this holds the UID the kubelet runs
# the pod under, which is what the pod's cgroup path carries; metadata.uid is the API's own.
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
_TEMPLATE_HASH_LABEL = "pod-template-hash"
_JOB_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")
# The CronJob controller names each Job "<cronjob>-<scheduled time in minutes since epoch>";
# minutes since epoch reached 8 digits in 1990 and stays that long until 2160.
_CRONJOB_JOB_NAME = re.compile(r"(?P<cronjob>.+)-[0-9]{8,}")
_STATUS_LISTS = ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses")
_HEX = "[0-9a-fA-F]"
_KUBELET_UID = re.compile(f"{_HEX}{{32}}|{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}")
_LIST_KINDS = ("List", "PodList")
_MAX_SHOWN = 80
_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
_IP_CLAIM_RANK = {"Running": 0, "": 1, "Pending": 2}


class PodMetadataError(ValueError):
    """One pod object is malformed; the one-line message names the pod and the field."""


class PodsFileError(ValueError):
    """A whole pods file is unusable; the one-line message says how to produce a good one."""


@dataclass(frozen=True)
class PodMeta:
    uid: str
    namespace: str
    name: str
    node: str
    workload: str
    workload_kind: str
    # Empty for hostNetwork pods: their IP is the node's, so it identifies no pod.
    pod_ips: tuple[str, ...]
    host_network: bool
    # (container id without the "<runtime>://" prefix, container name)
    containers: tuple[tuple[str, str], ...]
    # Set only for mirror pods: the kubelet's UID for the static pod, as found in its cgroup path.
    static_uid: str | None = None
    # status.phase as given ("Running", "Pending", "Succeeded", "Failed", "Unknown"); "" when
    # absent, as in a hand-written pods file. Decides whether the pod's IPs name it: see
    # names_peers_by_ip.
    phase: str = ""

    def container_name(self, container_id: str) -> str | None:
        """Name of the container with this id (with or without the runtime:// prefix)."""
        wanted = _strip_runtime(container_id)
        for cid, name in self.containers:
            if cid == wanted:
                return name
        return None

    @property
    def finished(self) -> bool:
        """The pod has terminated (phase Succeeded or Failed): its IPs are free for reuse."""
        return self.phase in _FINISHED_PHASES

    @property
    def names_peers_by_ip(self) -> bool:
        """Whether a flow to one of pod_ips may be attributed to this pod.

        True for phase Running, for Pending once it has an IP, and for an absent phase (a pods
        file need not carry status.phase, and a pod listed with an IP is taken to be running).
        False for finished pods (Succeeded, Failed), whose IPs the network may already have
        handed to another pod, and for hostNetwork pods, whose IPs are the node's. Any other
        phase ("Unknown": the node stopped reporting, so its pods most likely still hold their
        IPs) also names peers, but loses every IP clash: see ip_claim_rank.
        """
        return bool(self.pod_ips) and not self.host_network and not self.finished

    @property
    def ip_claim_rank(self) -> int:
        """Precedence when several pods claim one IP; lower wins. Running, then an absent phase
        (assumed running), then Pending, then anything else ("Unknown")."""
        return _IP_CLAIM_RANK.get(self.phase, len(_IP_CLAIM_RANK))

    @property
    def cgroup_uids(self) -> tuple[str, ...]:
        """Every UID under which this pod's cgroups can appear on its node."""
        if self.static_uid is None or self.static_uid == self.uid:
            return (self.uid,)
        return (self.uid, self.static_uid)


def _strip_runtime(container_id: str) -> str:
    _, sep, rest = container_id.partition("://")
    return rest if sep else container_id


def _show(value: str) -> str:
    """value made safe for a one-line message: control characters escaped, length capped."""
    shown = value if value.isprintable() else repr(value)[1:-1]
    return shown if len(shown) <= _MAX_SHOWN else shown[: _MAX_SHOWN - 3] + "..."


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, Sequence):
        return "array"
    return type(value).__name__


class _Checker:
    """Typed access to one pod object's fields, raising PodMetadataError that names the pod."""

    def __init__(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata")
        ns = meta.get("namespace") if isinstance(meta, Mapping) else None
        name = meta.get("name") if isinstance(meta, Mapping) else None
        if isinstance(ns, str) and ns and isinstance(name, str) and name:
            self.label = f"{_show(ns)}/{_show(name)}"
        elif isinstance(name, str) and name:
            self.label = _show(name)
        else:
            self.label = "?"

    def fail(self, field: str, problem: str) -> PodMetadataError:
        return PodMetadataError(f"pod {self.label}: {field} {problem}")

    def mapping(
        self, parent: Mapping[str, Any], key: str, field: str, *, required: bool
    ) -> Mapping[str, Any]:
        value = parent.get(key)
        if value is None:
            if required:
                raise self.fail(field, "missing")
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(field, f"must be an object, got {_json_type(value)}")
        return value

    def array(self, parent: Mapping[str, Any], key: str, field: str) -> Sequence[Any]:
        value = parent.get(key)
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise self.fail(field, f"must be an array, got {_json_type(value)}")
        return value

    def string(self, parent: Mapping[str, Any], key: str, field: str, *, required: bool) -> str:
        value = parent.get(key)
        if value is None:
            if required:
                raise self.fail(field, "missing")
            return ""
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, got {_json_type(value)}")
        if required and not value:
            raise self.fail(field, "is empty")
        return value

    def boolean(self, parent: Mapping[str, Any], key: str, field: str) -> bool:
        value = parent.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self.fail(field, f"must be a boolean, got {_json_type(value)}")
        return value

    def element(self, value: object, field: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(field, f"must be an object, got {_json_type(value)}")
        return value

    def ip(self, text: str, field: str) -> str:
        try:
            # Canonical text (e.g. compressed IPv6) so it compares equal to addresses we format.
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise self.fail(field, f"is not an IP address: {_show(text)!r}") from None


def _root(obj: object) -> tuple[_Checker, Mapping[str, Any]]:
    if not isinstance(obj, Mapping):
        raise PodMetadataError(f"pod ?: must be a JSON object, got {_json_type(obj)}")
    return _Checker(obj), obj


def cronjob_of_job(name: str) -> str | None:
    """The CronJob that created a Job named like "<cronjob>-<minutes since epoch>", else None."""
    m = _CRONJOB_JOB_NAME.fullmatch(name)
    return m.group("cronjob") if m else None


def workload_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(workload name, kind) of the controller that ultimately owns the pod.

    Only the pod object is consulted, so a Deployment or CronJob is inferred from naming
    conventions of its ReplicaSet or Job rather than looked up.
    """
    check, pod = _root(obj)
    meta = check.mapping(pod, "metadata", "metadata", required=True)
    pod_name = check.string(meta, "name", "metadata.name", required=True)
    labels = check.mapping(meta, "labels", "metadata.labels", required=False)
    refs = [
        check.element(ref, f"metadata.ownerReferences[{i}]")
        for i, ref in enumerate(check.array(meta, "ownerReferences", "metadata.ownerReferences"))
    ]
    if not refs:
        return pod_name, "Pod"
    index = next((i for i, ref in enumerate(refs) if ref.get("controller") is True), 0)
    owner = refs[index]
    where = f"metadata.ownerReferences[{index}]"
    kind = check.string(owner, "kind", f"{where}.kind", required=True)
    name = check.string(owner, "name", f"{where}.name", required=True)

    if kind == "ReplicaSet":
        template_hash = labels.get(_TEMPLATE_HASH_LABEL)
        if isinstance(template_hash, str) and template_hash:
            suffix = f"-{template_hash}"
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)], "Deployment"
        return name, "ReplicaSet"
    if kind == "Job":
        cronjob = cronjob_of_job(name)
        # The Job controller labels every pod it creates with its uid; requiring that keeps a
        # hand-made pod that merely claims a Job owner from being promoted to a CronJob.
        if cronjob is not None and any(isinstance(labels.get(k), str) for k in _JOB_UID_LABELS):
            return cronjob, "CronJob"
        return name, "Job"
    # StatefulSet, DaemonSet, ReplicationController and custom controllers are the workload.
    return name, kind


def _kubelet_uid(text: str) -> str | None:
    return text.lower() if _KUBELET_UID.fullmatch(text) else None


def pod_from_json(obj: object) -> PodMeta:
    """Validate one Pod object (as decoded from JSON) and extract what the exporter labels with."""
    check, pod = _root(obj)
    kind = pod.get("kind")
    if kind is not None and kind != "Pod":
        shown = _show(kind) if isinstance(kind, str) else _json_type(kind)
        raise check.fail("kind", f"is {shown!r}, not 'Pod'")
    meta = check.mapping(pod, "metadata", "metadata", required=True)
    name = check.string(meta, "name", "metadata.name", required=True)
    namespace = check.string(meta, "namespace", "metadata.namespace", required=True)
    uid = check.string(meta, "uid", "metadata.uid", required=True)
    labels = check.mapping(meta, "labels", "metadata.labels", required=False)
    for key, value in labels.items():
        if not isinstance(value, str):
            raise check.fail(
                f"metadata.labels[{_show(str(key))!r}]", f"must be a string, got {_json_type(value)}"
            )
    annotations = check.mapping(meta, "annotations", "metadata.annotations", required=False)
    mirror = check.string(
        annotations, MIRROR_ANNOTATION, f"metadata.annotations[{MIRROR_ANNOTATION!r}]", required=False
    )
    workload, workload_kind = workload_of(pod)

    spec = check.mapping(pod, "spec", "spec", required=False)
    node = check.string(spec, "nodeName", "spec.nodeName", required=False)
    host_network = check.boolean(spec, "hostNetwork", "spec.hostNetwork")

    status = check.mapping(pod, "status", "status", required=False)
    ips: list[str] = []
    for i, entry in enumerate(check.array(status, "podIPs", "status.podIPs")):
        item = check.element(entry, f"status.podIPs[{i}]")
        text = check.string(item, "ip", f"status.podIPs[{i}].ip", required=True)
        ip = check.ip(text, f"status.podIPs[{i}].ip")
        if ip not in ips:
            ips.append(ip)
    pod_ip = check.string(status, "podIP", "status.podIP", required=False)
    if not ips and pod_ip:
        ips.append(check.ip(pod_ip, "status.podIP"))
    phase = check.string(status, "phase", "status.phase", required=False)

    containers: list[tuple[str, str]] = []
    for list_key in _STATUS_LISTS:
        for i, entry in enumerate(check.array(status, list_key, f"status.{list_key}")):
            field = f"status.{list_key}[{i}]"
            item = check.element(entry, field)
            cname = check.string(item, "name", f"{field}.name", required=True)
            # A container still waiting for its first start has no id yet.
            cid = _strip_runtime(check.string(item, "containerID", f"{field}.containerID", required=False))
            if cid:
                containers.append((cid, cname))

    return PodMeta(
        uid=uid,
        namespace=clean(namespace),
        name=clean(name),
        node=clean(node),
        workload=clean(workload),
        workload_kind=clean(workload_kind),
        pod_ips=() if host_network else tuple(ips),
        host_network=host_network,
        containers=tuple((cid, clean(cname)) for cid, cname in containers),
        static_uid=_kubelet_uid(mirror) if mirror else None,
        phase=phase,
    )


def _file_error(source: str, problem: str) -> PodsFileError:
    shown = _show(source)
    return PodsFileError(f"pods file {shown}: {problem}; produce it with: kubectl get pods -o json > {shown}")


def _json_problem(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid JSON (not UTF-8/16/32 text: byte {exc.start} cannot be decoded)"
    if isinstance(exc, RecursionError):
        return "not valid JSON (nested too deeply)"
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"not valid JSON ({_show(first_line)})"


def parse_pod_list(data: bytes, source: str) -> tuple[dict[str, PodMeta], list[str]]:
    """(pods keyed by every UID their cgroups can carry, one problem line per skipped item).

    A mirror pod is keyed by both metadata.uid and its static UID (see PodMeta.cgroup_uids),
    so count pods with len(set(map(id, pods.values()))) rather than len(pods).
    Raises PodsFileError when the file as a whole is unusable.
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _file_error(source, _json_problem(exc)) from None
    if not isinstance(doc, dict):
        raise _file_error(source, f"top level is a JSON {_json_type(doc)}, expected an object")
    kind = doc.get("kind")
    if kind is None:
        raise _file_error(source, "kind missing, expected 'List' or 'PodList'")
    if kind not in _LIST_KINDS:
        shown = repr(_show(kind)) if isinstance(kind, str) else f"a JSON {_json_type(kind)}"
        raise _file_error(source, f"kind is {shown}, expected 'List' or 'PodList'")
    items = doc.get("items")
    if not isinstance(items, list):
        raise _file_error(source, f"items must be an array, got {_json_type(items)}")

    shown_source = _show(source)
    pods: dict[str, PodMeta] = {}
    first_seen: dict[str, int] = {}
    problems: list[str] = []
    for i, item in enumerate(items):
        try:
            pod = pod_from_json(item)
        except PodMetadataError as exc:
            problems.append(f"pods file {shown_source}: items[{i}] skipped: {exc}")
            continue
        clash = next((k for k in pod.cgroup_uids if k in pods), None)
        if clash is not None:
            label = f"pod {_show(pod.namespace)}/{_show(pod.name)}"
            problems.append(
                f"pods file {shown_source}: items[{i}] skipped: {label}: "
                f"uid {_show(clash)} already used by items[{first_seen[clash]}]"
            )
            continue
        for key in pod.cgroup_uids:
            pods[key] = pod
            first_seen[key] = i
    return pods, problems


def load_pod_list(path: str) -> tuple[dict[str, PodMeta], list[str]]:
    """Read and parse a `kubectl get pods -o json` file; see parse_pod_list."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PodsFileError(
            f"pods file {_show(path)}: no such file; pass an existing file to --pods-file"
        ) from None
    except IsADirectoryError:
        raise PodsFileError(f"pods file {_show(path)}: is a directory; pass a file to --pods-file") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PodsFileError(
            f"pods file {_show(path)}: cannot read ({reason}); pass a readable file to --pods-file"
        ) from None
    return parse_pod_list(data, path)
