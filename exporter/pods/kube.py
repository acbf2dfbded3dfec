"""Pod metadata from the Kubernetes API: list and watch the pods of this node into the PodStore.

The list/watch protocol is spoken directly over aiohttp rather than through a client library,
because the exporter needs exact control of what those libraries hide or get wrong (see README,
"Pod metadata from the Kubernetes API"): the resourceVersion a watch resumes from, BOOKMARK
events, relisting on 410 Gone, and the raw Pod JSON so that exporter.pods.pods validates every object.

The protocol, as the API server implements it:

- ``GET /api/v1/pods?fieldSelector=spec.nodeName=N`` returns a PodList whose
  ``metadata.resourceVersion`` (RV) is the state the list shows;
- ``...&watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=T`` streams one JSON
  WatchEvent per line (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR) for every change after RV; every
  object carries its own RV and a BOOKMARK carries only an RV, so the latest one seen is where a
  new watch resumes after a dropped connection, with nothing lost and no relist;
- an RV older than the server's event history is answered with 410 Gone (an HTTP status, or more
  often an ERROR event holding a Status with code 410): only a fresh list can resynchronise.

Everything runs on the event loop except reading the token and CA files and parsing a whole
PodList, which go to worker threads. The store is only ever patched with whole PodMeta values.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from exporter.pods.metadata import MetadataSourceState, PodStore
from exporter.pods.pods import PodMeta, PodMetadataError, pod_from_json

__all__ = ["SOURCE", "Backoff", "KubeWatcher", "Timing", "parse_pod_list_response"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KubeConfig:
    """Where and how to reach the Kubernetes API. ``url`` has no trailing slash; ``token_file`` is
    re-read for every request (rotated service-account tokens); ``in_cluster`` says the URL came
    from KUBERNETES_SERVICE_HOST/PORT rather than --kube-api."""

    url: str
    token_file: str | None
    ca_file: str | None
    insecure_skip_tls_verify: bool
    in_cluster: bool


SOURCE: Final = "kubernetes"
_PODS_PATH: Final = "/api/v1/pods"
# A Pod is at most ~1.5 MB (etcd's request limit); a node runs a few hundred. Both caps only stop
# a broken proxy or server from exhausting memory.
_MAX_EVENT_BYTES: Final = 16 * 1024 * 1024
_MAX_LIST_BYTES: Final = 256 * 1024 * 1024
_MAX_ERROR_BODY: Final = 64 * 1024
# etcd's revisions are at most 20 digits; resourceVersions are opaque, so any printable string
# of sane length is sent back as given.
_MAX_RV_LEN: Final = 256
_READ_CHUNK: Final = 64 * 1024
# Distinct malformed-pod messages logged before going quiet; all of them are counted.
_MAX_LOGGED_PROBLEMS: Final = 100
_SHOW_MAX: Final = 200


@dataclass(frozen=True)
class Timing:
    """Retry and timeout policy. The defaults suit a real cluster; tests shrink them."""

    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    connect_timeout: float = 10.0
    list_timeout: float = 60.0
    watch_seconds: tuple[int, int] = (240, 360)
    """timeoutSeconds asked of each watch, drawn from this range so that the watches of many
    nodes do not all end (and reconnect) at the same moment."""
    idle_slack: float = 30.0
    """A watch that sent nothing for its timeoutSeconds plus this is taken as a dead connection."""
    min_healthy_watch: float = 1.0
    """A watch that ends cleanly sooner than this without sending anything is retried with
    backoff, so a misbehaving proxy that closes every watch at once cannot make a busy loop."""


class Backoff:
    """Exponential backoff with "equal jitter": attempt n waits between d/2 and d, where
    d = min(maximum, initial * 2**n). Bounded by `maximum`; reset() after a success."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self.attempts = 0

    def next_delay(self) -> float:
        # The exponent is capped so that a long outage cannot overflow the float.
        d = min(self.maximum, self.initial * 2.0 ** min(self.attempts, 62))
        self.attempts += 1
        return d / 2 + self._rng.uniform(0, d / 2)

    def reset(self) -> None:
        self.attempts = 0


class KubeError(Exception):
    """A failed request or a broken stream. `kind` groups errors for log-once (one line per kind
    and outage); the message is one line."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Expired(Exception):
    """The resourceVersion is no longer in the server's history (410 Gone), or the server
    refuses to watch from it (400): relist."""


def _show(value: object) -> str:
    text = str(value)
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


def _status_of(obj: object) -> tuple[int, str, str]:
    """(code, reason, message) of a Kubernetes Status object; zeros and "" where missing."""
    if not isinstance(obj, Mapping):
        return 0, "", ""
    code = obj.get("code")
    reason = obj.get("reason")
    message = obj.get("message")
    return (
        code if isinstance(code, int) and not isinstance(code, bool) else 0,
        reason if isinstance(reason, str) else "",
        message if isinstance(message, str) else "",
    )


def _is_expired(code: int, reason: str) -> bool:
    return code == 410 or reason in ("Expired", "Gone")


def _meta_str(obj: Mapping[str, Any], key: str) -> str | None:
    meta = obj.get("metadata")
    value = meta.get(key) if isinstance(meta, Mapping) else None
    return value if isinstance(value, str) and value else None


def _usable_rv(rv: str) -> bool:
    """Whether a resourceVersion can be sent back in a watch URL as it was received. A lone
    surrogate (JSON may carry "\\ud800") cannot be encoded and would be dropped from the query,
    turning the watch into one from "now" that misses every deletion in between; a huge one
    makes every watch request too long for the server."""
    return len(rv) <= _MAX_RV_LEN and rv.isprintable()


def parse_pod_list_response(body: bytes) -> tuple[dict[str, PodMeta], list[tuple[str | None, str]], str]:
    """(pods keyed by every UID their cgroups carry, (uid or None, problem) per skipped item, list RV)
    from a PodList response body. Pure and CPU-bound: run it in a thread. Raises KubeError when the
    document as a whole is unusable."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise KubeError("list-body", f"pod list is not valid JSON ({_show(e)})") from None
    if not isinstance(doc, dict):
        raise KubeError("list-body", "pod list is not a JSON object")
    if doc.get("kind") not in ("PodList", "List"):
        raise KubeError("list-body", f"expected kind PodList, got {_show(doc.get('kind'))}")
    rv = _meta_str(doc, "resourceVersion")
    if rv is None:
        raise KubeError("list-body", "pod list has no metadata.resourceVersion to watch from")
    if not _usable_rv(rv):
        raise KubeError("list-body", f"pod list has an unusable metadata.resourceVersion ({_show(rv)})")
    items = doc.get("items")
    if items is None:
        items = []  # an empty list may come with "items": null
    if not isinstance(items, list):
        raise KubeError("list-body", "pod list items is not an array")
    pods: dict[str, PodMeta] = {}
    problems: list[tuple[str | None, str]] = []
    for i, item in enumerate(items):
        uid = _meta_str(item, "uid") if isinstance(item, Mapping) else None
        try:
            pod = pod_from_json(item)
        except PodMetadataError as e:
            problems.append((uid, f"items[{i}]: {e}"))
            continue
        # A pod's own uid is its own, whichever pod claimed it first as its kubelet uid (any pod
        # may carry a mirror annotation): only a claim can lose a key, never the uid itself.
        clash = next((k for k in pod.cgroup_uids if k in pods and (k != pod.uid or pods[k].uid == k)), None)
        if clash is not None:
            problems.append((None, f"items[{i}]: pod {pod.namespace}/{pod.name}: uid {clash} listed twice"))
            continue
        for key in pod.cgroup_uids:
            pods[key] = pod
    return pods, problems, rv


async def _lines(stream: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """Newline-delimited records of a stream. aiohttp's readline() fails on lines over its buffer
    limit (512 KiB), which a Pod with large annotations can exceed; here the bound is `limit`:
    a line longer than that fails the stream however the bytes were split into chunks."""
    buf = bytearray()
    async for chunk in stream.iter_any():
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if end - start > limit:
                raise KubeError("stream", f"watch event larger than {limit // (1024 * 1024)} MiB")
            line = bytes(buf[start:end]).strip()
            start = end + 1
            if line:
                yield line
        del buf[:start]
        if len(buf) > limit:
            raise KubeError("stream", f"watch event larger than {limit // (1024 * 1024)} MiB")
    if buf.strip():
        # The server closed in the middle of an event: a dropped connection, not the end of a watch.
        raise KubeError("dropped", "watch connection closed in the middle of an event")


class KubeWatcher:
    """Keeps the store equal to the API's pods of one node: list, then watch from the list's
    resourceVersion; re-watch from the last resourceVersion seen after a dropped connection or a
    timeout; relist after 410 Gone; retry every failure with bounded, jittered backoff. The store
    keeps the last-known pods for as long as the API is unreachable.

    `run()` is a task that ends only by cancellation. `state()` may be called from any thread.
    """

    def __init__(
        self,
        config: KubeConfig,
        node_name: str,
        store: PodStore,
        timing: Timing | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.node_name = node_name
        self.store = store
        self.timing = timing or Timing()
        self._rng = rng or random.Random()
        self._backoff = Backoff(self.timing.backoff_initial, self.timing.backoff_max, self._rng)
        self._url = config.url.rstrip("/") + _PODS_PATH
        self._selector = f"spec.nodeName={node_name}"
        self._ssl: ssl.SSLContext | bool | None = None  # built on first use, in a thread
        self.resource_version: str | None = None
        """Where the next watch resumes; None: a list is needed first."""
        self._quorum_list = False
        self._expiries = 0
        self._logged_kinds: set[str] = set()
        self._logged_problems: set[str] = set()
        self.up = False
        self.last_sync = 0.0
        self.lists = 0
        self.errors = 0
        self.malformed = 0
        self.watches = 0

    # ---- state for self-metrics ------------------------------------------------------------------

    def state(self) -> MetadataSourceState:
        return MetadataSourceState(
            source=SOURCE, up=self.up, last_sync=self.last_sync, relists=self.lists, errors=self.errors
        )

    def _synced(self) -> None:
        self.up = True
        self.last_sync = time.time()

    def _recovered(self, *, watching: bool) -> None:
        """A list or watch worked for real (not just a 200 that drops at once). Only a working
        watch ends a run of 410s: list, 410, list... must keep backing off."""
        self._synced()
        if watching:
            self._expiries = 0
        if self._expiries == 0:
            self._backoff.reset()
        if self._logged_kinds:
            log.info("kubernetes API %s: pods of node %s in sync again", self.config.url, self.node_name)
            self._logged_kinds.clear()

    def _failed(self, kind: str, message: str, level: int = logging.ERROR) -> None:
        """Counted every time; logged once per kind until the source recovers."""
        self.errors += 1
        self.up = False
        if kind not in self._logged_kinds:
            self._logged_kinds.add(kind)
            log.log(
                level,
                "kubernetes API %s: %s; keeping the last-known pod metadata and retrying "
                '(counted in podnet_exporter_metadata_errors_total{source="%s"})',
                self.config.url,
                message,
                SOURCE,
            )

    def _skipped(self, problem: str) -> None:
        """A malformed pod object: skipped, counted, each distinct problem logged once."""
        self.errors += 1
        self.malformed += 1
        if problem in self._logged_problems or len(self._logged_problems) > _MAX_LOGGED_PROBLEMS:
            return
        self._logged_problems.add(problem)
        if len(self._logged_problems) > _MAX_LOGGED_PROBLEMS:
            log.warning("kubernetes API: more malformed pods; no longer logging them (still counted)")
        else:
            log.warning("kubernetes API: skipped a malformed pod: %s", _show(problem))

    # ---- the loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("kubernetes API %s: watching the pods of node %s", self.config.url, self.node_name)
        t = self.timing
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.connect_timeout)
        # One connection is all a list-then-watch needs. trust_env is off: HTTP(S)_PROXY set for
        # other traffic must not send the connection to the cluster's own API through a proxy.
        connector = aiohttp.TCPConnector(limit=2)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as session:
            while True:
                delay = await self._step(session)
                if delay > 0:
                    await asyncio.sleep(delay)

    async def _step(self, session: aiohttp.ClientSession) -> float:
        """One list or watch; returns how long to wait before the next."""
        try:
            if self.resource_version is None:
                await self._list(session)
                return 0.0
            return await self._watch(session)
        except _Expired:
            log.info(
                "kubernetes API %s: resourceVersion %s is too old (410 Gone); relisting",
                self.config.url,
                self.resource_version,
            )
            self.resource_version = None
            self._quorum_list = True
            self._expiries += 1
            # Relist at once the first time; a server that keeps answering 410 gets backoff.
            return self._backoff.next_delay() if self._expiries > 1 else 0.0
        except KubeError as e:
            level = logging.WARNING if e.kind == "dropped" else logging.ERROR
            self._failed(e.kind, str(e), level)
        except aiohttp.ClientConnectorError as e:
            # Connection refused, DNS, TLS: the common shapes of "API unreachable".
            self._failed("connect", f"cannot connect ({_connect_problem(e)})")
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as e:
            self._failed("dropped", f"connection dropped ({type(e).__name__})", logging.WARNING)
        except TimeoutError:
            self._failed("timeout", "no answer within the connect, list or watch-idle timeout")
        except aiohttp.ClientError as e:
            self._failed("client", f"request failed ({type(e).__name__}: {_show(e)})")
        except OSError as e:
            self._failed("os", f"request failed ({_show(e.strerror or e)})")
        except Exception as e:
            # A bug here must not end the task group and with it /metrics: count, log, retry.
            self._failed(f"bug:{type(e).__name__}", f"unexpected {type(e).__name__}: {_show(e)}")
        return self._backoff.next_delay()

    async def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        path = self.config.token_file
        if path:
            # Read for every request: projected service-account tokens are rotated in place.
            try:
                token = (await asyncio.to_thread(_read_text, path)).strip()
            except OSError as e:
                problem = _show(e.strerror or e)
                raise KubeError("token", f"cannot read token file {path} ({problem})") from None
            if token:
                headers["Authorization"] = f"Bearer {token}"
        return headers

    async def _ssl_context(self) -> ssl.SSLContext | bool:
        """aiohttp's ssl argument: True (default checks; all plain http needs), False (no
        verification), or a context trusting the configured CA."""
        if not self._url.startswith("https:"):
            return True
        if self._ssl is None:
            if self.config.insecure_skip_tls_verify:
                self._ssl = False
            else:
                try:
                    cafile = self.config.ca_file
                    self._ssl = await asyncio.to_thread(ssl.create_default_context, cafile=cafile)
                except (OSError, ssl.SSLError) as e:
                    raise KubeError("ca", f"cannot load CA file {self.config.ca_file} ({_show(e)})") from None
        return self._ssl

    async def _http_error(self, resp: aiohttp.ClientResponse, what: str) -> KubeError:
        try:
            body = await resp.content.read(_MAX_ERROR_BODY)
            _, reason, message = _status_of(json.loads(body))
        except (ValueError, aiohttp.ClientError, TimeoutError):
            reason, message = "", ""
        detail = f"{resp.status} {resp.reason or reason}".strip()
        if message:
            detail += f": {_show(message)}"
        hint = ""
        if resp.status == 401:
            where = self.config.token_file or "none given"
            hint = f"; the bearer token was rejected: check the token file ({where}, --kube-token-file)"
        elif resp.status == 403:
            hint = "; the service account needs get/list/watch on pods (a ClusterRole)"
        return KubeError(f"http-{resp.status}", f"{what} pods of node {self.node_name}: HTTP {detail}{hint}")

    async def _get(
        self, session: aiohttp.ClientSession, params: dict[str, str], timeout: aiohttp.ClientTimeout
    ) -> Any:
        """A GET of this node's pods (list or watch), with the current token and TLS settings."""
        headers, tls = await self._headers(), await self._ssl_context()
        return session.get(self._url, params=params, headers=headers, ssl=tls, timeout=timeout)

    async def _list(self, session: aiohttp.ClientSession) -> None:
        # The first list may come from the API server's watch cache ("0": cheap when thousands of
        # nodes start at once, as kubelets do); after a 410 only the current state will do ("").
        params = {"fieldSelector": self._selector}
        if not self._quorum_list:
            params["resourceVersion"] = "0"
        timeout = aiohttp.ClientTimeout(
            total=self.timing.list_timeout, sock_connect=self.timing.connect_timeout
        )
        async with await self._get(session, params, timeout) as resp:
            if resp.status == 410:
                self._quorum_list = True
                raise KubeError("http-410", "listing pods: HTTP 410 Gone; relisting from the current state")
            if resp.status != 200:
                raise await self._http_error(resp, "listing")
            body = await _read_bounded(resp.content, _MAX_LIST_BYTES)
        pods, problems, rv = await asyncio.to_thread(parse_pod_list_response, body)
        for uid, problem in problems:
            self._skipped(problem)
            # A pod whose new version is malformed keeps its last good metadata, but its claim
            # to a kubelet uid never takes the key of a pod listed under that uid.
            old = self.store.by_uid(uid) if uid else None
            if old is not None and old.uid == uid:
                for key in old.cgroup_uids:
                    held = pods.get(key)
                    if key == old.uid or held is None or held.uid != key:
                        pods[key] = old
        self.store.replace_all(pods)
        self.resource_version = rv
        self._quorum_list = False
        self.lists += 1
        log.info(
            "kubernetes API %s: listed %d pods of node %s at resourceVersion %s",
            self.config.url,
            len(self.store),
            self.node_name,
            rv,
        )
        self._recovered(watching=False)

    async def _watch(self, session: aiohttp.ClientSession) -> float:
        assert self.resource_version is not None
        lo, hi = self.timing.watch_seconds
        seconds = self._rng.randint(lo, hi)
        params = {
            "fieldSelector": self._selector,
            "watch": "1",
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timing.connect_timeout, sock_read=seconds + self.timing.idle_slack
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        events = 0
        self.watches += 1
        async with await self._get(session, params, timeout) as resp:
            if resp.status == 410:
                raise _Expired
            if resp.status == 400:
                # Not a version this server watches from (another server's, or one it never
                # issued): retrying it would fail for ever; client-go lists again too.
                log.warning("%s; relisting", await self._http_error(resp, "watching"))
                raise _Expired
            if resp.status != 200:
                raise await self._http_error(resp, "watching")
            # Connected at our resourceVersion: the store is as current as the server knows.
            self._synced()
            async for line in _lines(resp.content, _MAX_EVENT_BYTES):
                self._event(line)
                if events == 0:
                    self._recovered(watching=True)
                events += 1
        # The server ended the watch at timeoutSeconds: resume at once from where it stopped.
        if events == 0 and loop.time() - started < self.timing.min_healthy_watch:
            return self._backoff.next_delay()
        self._recovered(watching=True)
        return 0.0

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            raise KubeError("stream", f"watch sent a line that is not JSON: {_show(line[:80])}") from None
        if not isinstance(event, dict):
            raise KubeError("stream", "watch sent a JSON value that is not an event object")
        kind = event.get("type")
        obj = event.get("object")
        if kind == "ERROR":
            code, reason, message = _status_of(obj)
            if _is_expired(code, reason):
                raise _Expired
            raise KubeError(f"watch-error-{code}", f"watch ERROR {code} {reason}: {_show(message)}")
        if not isinstance(obj, Mapping):
            self._skipped(f"{_show(kind)} event without an object")
            return
        rv = _meta_str(obj, "resourceVersion")
        if rv is not None and not _usable_rv(rv):
            # Resuming from it is impossible: the next watch resumes from the last good one.
            self._skipped(f"{_show(kind)} event: unusable metadata.resourceVersion {_show(rv)}")
            rv = None
        if kind == "BOOKMARK":
            pass  # carries only the resourceVersion: nothing changed up to there
        elif kind in ("ADDED", "MODIFIED"):
            try:
                pod = pod_from_json(obj)
            except PodMetadataError as e:
                # The previous version, if any, stays: stale labels beat losing the pod's name.
                self._skipped(f"{kind} event: {e}")
            else:
                clash = self._clash(pod)
                if clash:
                    self._skipped(f"{kind} event: {clash}")
                else:
                    self.store.upsert(pod)
        elif kind == "DELETED":
            uid = _meta_str(obj, "uid")
            if uid is None:
                self._skipped("DELETED event: pod without metadata.uid")
            else:
                held = self.store.by_uid(uid)
                # Only the pod with this API uid: not a mirror pod whose kubelet uid it is.
                if held is not None and held.uid == uid:
                    self.store.delete(uid)
        else:
            self._skipped(f"unknown watch event type {_show(kind)}")
        if rv is not None:
            self.resource_version = rv
        self._synced()

    def _clash(self, pod: PodMeta) -> str:
        """Why `pod` cannot be stored: it claims as its kubelet uid (mirror annotation) the uid of
        another pod, whose traffic it would take over. "" when it can be: a pod's own uid always
        wins over such a claim, and of two mirror pods claiming one kubelet uid the newer does
        (the kubelet recreated the mirror pod). The list skips such a claim too."""
        for key in pod.cgroup_uids:
            held = self.store.by_uid(key)
            if key != pod.uid and held is not None and held.uid == key:
                return (
                    f"pod {_show(pod.namespace)}/{_show(pod.name)}: uid {_show(key)} already used by "
                    f"pod {_show(held.namespace)}/{_show(held.name)}"
                )
        return ""


def _connect_problem(e: aiohttp.ClientConnectorError) -> str:
    if isinstance(e, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return f"TLS: {_show(e)}"
    err = e.os_error
    return os.strerror(err.errno) if err.errno else _show(err.strerror or err)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    buf = bytearray()
    async for chunk in stream.iter_chunked(_READ_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise KubeError("list-body", f"pod list larger than {limit // (1024 * 1024)} MiB")
    return bytes(buf)
