"""Pod metadata store and its sources (a pods file; a Kubernetes watch feeds the same store).

The store is replaced or patched by sources and read by the poller; readers get whole
immutable PodMeta values, so no reader ever sees half an update.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from exporter.pods.pods import PodMeta, PodsFileError, load_pod_list

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetadataSourceState:
    """Health of one pod metadata source ("kubernetes" or "file"), for the self-metrics."""

    source: str
    up: bool
    last_sync: float
    """Unix time the store was last known to match the source; 0: never."""
    relists: int
    errors: int


class PodStore:
    """Pods by UID and by IP. Bounded: beyond max_pods new pods are dropped and counted."""

    def __init__(self, max_pods: int = 20000) -> None:
        self._lock = threading.Lock()
        self._by_uid: dict[str, PodMeta] = {}
        self._by_ip: dict[str, PodMeta] = {}
        self._max = max_pods
        self.dropped = 0
        self.updated_at = 0.0
        self.version = 0

    def replace_all(self, pods: Mapping[str, PodMeta]) -> None:
        kept: dict[str, PodMeta] = {}
        distinct: set[str] = set()
        dropped = 0
        # A static pod sits under two keys (API UID and the kubelet's); the cap counts pods.
        for key, pod in pods.items():
            if pod.uid not in distinct and len(distinct) >= self._max:
                dropped += 1
                continue
            distinct.add(pod.uid)
            kept[key] = pod
        with self._lock:
            self._by_uid = kept
            self._by_ip = _ip_index(kept.values())
            self.dropped += dropped
            self.updated_at = time.time()
            self.version += 1

    def upsert(self, pod: PodMeta) -> None:
        with self._lock:
            if pod.uid not in self._by_uid and len(self) >= self._max:
                self.dropped += 1
                return
            # Indexed under every UID its cgroups may carry (a static pod has two); the keys of
            # its previous version go first, or a dropped mirror uid would keep naming it.
            kept = {k: v for k, v in self._by_uid.items() if v.uid != pod.uid}
            self._by_uid = {**kept, **dict.fromkeys(pod.cgroup_uids, pod)}
            self._by_ip = _ip_index(self._by_uid.values())
            self.updated_at = time.time()
            self.version += 1

    def delete(self, uid: str) -> None:
        with self._lock:
            pod = self._by_uid.get(uid)
            if pod is not None:
                self._by_uid = {k: v for k, v in self._by_uid.items() if v.uid != pod.uid}
                self._by_ip = _ip_index(self._by_uid.values())
                self.version += 1
            self.updated_at = time.time()

    def by_uid(self, uid: str) -> PodMeta | None:
        return self._by_uid.get(uid)

    def by_ip(self, ip: str) -> PodMeta | None:
        return self._by_ip.get(ip)

    def pods(self) -> list[PodMeta]:
        """Every pod once (a static pod sits under two UIDs). The dict is replaced whole on
        each update, so this reads one consistent version without the lock."""
        return list({p.uid: p for p in self._by_uid.values()}.values())

    def __len__(self) -> int:
        return len({p.uid for p in self._by_uid.values()})


def _ip_index(pods: Iterable[PodMeta]) -> dict[str, PodMeta]:
    """Pods by IP, for naming the peer of a flow.

    Only pods whose IPs still name them are indexed (PodMeta.names_peers_by_ip): Running,
    Pending with an IP, pods of absent phase, taken to be running since a pods file need not
    carry status.phase, and phase Unknown (last in any clash). Finished pods (Succeeded,
    Failed) stay in the store for their own metrics, but their IPs may already belong to
    another pod. When several pods claim one IP (a stale status during a handover), the lowest
    PodMeta.ip_claim_rank wins (Running first), then the lowest UID, so the result never
    depends on the order of the input.
    """
    index: dict[str, PodMeta] = {}
    for pod in pods:
        # Also skips hostNetwork pods: they share the node's address, which names no pod.
        if not pod.names_peers_by_ip:
            continue
        for ip in pod.pod_ips:
            held = index.get(ip)
            if held is None or _claim(pod) < _claim(held):
                index[ip] = pod
    return index


def _claim(pod: PodMeta) -> tuple[int, str]:
    return pod.ip_claim_rank, pod.uid


@dataclass(frozen=True)
class _FileStamp:
    inode: int
    mtime_ns: int
    size: int


class PodsFileSource:
    """Loads --pods-file into the store and reloads it when it changes, including
    replacement by atomic rename. A bad update keeps the last good metadata."""

    def __init__(self, path: str, store: PodStore) -> None:
        self.path = path
        self._store = store
        self._stamp: _FileStamp | None = None
        self.errors = 0
        self._last_error = ""

    def load_initial(self) -> None:
        """Start-up: any problem with the file is fatal (raises PodsFileError)."""
        pods, problems = load_pod_list(self.path)
        for p in problems:
            log.warning("pods file %s: skipped %s", self.path, p)
        self._store.replace_all(pods)
        self._stamp = self._stat()

    def _stat(self) -> _FileStamp | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return _FileStamp(st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> bool:
        """Reload when changed; blocking (file I/O). Returns whether the store changed."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        try:
            pods, problems = load_pod_list(self.path)
        except PodsFileError as e:
            self.errors += 1
            if str(e) != self._last_error:
                log.error("%s; keeping the last good pod metadata", e)
                self._last_error = str(e)
            self._stamp = stamp
            return False
        for p in problems:
            log.warning("pods file %s: skipped %s", self.path, p)
        self._last_error = ""
        self._stamp = stamp
        self._store.replace_all(pods)
        log.info("pods file %s reloaded: %d pods", self.path, len(pods))
        return True
