"""HTTP endpoints: /metrics, /healthz, /readyz. Handlers only read the published snapshot."""

from __future__ import annotations

import asyncio

from aiohttp import web

from exporter import __version__
from exporter.export.prometheus import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, Exposition, Rendered
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

    def not_ready(self, now: float) -> str:
        """Why /readyz should fail at loop time `now`, "" when ready."""
        if not self.ready.is_set():
            return "first poll has not completed"
        if self.stale_after is not None and now - self.last_success > self.stale_after:
            return f"the last successful poll was {now - self.last_success:.0f} s ago"
        return ""


SNAPSHOTS = web.AppKey("snapshots", SnapshotStore)

_INDEX = f"""<html><head><title>podnet exporter</title></head><body>
<h1>podnet exporter {__version__}</h1>
<p><a href="/metrics">/metrics</a> &middot; <a href="/healthz">/healthz</a> &middot;
<a href="/readyz">/readyz</a></p></body></html>"""


def _accepted(header: str, token: str) -> bool:
    """Whether `token` is listed in an Accept-style header with a q-value above 0."""
    for part in header.split(","):
        name, *params = (p.strip() for p in part.split(";"))
        if name.lower() != token:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


def _accepts_openmetrics(accept: str) -> bool:
    return _accepted(accept, "application/openmetrics-text")


def _accepts_gzip(accept_encoding: str) -> bool:
    return _accepted(accept_encoding, "gzip")


async def _plain(rendered: Rendered, attr: str) -> bytes:
    """A plain body is decompressed on its first request (110 MB at 5,000 pods): off the
    event loop, so /healthz and gzip scrapes are not held up meanwhile."""
    body: bytes = await asyncio.to_thread(getattr, rendered, attr)
    return body


async def metrics(request: web.Request) -> web.Response:
    rendered = request.app[SNAPSHOTS].current
    om = _accepts_openmetrics(request.headers.get("Accept", ""))
    gz = _accepts_gzip(request.headers.get("Accept-Encoding", ""))
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
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", index)
