"""HTTP endpoints: /metrics, /healthz, /readyz. Handlers only read the published snapshot.
With a web config file, a middleware checks allowed client certificate names and basic
auth, and every response carries the configured headers."""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from exporter import __version__
from exporter.export.prometheus import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, Exposition, Rendered
from exporter.export.web_config import (
    BasicAuth,
    WebConfig,
    WebConfigError,
    files_stamp,
    load_web_config_with_context,
)
from exporter.metrics.model import EMPTY_SNAPSHOT


class SnapshotStore:
    """Latest rendered snapshot. Replaced whole by the poller; readers never block."""

    def __init__(self, exposition: Exposition, stale_after: float | None = None) -> None:
        self.current: Rendered = exposition.render(EMPTY_SNAPSHOT)
        self.ready = asyncio.Event()
        self.polls = 0
        self.last_success = 0.0
        """Event-loop time of the last successful poll."""
        self.stale_after = stale_after
        """Seconds after the last successful poll at which /readyz turns 503; None: never."""
        self.in_flight = 0
        """/metrics requests being answered (--web.max-requests)."""
        self.responses: Counter[tuple[str, str]] = Counter()
        """(handler, status code) -> requests answered; the poller exports them."""

    def not_ready(self, now: float) -> str:
        """Why /readyz should fail at loop time `now`, "" when ready."""
        if not self.ready.is_set():
            return "first poll has not completed"
        if self.stale_after is not None and now - self.last_success > self.stale_after:
            return f"the last successful poll was {now - self.last_success:.0f} s ago"
        return ""


SNAPSHOTS = web.AppKey("snapshots", SnapshotStore)
SEND_TIMEOUT = 60.0
"""Seconds a scrape of /metrics may take to be answered and sent before its connection is cut."""
MAX_REQUESTS = web.AppKey("max_requests", int)
"""Scrapes of /metrics answered at once; more get 503 (0 or unset: no limit)."""

UNGUARDED = frozenset({"/healthz", "/readyz"})
"""Paths without basic auth: kubelet probes cannot send credentials, and they tell nothing
but up or not. TLS (and a required client certificate) still applies to them."""
AUTH_WAITING_MAX = 32
"""Requests that may wait for a bcrypt check at once; beyond, 429 (bcrypt costs ~50 ms of
CPU per unknown credential: an unbounded queue would let anyone pin a core)."""


@dataclass
class WebState:
    """The web config in force. The listener keeps the TLS context it was started with;
    its SNI callback hands each new handshake the current one, so a reload (a renewed
    certificate, a new client CA) applies to new connections without a restart."""

    config: WebConfig
    stamp: object
    """files_stamp() of the files the config was read from."""
    auth: BasicAuth | None
    context: ssl.SSLContext | None
    auth_waiting: int = 0

    @classmethod
    def read(cls, path: str) -> WebState:
        """Blocking: the file, its certificates, and a TLS context built from them once."""
        config, context = load_web_config_with_context(path)
        auth = BasicAuth(config.basic_auth_users) if config.basic_auth_users else None
        return cls(config, files_stamp(config.files()), auth, context)

    def replace(self, new: WebState) -> None:
        old_tls, new_tls = self.config.tls, new.config.tls
        if (old_tls is None) != (new_tls is None):
            fixed: tuple[str, ...] = ("tls_server_config (TLS on or off: the listener's scheme)",)
        elif old_tls is not None and new_tls is not None:
            # The listener's context decides these before the SNI callback can swap it.
            fixed = old_tls.unswappable_changes(new_tls)
        else:
            fixed = ()
        if fixed:
            raise WebConfigError(
                f"web config file {new.config.path}: a change of {', '.join(fixed)} applies only at "
                "start-up; restart the exporter to apply it"
            )
        self.config, self.stamp, self.auth, self.context = new.config, new.stamp, new.auth, new.context

    def server_context(self) -> ssl.SSLContext | None:
        """The context to listen with (None: plain HTTP)."""
        if self.context is None:
            return None
        base = self.context

        def swap(sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
            if self.context is not None and self.context is not base:
                sslobj.context = self.context

        base.sni_callback = swap
        return base


WEB = web.AppKey("web", WebState)


def _unauthorized() -> web.Response:
    return web.Response(
        status=401,
        text="401 Unauthorized\n",
        headers={"WWW-Authenticate": 'Basic realm="podnet"'},
    )


HANDLERS = {"/metrics": "metrics", "/healthz": "healthz", "/readyz": "readyz", "/": "index"}
"""Paths by handler label; any other path counts as "other" (the label stays bounded)."""


@web.middleware
async def count(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Outermost: every answer is counted, refusals (401, 403, 429) and 404/405 included."""
    responses = request.app[SNAPSHOTS].responses
    name = HANDLERS.get(request.path, "other")
    try:
        response = await handler(request)
    except web.HTTPException as e:
        responses[name, str(e.status)] += 1
        raise
    responses[name, str(response.status)] += 1
    return response


async def _configured_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response as its headers go out (401, 404 and 405 included, and /metrics,
    which sends its own body)."""
    state = request.app.get(WEB)
    if state is not None:
        response.headers.update(state.config.headers)


@web.middleware
async def guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Allowed client certificate names, then basic auth, per the web config in force."""
    state = request.app.get(WEB)
    if state is None:
        return await handler(request)
    config = state.config
    if config.tls is not None and config.tls.client_allowed_sans:
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        if not config.client_allowed(peercert):
            return web.Response(status=403, text="403 Forbidden: client certificate name not allowed\n")
    auth = state.auth
    if auth is not None and request.path not in UNGUARDED:
        header = request.headers.get("Authorization")
        verdict = auth.cached(header)
        if verdict is None:
            if state.auth_waiting >= AUTH_WAITING_MAX:
                return web.Response(status=429, text="429 Too Many Requests\n", headers={"Retry-After": "1"})
            state.auth_waiting += 1
            try:
                verdict = await asyncio.to_thread(auth.check, header)
            finally:
                state.auth_waiting -= 1
        if not verdict:
            return _unauthorized()
    return await handler(request)


_INDEX = f"""<html><head><title>podnet exporter</title></head><body>
<h1>podnet exporter {__version__}</h1>
<p><a href="/metrics">/metrics</a> &middot; <a href="/healthz">/healthz</a> &middot;
<a href="/readyz">/readyz</a></p></body></html>"""


def _accepted(header: str, token: str, rivals: tuple[str, ...] = ()) -> bool:
    """Whether `token` is listed in an Accept-style header with a q-value above 0 and not
    below that of the first of `rivals` listed (most specific first, as "text/plain",
    "text/*", "*/*"). A q-value that is not a number, below 0 or NaN counts as 0, one above 1
    as 1; of a name listed twice the higher counts."""
    best: dict[str, float] = {}
    for part in header.split(","):
        name, *params = (p.strip() for p in part.split(";"))
        name = name.lower()
        if name != token and name not in rivals:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        best[name] = max(best.get(name, 0.0), min(q, 1.0) if q > 0 else 0.0)
    mine = best.get(token, 0.0)
    return mine > 0 and mine >= next((best[r] for r in rivals if r in best), 0.0)


def _accepts_openmetrics(accept: str) -> bool:
    # Prometheus lists the formats of its scrape_protocols in order of preference, by q-value:
    # text preferred over OpenMetrics ("text/plain;version=0.0.4;q=0.5,application/openmetrics-text;
    # version=1.0.0;q=0.4,*/*;q=0.3") gets text. OpenMetrics only when listed by name.
    return _accepted(accept, "application/openmetrics-text", ("text/plain", "text/*", "*/*"))


def _accepts_gzip(accept_encoding: str) -> bool:
    return _accepted(accept_encoding, "gzip")


async def _plain(rendered: Rendered, attr: str) -> bytes:
    """A plain body is decompressed on its first request (110 MB at 5,000 pods): off the
    event loop, so /healthz and gzip scrapes are not held up meanwhile."""
    body: bytes = await asyncio.to_thread(getattr, rendered, attr)
    return body


async def metrics(request: web.Request) -> web.StreamResponse:
    store = request.app[SNAPSHOTS]
    limit = request.app.get(MAX_REQUESTS, 0)
    if limit and store.in_flight >= limit:
        return web.Response(
            status=503,
            text=f"503 Service Unavailable: {limit} scrapes in flight (--web.max-requests)\n",
            headers={"Retry-After": "1"},
        )
    store.in_flight += 1
    try:
        # Sent before the count drops: a slow reader holds its place until it has the body,
        # but no longer than SEND_TIMEOUT, or readers that never read would hold every place.
        async with asyncio.timeout(SEND_TIMEOUT):
            response = await _metrics_response(request, store.current)
            await response.prepare(request)
            await response.write_eof()
        return response
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise web.HTTPRequestTimeout() from None
    finally:
        store.in_flight -= 1


async def _metrics_response(request: web.Request, rendered: Rendered) -> web.Response:
    # Repeated header fields are one comma-separated list (RFC 9110, 5.3).
    om = _accepts_openmetrics(",".join(request.headers.getall("Accept", ())))
    gz = _accepts_gzip(",".join(request.headers.getall("Accept-Encoding", ())))
    if om:
        body = rendered.openmetrics_gzip if gz else await _plain(rendered, "openmetrics")
        ctype = OPENMETRICS_CONTENT_TYPE
    else:
        body = rendered.text_gzip if gz else await _plain(rendered, "text")
        ctype = TEXT_CONTENT_TYPE
    headers = {"Content-Type": ctype, "Vary": "Accept, Accept-Encoding"}
    if gz:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    why = request.app[SNAPSHOTS].not_ready(asyncio.get_running_loop().time())
    if not why:
        return web.Response(text="ready\n")
    return web.Response(status=503, text=f"not ready: {why}\n")


async def index(request: web.Request) -> web.Response:
    return web.Response(text=_INDEX, content_type="text/html")


def add_routes(app: web.Application) -> None:
    app.middlewares.append(count)
    app.middlewares.append(guard)
    app.on_response_prepare.append(_configured_headers)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", index)
