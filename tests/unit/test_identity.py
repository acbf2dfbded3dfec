"""Tests for exporter.pods.identity: cgroup -> pod/container identity, and the caching resolver."""

from __future__ import annotations

from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.pods.cgroups import CgroupIndex, CgroupRef, parse_cgroup_path
from exporter.pods.identity import Identity, IdentityResolver, identity_of
from exporter.pods.metadata import PodStore
from exporter.pods.pods import PodMeta

UID = "5f1d3c1e-8a2b-4c3d-9e4f-0123456789ab"
UID_US = UID.replace("-", "_")
UID2 = "9a9b9c9d-0000-4111-8222-333344445555"
CID = "3efb8417ec5becbd398719f2fbedc3bb13c6c121abeb4909b6a6842439634041"
CID2 = "9a2c1b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809"
CID_UNKNOWN = "c" * 64

POD_SLICE = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice"
NGINX_PATH = f"{POD_SLICE}/cri-containerd-{CID}.scope"
ENVOY_PATH = f"{POD_SLICE}/cri-containerd-{CID2}.scope"
SANDBOX_PATH = f"{POD_SLICE}/cri-containerd-{CID_UNKNOWN}.scope"
POD2_PATH = f"/kubepods/besteffort/pod{UID2}/{CID}"

WEB = PodMeta(
    uid=UID,
    namespace="shop",
    name="web-7c9f8d6b5-x2x4q",
    node="node-a",
    workload="web",
    workload_kind="Deployment",
    pod_ips=("10.244.1.17",),
    host_network=False,
    containers=((CID, "nginx"), (CID2, "envoy")),
)


def store_with(*pods: PodMeta) -> PodStore:
    store = PodStore()
    store.replace_all({p.uid: p for p in pods})
    return store


# ---- identity_of -----------------------------------------------------------------------

IDENTITY_CASES: list[tuple[str, str, PodStore | None, Identity]] = [
    ("host service", "/system.slice/nginx.service", None, Identity("", "", "nginx.service", "", "")),
    (
        "host session",
        "/user.slice/user-0.slice/session-3.scope",
        None,
        Identity("", "", "session-3.scope", "", ""),
    ),
    ("root cgroup", "/", None, Identity("", "", "/", "", "")),
    ("empty path", "", None, Identity("", "", "/", "", "")),
    ("kubepods slice itself", "/kubepods.slice", None, Identity("", "", "kubepods.slice", "", "")),
    (
        "container with metadata",
        NGINX_PATH,
        "web",
        Identity("shop", "web-7c9f8d6b5-x2x4q", "nginx", "web", "Deployment", UID),
    ),
    (
        "second container",
        ENVOY_PATH,
        "web",
        Identity("shop", "web-7c9f8d6b5-x2x4q", "envoy", "web", "Deployment", UID),
    ),
    (
        "unknown container id (sandbox) -> pod level",
        SANDBOX_PATH,
        "web",
        Identity("shop", "web-7c9f8d6b5-x2x4q", "", "web", "Deployment", UID),
    ),
    (
        "pod slice itself",
        POD_SLICE,
        "web",
        Identity("shop", "web-7c9f8d6b5-x2x4q", "", "web", "Deployment", UID),
    ),
    (
        "pod without metadata: pod is the UID",
        NGINX_PATH,
        "empty",
        Identity("", UID, CID[:12], "", "", UID),
    ),
    (
        "pod slice without metadata",
        POD_SLICE,
        "empty",
        Identity("", UID, "", "", "", UID),
    ),
    (
        "cgroupfs driver without metadata",
        POD2_PATH,
        "web",
        Identity("", UID2, CID[:12], "", "", UID2),
    ),
]


@pytest.mark.parametrize(
    ("path", "which", "expected"),
    [(p, w, e) for _, p, w, e in IDENTITY_CASES],
    ids=[c[0] for c in IDENTITY_CASES],
)
def test_identity_of(path: str, which: str | None, expected: Identity) -> None:
    store = store_with(WEB) if which == "web" else PodStore()
    ident = identity_of(parse_cgroup_path(path), store)
    assert ident == expected
    assert ident.is_pod == (expected.pod_uid is not None)
    assert ident.labels == (
        expected.namespace,
        expected.pod,
        expected.container,
        expected.workload,
        expected.workload_kind,
    )


def test_identity_follows_metadata_arriving_later() -> None:
    store = PodStore()
    ref = parse_cgroup_path(NGINX_PATH)
    assert identity_of(ref, store).pod == UID
    store.replace_all({UID: WEB})
    assert identity_of(ref, store).pod == "web-7c9f8d6b5-x2x4q"
    assert identity_of(ref, store).container == "nginx"


def test_identity_of_hand_made_ref() -> None:
    ref = CgroupRef("/x/y", None, None, None, None, "")
    assert identity_of(ref, PodStore()) == Identity("", "", "/", "", "")
    ref = CgroupRef("/p", UID, None, None, "guaranteed", "p")
    assert identity_of(ref, store_with(WEB)).container == ""


def test_host_identity_is_not_a_pod() -> None:
    ident = identity_of(parse_cgroup_path("/system.slice/sshd.service"), PodStore())
    assert not ident.is_pod
    assert ident.pod_uid is None


# ---- IdentityResolver ------------------------------------------------------------------


class FakeIndex:
    """CgroupIndex stand-in: `tree` is what exists on disk now; lookups see only what the
    last rescan found."""

    def __init__(self, tree: dict[int, str] | None = None) -> None:
        self.tree: dict[int, str] = dict(tree or {})
        self.visible: dict[int, str] = dict(self.tree)
        self.rescans = 0
        self.lookups: list[int] = []

    def lookup(self, cgroup_id: int) -> str | None:
        self.lookups.append(cgroup_id)
        return self.visible.get(cgroup_id)

    def rescan(self) -> int:
        self.rescans += 1
        self.visible = dict(self.tree)
        return len(self.visible)


def resolver(index: FakeIndex, store: PodStore | None = None, max_entries: int = 65536) -> IdentityResolver:
    store = store_with(WEB) if store is None else store
    return IdentityResolver(cast(CgroupIndex, index), store, max_entries=max_entries)


def test_known_ids_resolve_without_rescan() -> None:
    index = FakeIndex({1: NGINX_PATH, 2: "/system.slice/nginx.service"})
    r = resolver(index)
    out = r.resolve([1, 2])
    assert out[1].container == "nginx"
    assert out[2] == Identity("", "", "nginx.service", "", "")
    assert index.rescans == 0
    assert r.unresolved == 0


def test_new_id_triggers_one_rescan() -> None:
    index = FakeIndex({1: NGINX_PATH})
    r = resolver(index)
    r.resolve([1])
    index.tree[2] = ENVOY_PATH  # a container started after the last rescan
    out = r.resolve([1, 2])
    assert index.rescans == 1
    assert out[2].container == "envoy"
    r.resolve([1, 2])
    assert index.rescans == 1


def test_vanished_id_rescans_once_only() -> None:
    index = FakeIndex({1: NGINX_PATH})
    r = resolver(index)
    for _ in range(5):
        out = r.resolve([1, 404])
        assert set(out) == {1}
        assert r.unresolved == 1
    assert index.rescans == 1, "a cgroup gone before we saw it must not cost a tree walk per poll"


def test_one_rescan_for_several_new_ids() -> None:
    index = FakeIndex({})
    r = resolver(index)
    index.tree.update({1: NGINX_PATH, 2: ENVOY_PATH, 3: "/system.slice/a.service"})
    out = r.resolve([1, 2, 3, 404, 405])
    assert index.rescans == 1
    assert set(out) == {1, 2, 3}
    assert r.unresolved == 2


def test_each_batch_with_a_never_seen_id_rescans() -> None:
    index = FakeIndex({})
    r = resolver(index)
    r.resolve([404])
    r.resolve([404, 405])
    r.resolve([405, 404])
    r.resolve([406])
    assert index.rescans == 3


def test_unresolved_is_per_call() -> None:
    index = FakeIndex({1: NGINX_PATH})
    r = resolver(index)
    r.resolve([1, 404, 405])
    assert r.unresolved == 2
    r.resolve([1])
    assert r.unresolved == 0
    r.resolve([])
    assert r.unresolved == 0


def test_cached_refs_survive_cgroup_removal() -> None:
    index = FakeIndex({1: NGINX_PATH})
    r = resolver(index)
    r.resolve([1])
    # The cgroup is removed and a later rescan (for another id) forgets it; its counters
    # may still sit in the maps, and a cgroup id is never reused.
    del index.tree[1]
    index.tree[2] = ENVOY_PATH
    out = r.resolve([1, 2])
    assert out[1].container == "nginx"
    assert r.unresolved == 0


def test_resolver_relabels_when_metadata_arrives() -> None:
    store = PodStore()
    index = FakeIndex({1: NGINX_PATH})
    r = resolver(index, store)
    assert r.resolve([1])[1].pod == UID
    store.replace_all({UID: WEB})
    assert r.resolve([1])[1].pod == "web-7c9f8d6b5-x2x4q"
    assert index.rescans == 0


def test_bounded_cache_evicts_least_recently_used() -> None:
    index = FakeIndex({1: NGINX_PATH, 2: ENVOY_PATH, 3: SANDBOX_PATH})
    r = resolver(index, max_entries=2)
    r.resolve([1, 2])
    r.resolve([1])  # 1 is now the most recently used
    assert r.evicted == 0
    r.resolve([3])
    assert r.evicted == 1
    index.lookups.clear()
    r.resolve([1])
    assert index.lookups == [], "1 stayed cached"
    r.resolve([2])
    assert 2 in index.lookups, "2 was evicted and is looked up again"
    assert r.evicted == 2
    assert index.rescans == 0


@settings(deadline=None, max_examples=50)
@given(st.lists(st.lists(st.integers(min_value=1, max_value=40), max_size=15), max_size=10))
def test_resolver_property(batches: list[list[int]]) -> None:
    # Even ids exist, odd ids are gone. Every even id resolves, odd ones never do, and the
    # number of rescans is at most the number of batches bringing an odd id not seen before.
    tree = {i: f"/system.slice/svc{i}.service" for i in range(2, 41, 2)}
    index = FakeIndex(tree)
    r = resolver(index, max_entries=8)
    seen_odd: set[int] = set()
    allowed = 0
    for batch in batches:
        new_odd = {i for i in batch if i % 2} - seen_odd
        if new_odd:
            allowed += 1
        out = r.resolve(batch)
        assert set(out) == {i for i in batch if i % 2 == 0}
        for i, ident in out.items():
            assert ident.container == f"svc{i}.service"
        assert r.unresolved == sum(1 for i in batch if i % 2)
        # The forgotten-gone list is bounded too: once it overflows, old ids may rescan again.
        if len(seen_odd | new_odd) <= 8:
            assert index.rescans <= allowed
        seen_odd |= new_odd


def test_bounded_gone_list() -> None:
    index = FakeIndex({})
    r = resolver(index, max_entries=2)
    r.resolve([101])
    r.resolve([102])
    r.resolve([103])  # 101 forgotten
    assert index.rescans == 3
    r.resolve([102, 103])
    assert index.rescans == 3
    r.resolve([101])
    assert index.rescans == 4


def test_resolve_accepts_any_iterable() -> None:
    index = FakeIndex({1: NGINX_PATH, 2: ENVOY_PATH})
    r = resolver(index)
    out: dict[int, Any] = r.resolve(i for i in (1, 2))
    assert set(out) == {1, 2}
    out = r.resolve({1, 2})
    assert set(out) == {1, 2}


class _FailingStore(PodStore):
    """A store whose lookup of one pod raises, as a bug in a metadata source might."""

    def __init__(self, bad_uid: str) -> None:
        super().__init__()
        self.bad_uid = bad_uid

    def by_uid(self, uid: str) -> PodMeta | None:
        if uid == self.bad_uid:
            raise ValueError("metadata of this pod cannot be read")
        return super().by_uid(uid)


def test_one_owners_failure_leaves_the_others_named() -> None:
    store = _FailingStore(UID2)
    store.replace_all({WEB.uid: WEB})
    index = FakeIndex({1: NGINX_PATH, 2: POD2_PATH, 3: "/system.slice/a.service"})
    r = resolver(index, store)
    out = r.resolve([1, 2, 3])
    assert set(out) == {1, 3}
    assert out[1].container == "nginx"
    assert set(r.failed) == {2}
    assert isinstance(r.failed[2], ValueError)
    store.bad_uid = ""
    assert set(r.resolve([1, 2, 3])) == {1, 2, 3}
    assert r.failed == {}, "failures are per call"
