"""Who owns a cgroup: the pod and container (or host service) behind a cgroup id."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace

from exporter.pods.cgroups import CgroupIndex, CgroupRef, parse_cgroup_path
from exporter.pods.labelvalues import clean
from exporter.pods.metadata import PodStore


@dataclass(frozen=True)
class Identity:
    namespace: str
    pod: str
    container: str
    workload: str
    workload_kind: str
    pod_uid: str | None = None

    def __post_init__(self) -> None:
        # Names come from cgroup directories and pod metadata: any bytes (labelvalues).
        for name in ("namespace", "pod", "container", "workload", "workload_kind"):
            value = getattr(self, name)
            fixed = clean(value)
            if fixed is not value:
                object.__setattr__(self, name, fixed)

    @property
    def labels(self) -> tuple[str, str, str, str, str]:
        return (self.namespace, self.pod, self.container, self.workload, self.workload_kind)

    @property
    def is_pod(self) -> bool:
        return self.pod_uid is not None


def identity_of(ref: CgroupRef, store: PodStore) -> Identity:
    """Pure given the store's current content: metadata arriving later relabels the
    cgroup on the next call."""
    if ref.pod_uid is None:
        # A plain host process: name it by its cgroup leaf (nginx.service, session-3.scope).
        return Identity("", "", ref.leaf or "/", "", "")
    meta = store.by_uid(ref.pod_uid)
    if meta is None:
        # Metadata not (yet) known: keep the pod distinguishable without inventing names.
        return Identity(
            "", ref.pod_uid, ref.container_id[:12] if ref.container_id else "", "", "", ref.pod_uid
        )
    container = ""
    if ref.container_id:
        # No status entry: the pod sandbox (pause) or a container the metadata has not
        # caught up with; both are pod-level until named.
        container = meta.container_name(ref.container_id) or ""
    return Identity(meta.namespace, meta.name, container, meta.workload, meta.workload_kind, meta.uid)


class IdentityResolver:
    """cgroup id -> Identity. Parsed cgroup paths are cached (a cgroup id is never reused
    for another cgroup); the cache is bounded, least recently used out first."""

    def __init__(self, index: CgroupIndex, store: PodStore, max_entries: int = 65536) -> None:
        self._index = index
        self._store = store
        self._refs: OrderedDict[int, CgroupRef] = OrderedDict()
        self._max = max_entries
        self.max_entries = max_entries
        self._gone: OrderedDict[int, None] = OrderedDict()
        self._names: dict[int, str] = {}
        self.evicted = 0
        self.unresolved = 0
        self.failed: dict[int, Exception] = {}
        """Owners whose naming raised in the last resolve(), with the error: the caller
        drops them for that poll (their totals stay) instead of failing the whole poll."""

    def resolve(self, cgroup_ids: Iterable[int]) -> dict[int, Identity]:
        """Blocking (may rescan the cgroup tree): run in the poller's thread."""
        ids = list(cgroup_ids)
        missing = [i for i in ids if i not in self._refs and self._index.lookup(i) is None]
        # Rescan for ids not seen before only: a cgroup that vanished before we ever
        # saw its path must not cost a tree walk on every poll.
        if any(i not in self._gone for i in missing):
            self._index.rescan()
            for i in missing:
                if self._index.lookup(i) is None:
                    self._gone[i] = None
            while len(self._gone) > self._max:
                self._gone.popitem(last=False)
        out: dict[int, Identity] = {}
        unresolved = 0
        self.failed = {}
        for cgid in ids:
            try:
                ref = self._ref(cgid)
                if ref is None:
                    unresolved += 1
                    continue
                ident = identity_of(ref, self._store)
            except Exception as e:
                self.failed[cgid] = e
                continue
            # A cgroup's container never changes, but a restarted container's old id
            # leaves the pod's status: keep the name learned while it was there.
            if ident.is_pod and ref.container_id:
                if ident.container:
                    self._names[cgid] = ident.container
                elif cgid in self._names:
                    ident = replace(ident, container=self._names[cgid])
            out[cgid] = ident
        self.unresolved = unresolved
        return out

    def dead(self, cgroup_ids: Iterable[int]) -> set[int]:
        """Ids whose cgroup directory no longer exists. Blocking (one stat per id).
        Unknown ids count as dead only when the index is complete (nothing dropped)."""
        out: set[int] = set()
        for cgid in cgroup_ids:
            ref = self._refs.get(cgid)
            path = ref.path if ref is not None else self._index.lookup(cgid)
            if path is None:
                if self._index.dropped == 0 and cgid in self._gone:
                    out.add(cgid)
                continue
            try:
                alive = os.stat(os.path.join(self._index.root, path.lstrip("/"))).st_ino == cgid
            except OSError:
                alive = False
            if not alive:
                out.add(cgid)
                self._refs.pop(cgid, None)
                self._names.pop(cgid, None)
        return out

    def _ref(self, cgid: int) -> CgroupRef | None:
        ref = self._refs.get(cgid)
        if ref is not None:
            self._refs.move_to_end(cgid)
            return ref
        path = self._index.lookup(cgid)
        if path is None:
            return None
        ref = parse_cgroup_path(path)
        self._refs[cgid] = ref
        if len(self._refs) > self._max:
            old, _ = self._refs.popitem(last=False)
            self._names.pop(old, None)
            self.evicted += 1
        return ref
