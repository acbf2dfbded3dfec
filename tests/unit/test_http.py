"""Tests for exporter.export.http_app: /metrics content negotiation, /healthz, /readyz."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.export.http_app import SNAPSHOTS, SnapshotStore, add_routes
from exporter.export.prometheus import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, Exposition
from exporter.metrics import model as m

WEB = ("shop", "web-7c9f8d6b5-x2x4q", "nginx", "web", "Deployment")

Scenario = Callable[[TestClient, SnapshotStore, Exposition], Awaitable[None]]


def snapshot() -> m.Snapshot:
    return m.Snapshot.build(
        1.0,
        {m.TCP_SENT.name: (m.Sample(WEB, 1234.0),), m.POLLS.name: (m.Sample((), 3.0),)},
        {m.TCP_RTT.name: (m.HistSample(WEB, ((100, 2),), 2, 0.01),)},
    )


def run(scenario: Scenario, *, publish: bool = True) -> None:
    """Serve the app on 127.0.0.1 with a fresh SnapshotStore and run `scenario` against it.
    The client never decompresses on its own, so Content-Encoding can be checked."""

    async def main() -> None:
        exposition = Exposition(m.BucketLayout(0))
        store = SnapshotStore(exposition)  # needs the running loop (asyncio.Event)
        if publish:
            store.current = exposition.render(snapshot())
        app = web.Application()
        app[SNAPSHOTS] = store
        add_routes(app)
        async with TestClient(TestServer(app), auto_decompress=False) as client:
            await scenario(client, store, exposition)

    asyncio.run(main())


PLAIN = {"Accept-Encoding": "identity"}


def test_metrics_text_by_default() -> None:
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        resp = await client.get("/metrics", headers=PLAIN)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == TEXT_CONTENT_TYPE
        assert "Content-Encoding" not in resp.headers
        body = await resp.read()
        assert body == store.current.text
        fams = {f.name: f for f in parse_text(body.decode())}
        (s,) = fams[m.TCP_SENT.name].samples
        assert s.name == "podnet_tcp_sent_bytes_total"
        assert s.value == 1234.0

    run(scenario)


@pytest.mark.parametrize(
    "accept",
    [
        "text/plain",
        "*/*",
        "text/plain;version=0.0.4;q=1,*/*;q=0.1",
        "application/json",
    ],
)
def test_metrics_text_for_other_accepts(accept: str) -> None:
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        resp = await client.get("/metrics", headers={**PLAIN, "Accept": accept})
        assert resp.headers["Content-Type"] == TEXT_CONTENT_TYPE
        assert await resp.read() == store.current.text

    run(scenario)


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text",
        "application/openmetrics-text; version=1.0.0",
        # What Prometheus sends.
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
        "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ],
)
def test_metrics_openmetrics_when_asked(accept: str) -> None:
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        resp = await client.get("/metrics", headers={**PLAIN, "Accept": accept})
        assert resp.status == 200
        assert resp.headers["Content-Type"] == OPENMETRICS_CONTENT_TYPE
        body = await resp.read()
        assert body == store.current.openmetrics
        assert body.endswith(b"# EOF\n")
        fams = {f.name: f for f in parse_openmetrics(body.decode())}
        assert fams[m.TCP_RTT.name].type == "histogram"

    run(scenario)


@pytest.mark.parametrize(
    ("accept_encoding", "gz"),
    [
        ("gzip", True),
        ("GZIP", True),
        ("gzip, deflate, br", True),
        ("deflate, gzip;q=0.5", True),
        ("br;q=1.0, gzip; q=0.8", True),
        ("identity", False),
        ("deflate, br", False),
        ("gzip;q=0", False),
        ("gzip; q=0", False),
        ("deflate, gzip;q=0", False),
        ("", False),
        ("x-gzip-ish", False),
    ],
)
@pytest.mark.parametrize("openmetrics", [False, True])
def test_metrics_gzip_negotiation(accept_encoding: str, gz: bool, openmetrics: bool) -> None:
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        headers = {"Accept-Encoding": accept_encoding}
        if openmetrics:
            headers["Accept"] = "application/openmetrics-text"
        resp = await client.get("/metrics", headers=headers)
        assert resp.status == 200
        body = await resp.read()
        plain = store.current.openmetrics if openmetrics else store.current.text
        if gz:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(body) == plain
        else:
            assert "Content-Encoding" not in resp.headers
            assert body == plain
        assert "Accept-Encoding" in resp.headers.get("Vary", "")
        assert "Accept" in resp.headers.get("Vary", "").replace("Accept-Encoding", "")

    run(scenario)


@pytest.mark.parametrize("accept_encoding", ["gzip;q=0.0", "gzip;q=0.000"])
def test_metrics_no_gzip_for_zero_qvalue_spelled_with_decimals(accept_encoding: str) -> None:
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        resp = await client.get("/metrics", headers={"Accept-Encoding": accept_encoding})
        assert "Content-Encoding" not in resp.headers
        assert await resp.read() == store.current.text

    run(scenario)


def test_metrics_serves_the_latest_published_snapshot() -> None:
    async def scenario(client: TestClient, store: SnapshotStore, exposition: Exposition) -> None:
        first = await (await client.get("/metrics", headers=PLAIN)).read()
        assert b"web-7c9f8d6b5-x2x4q" in first
        store.current = exposition.render(m.EMPTY_SNAPSHOT)
        second = await (await client.get("/metrics", headers=PLAIN)).read()
        assert b"web-7c9f8d6b5-x2x4q" not in second
        assert second == store.current.text

    run(scenario)


def test_metrics_before_first_poll_is_the_empty_rendering() -> None:
    async def scenario(client: TestClient, store: SnapshotStore, exposition: Exposition) -> None:
        resp = await client.get("/metrics", headers=PLAIN)
        assert resp.status == 200
        body = await resp.read()
        assert body == store.current.text
        assert store.current.snapshot is m.EMPTY_SNAPSHOT
        # No pod or exporter series yet; only the process self-metrics have values.
        fams = list(parse_text(body.decode()))
        assert all(not f.samples for f in fams if not f.name.startswith("process_"))
        assert any(f.samples for f in fams if f.name.startswith("process_"))

    run(scenario, publish=False)


def test_healthz() -> None:
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        resp = await client.get("/healthz")
        assert resp.status == 200
        assert (await resp.text()).strip() == "ok"
        # Alive even before the first poll.
        assert not store.ready.is_set()

    run(scenario, publish=False)


def test_readyz_before_and_after_first_poll() -> None:
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert "not ready" in await resp.text()
        store.ready.set()
        resp = await client.get("/readyz")
        assert resp.status == 200
        assert (await resp.text()).strip() == "ready"

    run(scenario, publish=False)


@pytest.mark.parametrize("path", ["/nope", "/metrics/", "/metricsx", "/healthz/extra", "/favicon.ico"])
def test_unknown_path_is_404(path: str) -> None:
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        resp = await client.get(path)
        assert resp.status == 404

    run(scenario)


def test_index_links_the_endpoints() -> None:
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        resp = await client.get("/")
        assert resp.status == 200
        assert resp.content_type == "text/html"
        html = await resp.text()
        for link in ("/metrics", "/healthz", "/readyz"):
            assert f'href="{link}"' in html

    run(scenario)


def test_post_is_not_allowed() -> None:
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        resp = await client.post("/metrics")
        assert resp.status == 405

    run(scenario)


def test_head_metrics() -> None:
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        resp = await client.head("/metrics", headers=PLAIN)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == TEXT_CONTENT_TYPE
        assert await resp.read() == b""

    run(scenario)


@pytest.mark.parametrize(
    ("ready", "last_success", "now", "stale_after", "why"),
    [
        (False, 0.0, 10.0, 15.0, "first poll has not completed"),
        (True, 100.0, 110.0, 15.0, ""),
        (True, 100.0, 115.0, 15.0, ""),
        (True, 100.0, 116.0, 15.0, "the last successful poll was 16 s ago"),
        (True, 100.0, 10_000.0, None, ""),
    ],
)
def test_readiness_follows_the_last_successful_poll(
    ready: bool, last_success: float, now: float, stale_after: float | None, why: str
) -> None:
    from exporter.export.http_app import SnapshotStore
    from exporter.export.prometheus import Exposition
    from exporter.metrics.model import BucketLayout

    store = SnapshotStore(Exposition(BucketLayout(0)), stale_after=stale_after)
    if ready:
        store.ready.set()
    store.last_success = last_success
    assert store.not_ready(now) == why


def test_repeated_accept_encoding_fields_are_one_list() -> None:
    # RFC 9110 5.3: "Accept-Encoding: identity" then "Accept-Encoding: gzip" means both.
    async def scenario(client: TestClient, store: SnapshotStore, _: Exposition) -> None:
        headers = [("Accept-Encoding", "identity"), ("Accept-Encoding", "gzip")]
        resp = await client.get("/metrics", headers=headers)
        assert resp.status == 200
        assert resp.headers.get("Content-Encoding") == "gzip"
        assert gzip.decompress(await resp.read()) == store.current.text

    run(scenario)
