"""A fake Kubernetes API server for pods, faithful to the list/watch protocol, on 127.0.0.1 only.

``FakeKubeApi`` runs aiohttp in a background thread, so sync kernel tests and async unit tests use it
alike. It serves ``GET /api/v1/pods`` the way kube-apiserver does:

- a list returns a real PodList (``apiVersion: v1``, ``kind: PodList``, ``metadata.resourceVersion``,
  items without kind/apiVersion), filtered by ``fieldSelector=spec.nodeName=N`` (any other field
  selector is a 400, as an unsupported field is there);
- ``watch=1`` streams newline-delimited WatchEvents (``{"type": ..., "object": ...}``) of every change
  after ``resourceVersion``; without one (or with "0") it first sends the current pods as ADDED, as the
  real server does. A pod moving into or out of the selected node is an ADDED or DELETED for that
  watch. ``allowWatchBookmarks=true`` lets it send BOOKMARK events (on ``bookmark()``, or every
  ``bookmark_interval`` seconds), ``timeoutSeconds`` ends the watch cleanly;
- resourceVersions are one counter over all changes and increase monotonically; ``advance()`` moves it
  as changes to other resource kinds would;
- the server keeps a bounded event history; a watch from a resourceVersion older than the history
  (``compact()`` empties it, as etcd compaction does) is answered with an ERROR event holding a Status
  with code 410 ("Expired"), or with an HTTP 410 response when ``expire="http"``;
- requests need ``Authorization: Bearer <token>`` (401 with a Status otherwise) unless token is None;
  ``forbidden`` answers 403 as RBAC does.

Faults: ``drop_watches()`` cuts open watch connections (optionally in the middle of an event),
``error_event()`` sends an ERROR event, ``go_down()`` closes the port (connections are refused) and
``come_up()`` reopens it on the same port. Every request is recorded in ``requests``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from background_app import HOST, BackgroundApp

PODS_PATH = "/api/v1/pods"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A metav1.Status, as the API sends for errors (in a body or an ERROR event)."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def make_pod(
    name: str,
    *,
    node: str,
    namespace: str = "shop",
    uid: str | None = None,
    ip: str = "10.244.1.17",
    workload: str | None = None,
    kind: str = "Deployment",
    container: str = "app",
    container_id: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A Pod as the API returns it. kind Deployment: owned by ReplicaSet <workload>-<hash> with the
    pod-template-hash label; StatefulSet, DaemonSet, Job: owned directly; Pod: no owner."""
    workload = workload or name
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid or str(uuid.uuid4()),
        "creationTimestamp": "2024-05-02T09:14:07Z",
        "labels": {"app": workload, **(labels or {})},
    }
    if kind == "Deployment":
        meta["labels"]["pod-template-hash"] = "7c9f8d6b5"
        owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{workload}-7c9f8d6b5"}
    elif kind != "Pod":
        owner = {"apiVersion": "apps/v1", "kind": kind, "name": workload}
    if kind != "Pod":
        meta["ownerReferences"] = [{**owner, "uid": str(uuid.uuid4()), "controller": True}]
    cid = container_id or uuid.uuid4().hex + uuid.uuid4().hex
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": node, "containers": [{"name": container, "image": "nginx:1.27"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "containerStatuses": [
                {"name": container, "containerID": f"containerd://{cid}", "ready": True, "restartCount": 0}
            ],
        },
    }


@dataclass(frozen=True)
class Recorded:
    """One request: "list" or "watch", its query parameters, and the HTTP status answered."""

    verb: str
    params: Mapping[str, str]
    status: int
    authorization: str


@dataclass
class _Event:
    rv: int
    type: str
    obj: dict[str, Any]
    old: dict[str, Any] | None = None


@dataclass(eq=False)
class _Watcher:
    node: str | None
    bookmarks: bool
    request: web.Request
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    controls: deque[tuple[str, Any]] = field(default_factory=deque)


def _node_of(obj: Mapping[str, Any] | None) -> str | None:
    spec = obj.get("spec") if isinstance(obj, Mapping) else None
    node = spec.get("nodeName") if isinstance(spec, Mapping) else None
    return node if isinstance(node, str) else None


def _uid_of(obj: Mapping[str, Any]) -> str:
    uid = obj["metadata"]["uid"]
    assert isinstance(uid, str) and uid, "a pod needs metadata.uid"
    return uid


def _line(event_type: str, obj: Mapping[str, Any]) -> bytes:
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"


class FakeKubeApi:
    def __init__(
        self,
        *,
        token: str | None = "test-token",
        history: int = 1000,
        expire: str = "event",
        bookmark_interval: float | None = None,
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        assert expire in ("event", "http")
        self.token = token
        self.expire = expire
        self.bookmark_interval = bookmark_interval
        self.ssl_context = ssl_context
        """Serve HTTPS with this context (url becomes https://)."""
        self.forbidden = False
        """When set, every request is answered 403 as RBAC does for a service account without access."""
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._pods: dict[str, dict[str, Any]] = {}
        self._rv = 1000  # like a real cluster: never starts at 0, which means "any" to a watch
        self._history: deque[_Event] = deque()
        self._history_max = history
        self._floor = self._rv  # events at or below this resourceVersion are gone from the history
        self._requests: list[Recorded] = []
        self._watchers: set[_Watcher] = set()
        self._app = BackgroundApp("fake-kube-api", self.port, ssl_context)
        self.come_up()

    # ---- lifecycle ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{HOST}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._app.is_up

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get(PODS_PATH, self._handle)
        await self._app.serve(app, handler_cancellation=True, shutdown_timeout=0.5)

    async def _stop(self) -> None:
        await self._drop(mid_line=False)
        await self._app.unserve()

    def come_up(self) -> None:
        """Listen (again) on the same port."""
        if not self._app.is_up:
            self._app.call(self._start())

    def go_down(self) -> None:
        """Cut every connection and close the port: new connections are refused."""
        self._app.call(self._stop())

    def close(self) -> None:
        self.go_down()
        self._app.close()

    def __enter__(self) -> FakeKubeApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- state changes (any thread) -----------------------------------------------------------------

    def _record(self, event_type: str, obj: dict[str, Any], old: dict[str, Any] | None) -> int:
        """Caller holds the lock. Stamps a new resourceVersion on obj and appends the event."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if len(self._history) >= self._history_max:
            self._floor = self._history.popleft().rv
        self._history.append(_Event(self._rv, event_type, copy.deepcopy(obj), old))
        return self._rv

    def _wake_all(self) -> None:
        def wake() -> None:
            for w in self._watchers:
                w.wake.set()

        self._app.loop.call_soon_threadsafe(wake)

    def add_pod(self, pod: Mapping[str, Any]) -> int:
        """Create a pod (any dict with metadata.uid, malformed or not); returns its resourceVersion."""
        obj = copy.deepcopy(dict(pod))
        uid = _uid_of(obj)
        with self._lock:
            assert uid not in self._pods, f"pod {uid} exists"
            rv = self._record("ADDED", obj, None)
            self._pods[uid] = obj
        self._wake_all()
        return rv

    def modify_pod(self, pod: Mapping[str, Any]) -> int:
        obj = copy.deepcopy(dict(pod))
        uid = _uid_of(obj)
        with self._lock:
            old = self._pods[uid]
            rv = self._record("MODIFIED", obj, old)
            self._pods[uid] = obj
        self._wake_all()
        return rv

    def delete_pod(self, uid: str) -> int:
        with self._lock:
            obj = copy.deepcopy(self._pods.pop(uid))
            rv = self._record("DELETED", obj, obj)
        self._wake_all()
        return rv

    def pod(self, uid: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._pods[uid])

    def advance(self, n: int = 1) -> int:
        """Move the resourceVersion as changes to other kinds of objects do (no pod events)."""
        with self._lock:
            self._rv += n
            return self._rv

    def compact(self) -> None:
        """Forget the event history (etcd compaction): watches from any older RV get 410."""
        with self._lock:
            self._history.clear()
            self._floor = self._rv

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    # ---- faults (any thread) ---------------------------------------------------------------------

    async def _drop(self, mid_line: bool) -> None:
        watchers = list(self._watchers)
        for w in watchers:
            w.controls.append(("drop", mid_line))
            w.wake.set()
        for w in watchers:
            await asyncio.wait_for(w.closed.wait(), 5)

    def drop_watches(self, mid_line: bool = False) -> int:
        """Cut the open watch connections without ending their HTTP response, optionally after half
        an event; returns how many were cut."""
        n = len(self._watchers)
        self._app.call(self._drop(mid_line))
        return n

    def bookmark(self, rv: str | None = None) -> None:
        """Send a BOOKMARK with the current resourceVersion (or `rv`, as a server of another
        version scheme might) on every watch that allows them."""
        self._control(("bookmark", rv))

    def error_event(self, code: int, reason: str, message: str) -> None:
        """Send an ERROR event (a Status) on every open watch, which then ends, as the server does."""
        self._control(("error", status(code, reason, message)))

    def _control(self, control: tuple[str, Any]) -> None:
        def send() -> None:
            for w in self._watchers:
                w.controls.append(control)
                w.wake.set()

        self._app.loop.call_soon_threadsafe(send)

    # ---- introspection (any thread) -----------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def lists(self) -> list[Recorded]:
        return [r for r in self.requests if r.verb == "list"]

    def watches(self) -> list[Recorded]:
        return [r for r in self.requests if r.verb == "watch"]

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
        """Block (bounded) until predicate() holds; for sync tests."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake kube API: not within {timeout}s: {what or predicate}")
            time.sleep(0.01)

    # ---- the API --------------------------------------------------------------------------------------

    def _respond(self, verb: str, params: Mapping[str, str], auth: str, code: int, body: Any) -> web.Response:
        with self._lock:
            self._requests.append(Recorded(verb, dict(params), code, auth))
        return web.json_response(body, status=code)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        watch = params.get("watch", "").lower() in ("1", "true")
        verb = "watch" if watch else "list"
        auth = request.headers.get("Authorization", "")
        if self.token is not None and auth != f"Bearer {self.token}":
            return self._respond(verb, params, auth, 401, status(401, "Unauthorized", "Unauthorized"))
        if self.forbidden:
            message = (
                'pods is forbidden: User "system:serviceaccount:monitoring:podnet" cannot '
                f'{verb} resource "pods" in API group "" at the cluster scope'
            )
            return self._respond(verb, params, auth, 403, status(403, "Forbidden", message))
        node: str | None = None
        for term in filter(None, params.get("fieldSelector", "").split(",")):
            key, _, value = term.replace("==", "=").partition("=")
            if key != "spec.nodeName":
                message = f'field label not supported: "{key}" (this fake knows spec.nodeName only)'
                return self._respond(verb, params, auth, 400, status(400, "BadRequest", message))
            node = value
        if not watch:
            return self._list(params, auth, node)
        return await self._watch(request, params, auth, node)

    def _list(self, params: Mapping[str, str], auth: str, node: str | None) -> web.Response:
        rv_text = params.get("resourceVersion", "")
        with self._lock:
            current = self._rv
            items = [
                {k: v for k, v in copy.deepcopy(p).items() if k not in ("kind", "apiVersion")}
                for p in self._pods.values()
                if node is None or _node_of(p) == node
            ]
        if rv_text not in ("", "0"):
            if not rv_text.isdigit():
                msg = f"invalid resource version: {rv_text}"
                return self._respond("list", params, auth, 400, status(400, "BadRequest", msg))
            if int(rv_text) > current:
                msg = f"Too large resource version: {rv_text}, current: {current}"
                return self._respond("list", params, auth, 504, status(504, "Timeout", msg))
        items.sort(key=lambda p: (p["metadata"].get("namespace", ""), p["metadata"].get("name", "")))
        body = {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": str(current)}}
        body["items"] = items
        return self._respond("list", params, auth, 200, body)

    def _visible(self, event: _Event, node: str | None) -> tuple[str, dict[str, Any]] | None:
        """The event as a watch on `node` sees it: a pod entering the selection is ADDED, one leaving
        it DELETED, one outside it nothing."""
        if node is None:
            return event.type, event.obj
        now = _node_of(event.obj) == node
        before = event.old is not None and _node_of(event.old) == node
        if event.type == "ADDED":
            return ("ADDED", event.obj) if now else None
        if event.type == "DELETED":
            return ("DELETED", event.obj) if now else None
        if now and before:
            return "MODIFIED", event.obj
        if now:
            return "ADDED", event.obj
        if before:
            return "DELETED", event.obj
        return None

    async def _watch(
        self, request: web.Request, params: Mapping[str, str], auth: str, node: str | None
    ) -> web.StreamResponse:
        rv_text = params.get("resourceVersion", "")
        initial: list[dict[str, Any]] = []
        if rv_text not in ("", "0") and not rv_text.isdigit():
            msg = f"invalid resource version: {rv_text}"
            return self._respond("watch", params, auth, 400, status(400, "BadRequest", msg))
        with self._lock:
            if rv_text in ("", "0"):
                pods = [p for p in self._pods.values() if node is None or _node_of(p) == node]
                initial = copy.deepcopy(sorted(pods, key=lambda p: int(p["metadata"]["resourceVersion"])))
                sent = self._rv
            else:
                sent = int(rv_text)
            expired = sent < self._floor
            floor = self._floor
        gone = status(410, "Expired", f"too old resource version: {rv_text} ({floor})")
        if expired and self.expire == "http":
            return self._respond("watch", params, auth, 410, gone)
        with self._lock:
            self._requests.append(Recorded("watch", dict(params), 200, auth))

        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if expired:
            await resp.write(_line("ERROR", gone))
            await resp.write_eof()
            return resp

        loop = asyncio.get_running_loop()
        timeout = params.get("timeoutSeconds", "")
        deadline = loop.time() + int(timeout) if timeout.isdigit() else None
        w = _Watcher(node, params.get("allowWatchBookmarks", "") == "true", request)
        self._watchers.add(w)
        try:
            for obj in initial:
                await resp.write(_line("ADDED", obj))
            next_bookmark = loop.time() + (self.bookmark_interval or 0)
            while True:
                with self._lock:
                    lagged = sent < self._floor
                    pending = [e for e in self._history if e.rv > sent]
                    current = self._rv
                if lagged:  # fell out of the history while connected: the server gives up on us
                    await resp.write(_line("ERROR", gone))
                    break
                for event in pending:
                    sent = event.rv
                    visible = self._visible(event, node)
                    if visible is not None:
                        await resp.write(_line(*visible))
                stop = False
                while w.controls and not stop:
                    what, arg = w.controls.popleft()
                    if what == "drop":
                        if arg:
                            await resp.write(b'{"type":"MODIFIED","object":{"kind":"Pod","metadata":{"na')
                        if request.transport is not None:
                            request.transport.abort()
                        return resp
                    if what == "bookmark" and w.bookmarks:
                        await resp.write(_line("BOOKMARK", _bookmark(current if arg is None else arg)))
                    elif what == "error":
                        await resp.write(_line("ERROR", arg))
                        stop = True
                if stop:
                    break
                now = loop.time()
                if self.bookmark_interval and w.bookmarks and now >= next_bookmark:
                    await resp.write(_line("BOOKMARK", _bookmark(current)))
                    next_bookmark = now + self.bookmark_interval
                if deadline is not None and now >= deadline:
                    break
                if request.transport is None or request.transport.is_closing():
                    return resp  # the client went away
                wait = 0.5
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if self.bookmark_interval and w.bookmarks:
                    wait = min(wait, max(0.0, next_bookmark - now))
                w.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.wake.wait(), max(wait, 0.001))
            await resp.write_eof()
            return resp
        except (ConnectionResetError, RuntimeError):
            return resp  # the client hung up while we wrote
        finally:
            self._watchers.discard(w)
            w.closed.set()


def _bookmark(rv: int | str) -> dict[str, Any]:
    # What the API server sends: an empty object of the watched kind but for its resourceVersion.
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": str(rv), "creationTimestamp": None},
    }


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait on the running loop until `predicate()` holds; AssertionError naming `what` after
    `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)
