"""Fuzz and property tests for the Kubernetes pod source (exporter.pods.kube): PodList bodies,
watch event lines, the line splitter of the watch stream, and, end to end, a watch stream with
garbage in it. Input from the API (or whatever sits in front of it) is untrusted: it may fail a
list or a watch, which is then retried, but must never raise anything else, corrupt the store,
or leave the watcher unable to resume."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.pods.kube import (
    KubeConfig,
    KubeError,
    KubeWatcher,
    Timing,
    _Expired,
    _lines,
    parse_pod_list_response,
)
from exporter.pods.metadata import PodStore
from exporter.pods.pods import MIRROR_ANNOTATION, PodMeta, PodMetadataError, pod_from_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_kube_api import FakeKubeApi, eventually  # lives in tests/

NODE = "node-a"
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

# ---- strategies ------------------------------------------------------------------------------------

ODD_TEXT = ("", " ", "\ud800", "\udcff", "\x00", "\n", "é", "💥", "10.0.0.1", "::1", "x" * 300, "NaN")
TEXT = st.one_of(st.text(max_size=16), st.sampled_from(ODD_TEXT))
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and ±Infinity too: json.loads accepts them
    TEXT,
)
JSON = st.recursive(
    SCALAR,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(TEXT, kids, max_size=4)),
    max_leaves=12,
)

# A small pool, so that events name the same pods again and again. The kubelet-shaped UIDs are
# both pods of their own and the static UIDs of mirror pods: a mirror pod may claim another
# pod's UID for its cgroups.
KUBELET_UID = "0123456789abcdef0123456789abcdef"
KUBELET_UID_2 = "fedcba98-7654-3210-fedc-ba9876543210"
UIDS = ("uid-a", "uid-b", "uid-mirror", "uid-mirror-2", KUBELET_UID, KUBELET_UID_2)
MIRROR_OF = {"uid-mirror": KUBELET_UID, "uid-mirror-2": KUBELET_UID_2.upper()}
"""Every version of a pod has the same mirror annotation (see test_modified_pod_that_changes_
its_static_uid_drops_the_old_key for what happens when it changes)."""
IPS = ("10.0.0.1", "10.0.0.2", "fd00::1", "10.0.0.256", "")
PHASES = ("Running", "Pending", "Succeeded", "Failed", "Unknown", "")
RVS: tuple[Any, ...] = ("11", "12", "", None, 12, "\ud800", "\x00", "y" * 300, "9" * 30, [], {})

MUTABLE_PATHS: tuple[tuple[str | int, ...], ...] = (
    ("kind",),
    ("metadata",),
    ("metadata", "name"),
    ("metadata", "namespace"),
    ("metadata", "uid"),
    ("metadata", "resourceVersion"),
    ("metadata", "labels"),
    ("metadata", "labels", "pod-template-hash"),
    ("metadata", "labels", "controller-uid"),
    ("metadata", "annotations"),
    ("metadata", "ownerReferences"),
    ("metadata", "ownerReferences", 0),
    ("metadata", "ownerReferences", 0, "kind"),
    ("metadata", "ownerReferences", 0, "name"),
    ("metadata", "ownerReferences", 0, "controller"),
    ("spec",),
    ("spec", "nodeName"),
    ("spec", "hostNetwork"),
    ("status",),
    ("status", "phase"),
    ("status", "podIP"),
    ("status", "podIPs"),
    ("status", "podIPs", 0),
    ("status", "podIPs", 0, "ip"),
    ("status", "containerStatuses"),
    ("status", "containerStatuses", 0),
    ("status", "containerStatuses", 0, "name"),
    ("status", "containerStatuses", 0, "containerID"),
    ("status", "initContainerStatuses"),
)
_DELETE = object()


def pod_dict(
    uid: str, ip: str, phase: str = "Running", rv: Any = "11", name: str | None = None
) -> dict[str, Any]:
    """A well-formed Pod as the API sends it, owned by a Deployment's ReplicaSet."""
    meta: dict[str, Any] = {
        "name": name or f"web-7c9f8d6b5-{uid[:5]}",
        "namespace": "shop",
        "uid": uid,
        "resourceVersion": rv,
        "labels": {"app": "web", "pod-template-hash": "7c9f8d6b5"},
        "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7c9f8d6b5", "controller": True}],
    }
    if uid in MIRROR_OF:
        meta["annotations"] = {MIRROR_ANNOTATION: MIRROR_OF[uid]}
    return {
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": NODE},
        "status": {
            "phase": phase,
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "containerStatuses": [{"name": "app", "containerID": f"containerd://{'c' * 64}"}],
        },
    }


def _mutate(obj: Any, path: tuple[str | int, ...], value: Any) -> None:
    for key in path[:-1]:
        in_dict = isinstance(obj, dict) and isinstance(key, str) and key in obj
        in_list = isinstance(obj, list) and isinstance(key, int) and key < len(obj)
        if not (in_dict or in_list):
            return
        obj = obj[key]
    last = path[-1]
    if isinstance(obj, dict) and isinstance(last, str):
        if value is _DELETE:
            obj.pop(last, None)
        else:
            obj[last] = value
    elif isinstance(obj, list) and isinstance(last, int) and last < len(obj):
        if value is _DELETE:
            del obj[last]
        else:
            obj[last] = value


def _same_mirror_for_every_version(obj: Any) -> None:
    """Make the mirror annotation follow the uid, as it does in a real cluster."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    uid = meta.get("uid") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(uid, str):
        return
    annotations = meta.get("annotations")
    if annotations is None:
        annotations = meta["annotations"] = {}
    if isinstance(annotations, dict):
        annotations.pop(MIRROR_ANNOTATION, None)
        if uid in MIRROR_OF:
            annotations[MIRROR_ANNOTATION] = MIRROR_OF[uid]


@st.composite
def pod_objects(draw: st.DrawFn) -> Any:
    """Well-formed pods of the pool, most of them with a few fields replaced by values of the
    wrong type or shape (or removed)."""
    obj = pod_dict(
        draw(st.sampled_from(UIDS)),
        draw(st.sampled_from(IPS[:3] * 3 + IPS[3:])),  # mostly valid
        draw(st.sampled_from(PHASES)),
        draw(st.sampled_from(RVS)),
    )
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        path = draw(st.sampled_from(MUTABLE_PATHS))
        value = draw(st.one_of(st.just(_DELETE), JSON, st.sampled_from(UIDS + IPS + RVS)))
        _mutate(obj, path, value)
    _same_mirror_for_every_version(obj)
    return obj


def status_objects() -> st.SearchStrategy[Any]:
    codes = st.sampled_from([410, 500, 0, -1, 2**70, "410", 410.0, True, None])
    reasons = st.sampled_from(["Expired", "Gone", "InternalError", "", None, 7, "\ud800"])
    status = st.fixed_dictionaries(
        {}, optional={"kind": st.just("Status"), "code": codes, "reason": reasons, "message": TEXT}
    )
    return st.one_of(status, JSON)


def bookmark_objects() -> st.SearchStrategy[Any]:
    meta = st.fixed_dictionaries({}, optional={"resourceVersion": st.sampled_from(RVS)})
    return st.one_of(st.fixed_dictionaries({"kind": st.just("Pod")}, optional={"metadata": meta}), JSON)


EVENT_TYPES = st.one_of(
    st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR", "added", "", "UNKNOWN", "\ud800"]),
    JSON,
)


@st.composite
def event_dicts(draw: st.DrawFn) -> Any:
    kind = draw(EVENT_TYPES)
    obj = draw(
        st.one_of(
            pod_objects(), status_objects() if kind == "ERROR" else bookmark_objects(), JSON, st.just(_DELETE)
        )
    )
    event: dict[str, Any] = {} if draw(st.booleans()) and kind == "" else {"type": kind}
    if obj is not _DELETE:
        event["object"] = obj
    return event


def encode(event: Any) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


GOOD_EVENT = encode({"type": "ADDED", "object": pod_dict("uid-a", "10.0.0.1")})
HUGE_NAME = encode({"type": "ADDED", "object": pod_dict("uid-b", "10.0.0.2", name="n" * 300_000)})
HUGE_GONE = encode({"type": "ADDED", "object": pod_dict("uid-gone", "10.0.0.2", rv=None, name="g" * 300_000)})
HUGE_RV = encode({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "1" * 100_000}}})


@st.composite
def event_lines(draw: st.DrawFn) -> bytes:
    """One line of a watch stream (no newline): garbage of every kind, or an event; half of them
    ADDED, MODIFIED or DELETED of a pod of the pool, most of those well-formed."""
    which = draw(st.integers(0, 13))
    if which >= 7:
        kind = draw(st.sampled_from(["ADDED", "MODIFIED", "DELETED"]))
        return encode({"type": kind, "object": draw(pod_objects())})
    if which == 0:
        return draw(st.binary(max_size=40))
    if which == 1:  # a well-formed event cut short
        line = encode(draw(event_dicts()))
        return line[: draw(st.integers(0, max(0, len(line) - 1)))]
    if which == 2:  # JSON, but not an event object
        return encode(draw(JSON.filter(lambda v: not isinstance(v, dict))))
    if which == 3:  # not UTF-8: a byte that cannot start or continue a character
        line = encode(draw(event_dicts()))
        at = draw(st.integers(0, len(line)))
        return line[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + line[at:]
    if which == 4:  # Latin-1 instead of UTF-8 in a pod's name
        event = {"type": "ADDED", "object": pod_dict("uid-b", "10.0.0.2", name="caf\xe9")}
        return json.dumps(event, ensure_ascii=False).encode("latin-1")
    if which == 5:
        return draw(st.sampled_from([HUGE_NAME, HUGE_RV, b"[" * 100_000, b'{"type":' * 50_000]))
    return encode(draw(event_dicts()))  # 6


# ---- a model of what the store must hold ----------------------------------------------------------


@dataclass
class Model:
    """The pods that well-formed events have left in the store (the latest version of each) and
    the pod each cgroup UID names. A pod's own uid always names it; a mirror pod's claim to a
    kubelet uid that is another pod's own is skipped; of two claims the newer wins."""

    pods: dict[str, PodMeta] = field(default_factory=dict)
    keys: dict[str, PodMeta] = field(default_factory=dict)

    def holder(self, key: str) -> PodMeta | None:
        return self.keys.get(key)

    def upsert(self, pod: PodMeta) -> None:
        if any(k != pod.uid and (h := self.keys.get(k)) is not None and h.uid == k for k in pod.cgroup_uids):
            return
        self.pods[pod.uid] = pod
        self.keys.update(dict.fromkeys(pod.cgroup_uids, pod))

    def delete(self, uid: str) -> None:
        held = self.keys.get(uid)
        if held is not None and held.uid == uid:
            del self.pods[uid]
            self.keys = {k: p for k, p in self.keys.items() if p.uid != uid}

    def apply(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict) or not isinstance(event.get("object"), Mapping):
            return
        kind, obj = event.get("type"), event["object"]
        if kind in ("ADDED", "MODIFIED"):
            try:
                pod = pod_from_json(obj)
            except PodMetadataError:
                return
            self.upsert(pod)
        elif kind == "DELETED":
            meta = obj.get("metadata")
            uid = meta.get("uid") if isinstance(meta, Mapping) else None
            if isinstance(uid, str):
                self.delete(uid)


def new_watcher() -> KubeWatcher:
    config = KubeConfig("http://127.0.0.1:1", None, None, False, False)
    return KubeWatcher(config, NODE, PodStore(), Timing(), random.Random(1))


def keys_of(model: Model) -> set[str]:
    return (
        set(UIDS)
        | {MIRROR_OF[u].lower() for u in MIRROR_OF}
        | {k for p in model.pods.values() for k in p.cgroup_uids}
    )


def assert_store_is(w: KubeWatcher, model: Model) -> None:
    store = w.store
    assert {p.uid: p for p in store.pods()} == model.pods
    assert len(store) == len(model.pods)
    for key in keys_of(model):
        assert store.by_uid(key) == model.holder(key), key
    for ip in IPS:
        held = store.by_ip(ip)
        if held is not None:
            assert model.pods.get(held.uid) == held and ip in held.pod_ips and held.names_peers_by_ip


def assert_usable_rv(w: KubeWatcher) -> None:
    """The watcher can always resume: its resourceVersion goes back into a URL unchanged."""
    rv = w.resource_version
    assert rv is None or (rv.isprintable() and 0 < len(rv) <= 256), repr(rv)[:100]


# ---- list bodies ---------------------------------------------------------------------------------


def check_list_result(body: bytes) -> None:
    try:
        pods, problems, rv = parse_pod_list_response(body)
    except KubeError as e:
        assert e.kind == "list-body"
        assert str(e).splitlines() == [str(e)]
        return
    assert isinstance(rv, str) and rv.isprintable() and 0 < len(rv) <= 256
    for key, pod in pods.items():
        assert isinstance(pod, PodMeta) and key in pod.cgroup_uids
    for uid, problem in problems:
        assert uid is None or isinstance(uid, str)
        assert problem.splitlines() == [problem]


@FUZZ
@given(st.binary(max_size=200))
def test_list_body_of_arbitrary_bytes_raises_only_kube_error(body: bytes) -> None:
    check_list_result(body)


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "kind": st.one_of(st.sampled_from(["PodList", "List", "Pod"]), JSON),
            "metadata": st.one_of(
                st.fixed_dictionaries({}, optional={"resourceVersion": st.sampled_from(RVS)}), JSON
            ),
            "items": st.one_of(st.lists(st.one_of(pod_objects(), JSON), max_size=6), JSON),
        },
    ),
    st.sampled_from(["utf-8", "utf-16", "utf-32"]),
    st.booleans(),
)
def test_list_body_of_wrong_shapes_raises_only_kube_error(
    doc: dict[str, Any], codec: str, ascii: bool
) -> None:
    body = json.dumps(doc, ensure_ascii=ascii)
    try:
        data = body.encode(codec)
    except UnicodeEncodeError:  # a lone surrogate: the bytes a broken server could send instead
        data = body.encode(codec, "surrogatepass")
    check_list_result(data)
    check_list_result(data[: len(data) // 2])


@pytest.mark.parametrize("rv", ["\ud800", "1" * 300, "12\n", ""])
def test_list_with_an_unusable_resource_version_fails_the_list(rv: str) -> None:
    body = json.dumps({"kind": "PodList", "metadata": {"resourceVersion": rv}, "items": []}).encode()
    with pytest.raises(KubeError, match="resourceVersion"):
        parse_pod_list_response(body)


# ---- watch events --------------------------------------------------------------------------------


@FUZZ
@given(st.lists(event_lines(), max_size=20))
def test_watch_events_never_raise_unexpected_errors_nor_corrupt_the_store(lines: list[bytes]) -> None:
    w = new_watcher()
    model = Model()
    for line in lines:
        # Either ends this watch: _step relists (410) or re-watches from resource_version.
        with contextlib.suppress(KubeError, _Expired):
            w._event(line)
        model.apply(line)
        assert_store_is(w, model)
        assert_usable_rv(w)
    assert w.errors == w.malformed, "only skipped objects are counted by _event"

    # After any garbage, a well-formed pod comes and goes without a trace.
    before = {p.uid: p for p in w.store.pods()}
    fresh = pod_dict("uid-fresh", "10.99.0.1", rv="500", name="fresh")
    w._event(encode({"type": "ADDED", "object": fresh}))
    meta = w.store.by_uid("uid-fresh")
    assert meta is not None and meta.name == "fresh" and w.store.by_ip("10.99.0.1") == meta
    assert w.resource_version == "500"
    fresh["metadata"]["resourceVersion"] = "501"
    w._event(encode({"type": "DELETED", "object": fresh}))
    assert w.store.by_uid("uid-fresh") is None and w.store.by_ip("10.99.0.1") is None
    assert {p.uid: p for p in w.store.pods()} == before
    assert w.resource_version == "501"


@pytest.mark.parametrize(
    "object",
    [
        {"kind": "Status", "code": 410, "reason": "Expired"},
        {"code": 500, "reason": "Gone"},
        {"code": "410", "reason": "Expired"},
    ],
)
def test_error_event_meaning_gone_relists(object: dict[str, Any]) -> None:
    with pytest.raises(_Expired):
        new_watcher()._event(encode({"type": "ERROR", "object": object}))


@pytest.mark.parametrize("object", [{"code": "410"}, {"code": 410.0}, {"code": True}, None, [], "x", {}])
def test_error_event_with_an_odd_status_ends_the_watch(object: Any) -> None:
    with pytest.raises(KubeError) as info:
        new_watcher()._event(encode({"type": "ERROR", "object": object}))
    assert info.value.kind == "watch-error-0"


@pytest.mark.parametrize("rv", ["\ud800", "1" * 257, "12\x00", "\n"])
def test_an_unusable_resource_version_is_not_resumed_from(rv: str) -> None:
    """ "\\ud800" used to be adopted, and aiohttp then drops it from the watch URL: the next
    watch started from "now" and missed every deletion in between; a huge one made every
    re-watch fail with HTTP 400, for ever."""
    w = new_watcher()
    w._event(encode({"type": "ADDED", "object": pod_dict("uid-a", "10.0.0.1", rv="20")}))
    w._event(encode({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": rv}}}))
    assert w.resource_version == "20"
    assert w.malformed == 1
    # The object of an event with a bad resourceVersion is still taken.
    w._event(encode({"type": "ADDED", "object": pod_dict("uid-b", "10.0.0.2", rv=rv)}))
    assert w.resource_version == "20" and w.store.by_uid("uid-b") is not None


def test_a_pod_claiming_another_pods_uid_cannot_take_its_traffic() -> None:
    """Any pod may carry a mirror annotation, naming a kubelet uid its cgroups would carry. One
    naming another pod's uid used to take that uid over, in the list (when listed first) and in
    the watch: the other pod's traffic went to the claimant, or the other pod vanished. A pod's
    own uid now always names it."""
    plain = pod_dict(KUBELET_UID, "10.0.0.1", name="plain")
    claimant = pod_dict("uid-mirror", "10.0.0.2", name="claimant")  # claims KUBELET_UID

    def named(w: KubeWatcher, key: str) -> str | None:
        pod = w.store.by_uid(key)
        return pod.name if pod is not None else None

    # The claim comes second: skipped.
    w = new_watcher()
    w._event(encode({"type": "ADDED", "object": plain}))
    w._event(encode({"type": "ADDED", "object": claimant}))
    assert named(w, KUBELET_UID) == "plain" and {p.name for p in w.store.pods()} == {"plain"}
    assert w.malformed == 1

    # The claim comes first: the pod with that uid takes it over, and its DELETED leaves the
    # claimant, under its own uid, alone.
    w = new_watcher()
    w._event(encode({"type": "ADDED", "object": claimant}))
    w._event(encode({"type": "ADDED", "object": plain}))
    assert named(w, KUBELET_UID) == "plain" and named(w, "uid-mirror") == "claimant"
    w._event(encode({"type": "DELETED", "object": plain}))
    assert {p.name for p in w.store.pods()} == {"claimant"} and named(w, KUBELET_UID) is None
    # A DELETED naming a uid that is only claimed deletes nothing.
    w._event(encode({"type": "ADDED", "object": claimant}))
    w._event(encode({"type": "DELETED", "object": plain}))
    assert named(w, KUBELET_UID) == "claimant"

    # The list, in either order.
    for items in ([claimant, plain], [plain, claimant]):
        body = {"kind": "PodList", "metadata": {"resourceVersion": "5"}, "items": items}
        pods, _, _ = parse_pod_list_response(json.dumps(body).encode())
        assert pods[KUBELET_UID].name == "plain"


def test_of_two_mirror_pods_claiming_one_kubelet_uid_the_newer_wins() -> None:
    """The kubelet recreated the mirror pod of a static pod: same kubelet uid, new API uid."""
    old = pod_dict("uid-mirror", "10.0.0.1", name="old")
    new = pod_dict("uid-mirror-new", "10.0.0.2", name="new")
    new["metadata"]["annotations"] = {MIRROR_ANNOTATION: KUBELET_UID}
    w = new_watcher()
    w._event(encode({"type": "ADDED", "object": old}))
    w._event(encode({"type": "ADDED", "object": new}))
    held = w.store.by_uid(KUBELET_UID)
    assert held is not None and held.name == "new" and w.malformed == 0


def test_modified_pod_that_changes_its_static_uid_drops_the_old_key() -> None:
    w = new_watcher()
    old = pod_dict("uid-mirror", "10.0.0.1")
    w._event(encode({"type": "ADDED", "object": old}))
    new = pod_dict("uid-mirror", "10.0.0.2")
    del new["metadata"]["annotations"]
    w._event(encode({"type": "MODIFIED", "object": new}))
    assert [p.pod_ips for p in w.store.pods()] == [("10.0.0.2",)]
    assert w.store.by_ip("10.0.0.1") is None
    assert w.store.by_uid(KUBELET_UID) is None


# ---- the line splitter ---------------------------------------------------------------------------


def stream_of(chunks: list[bytes]) -> tuple[aiohttp.StreamReader, Callable[[], int], asyncio.Task[None]]:
    """A StreamReader that is handed `chunks` one at a time, each only once the reader has taken
    the one before (so every chunk boundary is seen by _lines); and a count of bytes handed."""
    protocol = mock.Mock(_reading_paused=False)
    stream = aiohttp.StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    fed = 0

    async def feed() -> None:
        nonlocal fed
        for chunk in chunks:
            while stream._buffer:  # the reader has not taken the last chunk yet
                await asyncio.sleep(0)
            stream.feed_data(chunk)
            fed += len(chunk)
            await asyncio.sleep(0)
        stream.feed_eof()

    return stream, lambda: fed, asyncio.get_running_loop().create_task(feed())


async def collect(chunks: list[bytes], limit: int) -> tuple[list[bytes], str | None]:
    stream, _, feeder = stream_of(chunks)
    lines: list[bytes] = []
    try:
        async for line in _lines(stream, limit):
            lines.append(line)
    except KubeError as e:
        return lines, e.kind
    finally:
        feeder.cancel()
    return lines, None


def reference(data: bytes, limit: int) -> tuple[list[bytes], str | None]:
    """What _lines must yield for `data` however it is split: the stripped non-blank lines, up to
    the first one over `limit` bytes ("stream"); "dropped" for an unfinished last line."""
    *segments, tail = data.split(b"\n")
    lines: list[bytes] = []
    for segment in segments:
        if len(segment) > limit:
            return lines, "stream"
        if segment.strip():
            lines.append(segment.strip())
    if len(tail) > limit:
        return lines, "stream"
    return lines, "dropped" if tail.strip() else None


LINE_BYTES = st.one_of(
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
    st.text(max_size=12).map(lambda t: t.replace("\n", "").encode()),  # multi-byte UTF-8
    st.sampled_from([b"", b" ", b"\r", b" \t\r", b"\xc3\xa9\xe2\x82\xac\xf0\x9f\x92\xa5", b"z" * 70]),
)


@FUZZ
@given(
    st.lists(LINE_BYTES, max_size=8),
    st.sampled_from([b"", b"\n", b"\r\n", b"partial"]),
    st.lists(st.integers(0, 400), max_size=10),
    st.sampled_from([64, 1000]),
)
def test_lines_are_the_same_however_the_stream_is_split(
    lines: list[bytes], end: bytes, cuts: list[int], limit: int
) -> None:
    data = b"\n".join(lines) + end
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    expected = reference(data, limit)
    assert asyncio.run(collect(chunks, limit)) == expected
    assert asyncio.run(collect([data] if data else [], limit)) == expected
    assert asyncio.run(collect([data[i : i + 1] for i in range(len(data))], limit)) == expected


def test_a_line_over_the_limit_fails_even_when_it_comes_in_one_chunk() -> None:
    """It used to pass when its newline came in the same chunk, and fail otherwise."""
    long = b"x" * 101
    assert asyncio.run(collect([b"a\n" + long + b"\nb\n"], 100)) == ([b"a"], "stream")
    assert asyncio.run(collect([b"a\n" + long[:50], long[50:] + b"\nb\n"], 100)) == ([b"a"], "stream")
    assert asyncio.run(collect([b"a\n" + long[:100] + b"\nb\n"], 100)) == ([b"a", long[:100], b"b"], None)


def test_a_line_without_end_is_read_only_up_to_the_limit() -> None:
    async def main() -> None:
        chunk = 1000
        stream, fed, feeder = stream_of([b"y" * chunk] * 10_000)  # 10 MB, no newline
        with pytest.raises(KubeError, match="larger than") as info:
            async for _ in _lines(stream, 64 * 1024):
                pass
        feeder.cancel()
        assert info.value.kind == "stream"
        assert fed() <= 64 * 1024 + chunk

    asyncio.run(main())


# ---- end to end: a watch with garbage in it --------------------------------------------------------


class ScriptedApi:
    """Enough of the API for one node: a list at resourceVersion 10, then watches that replay the
    events after the requested resourceVersion. The first watch sends `garbage` lines first. A
    watch stays open once it has sent everything (until the client goes)."""

    def __init__(self, events: list[tuple[str, dict[str, Any]]], garbage: list[bytes]) -> None:
        self.history = [(str(11 + i), kind, obj) for i, (kind, obj) in enumerate(events)]
        self.garbage = garbage
        self.watches: list[str] = []
        self.app = web.Application()
        self.app.router.add_get("/api/v1/pods", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "1":
            return web.json_response({"kind": "PodList", "metadata": {"resourceVersion": "10"}, "items": []})
        since = request.query.get("resourceVersion", "")
        self.watches.append(since)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if len(self.watches) == 1:
            for line in self.garbage:
                await resp.write(line + b"\n")
        if not since.isdigit():
            status = {
                "kind": "Status",
                "code": 400,
                "reason": "BadRequest",
                "message": "invalid resource version",
            }
            await resp.write(encode({"type": "ERROR", "object": status}) + b"\n")
            return resp
        for rv, kind, obj in self.history:
            if int(rv) > int(since):
                obj = json.loads(json.dumps(obj))
                obj["metadata"]["resourceVersion"] = rv
                await resp.write(encode({"type": kind, "object": obj}) + b"\n")
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.02)
        return resp


FAST = Timing(backoff_initial=0.01, backoff_max=0.05, watch_seconds=(60, 60), min_healthy_watch=0.0)


@asynccontextmanager
async def watching(api: ScriptedApi) -> AsyncIterator[tuple[KubeWatcher, asyncio.Task[None]]]:
    async with TestServer(api.app, host="127.0.0.1") as server:
        config = KubeConfig(str(server.make_url("")).rstrip("/"), None, None, False, False)
        w = KubeWatcher(config, NODE, PodStore(), FAST, random.Random(3))
        task = asyncio.create_task(w.run())
        try:
            yield w, task
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


GARBAGE = {
    "random-bytes": [b"\x00\xff\xfe garbage"],
    "truncated-json": [GOOD_EVENT[:40]],
    "not-an-object": [b"[1,2,3]", b"null"],
    "not-utf8": [b'{"type":"ADDED","object":{"metadata":{"name":"\xff"}}}'],
    "wrong-shapes": [
        encode({"object": pod_dict("uid-x", "10.0.0.9", rv=None)}),
        encode({"type": "ADDED", "object": [1]}),
        encode({"type": "ADDED", "object": {"metadata": {"uid": 7, "name": ["x"]}}}),
        encode({"type": "DELETED", "object": {"metadata": "uid-keep"}}),
        encode({"type": "BOOKMARK", "object": {"kind": "Pod"}}),
        encode({"type": "WHAT", "object": {}}),
    ],
    # Then a broken line ends the watch: the next one must resume from a usable version.
    "surrogate-resource-version": [
        encode({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "\ud800"}}}),
        b"}",
    ],
    "huge-resource-version": [HUGE_RV, b"}"],
    "huge-line": [HUGE_GONE, b"{" + b" " * 200_000],
    "odd-error": [encode({"type": "ERROR", "object": {"code": "500", "reason": 7}})],
    "deep-nesting": [b"[" * 100_000],
}


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_in_a_watch_stream_costs_nothing_but_a_rewatch(
    garbage: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter.pods.kube")
    keep = pod_dict("uid-keep", "10.0.0.1", name="keep")
    gone = pod_dict("uid-gone", "10.0.0.2", name="gone")
    events = [("ADDED", keep), ("ADDED", gone), ("MODIFIED", keep), ("DELETED", gone)]
    api = ScriptedApi(events, garbage)

    async def main() -> None:
        async with watching(api) as (w, task):
            await eventually(lambda: w.resource_version == "14", "all events seen")
            await eventually(lambda: w.up, "up again")
            assert {p.name for p in w.store.pods()} == {"keep"}
            assert not task.done()
            # Every watch resumed from a resourceVersion the server gave: never from "" (all
            # pods as ADDED from now, deletions missed) nor from garbage.
            assert set(api.watches) <= {"10", "11", "12", "13", "14"}, api.watches
            assert w.lists == 1

    asyncio.run(asyncio.wait_for(main(), 30))
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]


def test_a_relist_keeps_a_malformed_pods_last_version_but_not_its_claim_to_another_pods_uid() -> None:
    plain = pod_dict(KUBELET_UID, "10.0.0.1", name="plain")
    claimant = pod_dict("uid-mirror", "10.0.0.2", name="claimant")  # claims KUBELET_UID

    async def main(api: FakeKubeApi) -> None:
        config = KubeConfig(api.url, None, None, False, False)
        w = KubeWatcher(config, NODE, PodStore(), FAST, random.Random(3))
        task = asyncio.create_task(w.run())
        try:
            api.add_pod(claimant)
            await eventually(lambda: w.store.by_uid(KUBELET_UID) is not None, "claimant stored")
            api.add_pod(plain)
            await eventually(lambda: len(w.store) == 2, "both stored")
            # While the watcher is away the claimant turns malformed and the history goes: the
            # relist skips it and keeps its last good version, under its own uid only.
            api.go_down()
            broken = api.pod("uid-mirror")
            broken["status"]["podIPs"] = [{"ip": "not-an-ip"}]
            api.modify_pod(broken)
            api.compact()
            api.come_up()
            await eventually(lambda: w.lists == 2 and w.up, "relisted")
            held = w.store.by_uid(KUBELET_UID)
            assert held is not None and held.name == "plain"
            claimed = w.store.by_uid("uid-mirror")
            assert claimed is not None and claimed.name == "claimant"
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with FakeKubeApi(token=None) as api:
        asyncio.run(asyncio.wait_for(main(api), 30))
