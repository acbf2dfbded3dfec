"""Tests for the web config guard of exporter.export.http_app: basic auth on /metrics and /
(not on the probes), the configured response headers on every answer (401 and 404 too), the
bound on requests waiting for bcrypt, and which reloads WebState accepts while running."""

from __future__ import annotations

import asyncio
import base64
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from exporter.export import http_app
from exporter.export.http_app import SNAPSHOTS, WEB, SnapshotStore, WebState, add_routes
from exporter.export.prometheus import Exposition
from exporter.export.web_config import BasicAuth, WebConfigError
from exporter.metrics import model as m

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from certs import make_ca, make_leaf  # lives in tests/, shared with the kernel tests

PASSWORD = "guard-Secr3t"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
HEADERS = {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def state_for(tmp: Path, config: dict[str, object]) -> WebState:
    path = tmp / "web-config.yml"
    path.write_text(yaml.safe_dump(config))
    return WebState.read(str(path))


def serve(state: WebState, scenario: Callable[[TestClient], Awaitable[None]]) -> None:
    async def main() -> None:
        exposition = Exposition(m.BucketLayout(0))
        store = SnapshotStore(exposition)
        store.ready.set()
        app = web.Application()
        app[SNAPSHOTS] = store
        app[WEB] = state
        add_routes(app)
        async with TestClient(TestServer(app)) as client:
            await scenario(client)

    asyncio.run(main())


def test_basic_auth_guards_metrics_not_probes(tmp_path: Path) -> None:
    state = state_for(
        tmp_path, {"basic_auth_users": {"prom": HASH}, "http_server_config": {"headers": HEADERS}}
    )

    async def scenario(client: TestClient) -> None:
        for headers in ({}, basic("prom", "wrong"), basic("nobody", PASSWORD), {"Authorization": "Bearer x"}):
            for path in ("/metrics", "/"):
                resp = await client.get(path, headers=headers)
                assert resp.status == 401, (path, headers)
                assert resp.headers["WWW-Authenticate"] == 'Basic realm="podnet"'
                assert resp.headers["X-Frame-Options"] == "deny"
        ok = await client.get("/metrics", headers=basic("prom", PASSWORD))
        assert ok.status == 200
        assert ok.headers["X-Content-Type-Options"] == "nosniff"
        for probe in ("/healthz", "/readyz"):
            resp = await client.get(probe)
            assert resp.status == 200, probe
            assert resp.headers["X-Frame-Options"] == "deny"
        missing = await client.get("/nothing-here", headers=basic("prom", PASSWORD))
        assert missing.status == 404
        assert missing.headers["X-Frame-Options"] == "deny", "the configured headers go on errors too"
        wrong_method = await client.post("/metrics", headers=basic("prom", PASSWORD))
        assert wrong_method.status == 405
        assert wrong_method.headers["X-Frame-Options"] == "deny"
        # Every answer is counted by handler and code, refusals included.
        responses = client.server.app[SNAPSHOTS].responses
        assert responses == {
            ("metrics", "401"): 4,
            ("index", "401"): 4,
            ("metrics", "200"): 1,
            ("healthz", "200"): 1,
            ("readyz", "200"): 1,
            ("other", "404"): 1,
            ("metrics", "405"): 1,
        }

    serve(state, scenario)


def test_requests_waiting_for_bcrypt_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = state_for(tmp_path, {"basic_auth_users": {"prom": HASH}})
    release = threading.Event()
    entered = threading.Semaphore(0)
    assert state.auth is not None
    real_check = state.auth.check

    def slow_check(authorization: str | None) -> bool:
        entered.release()
        release.wait(30)
        return real_check(authorization)

    monkeypatch.setattr(state.auth, "check", slow_check)
    monkeypatch.setattr(http_app, "AUTH_WAITING_MAX", 2)

    async def scenario(client: TestClient) -> None:
        # Distinct credentials, so none is answered from the cache.
        waiting = [
            asyncio.create_task(client.get("/metrics", headers=basic("prom", f"guess{i}"))) for i in range(2)
        ]
        for _ in range(2):
            await asyncio.to_thread(entered.acquire, True, 30)
        over = await client.get("/metrics", headers=basic("prom", "guess-3"))
        assert over.status == 429
        assert over.headers["Retry-After"] == "1"
        assert client.server.app[SNAPSHOTS].responses["metrics", "429"] == 1
        release.set()
        assert [r.status for r in await asyncio.gather(*waiting)] == [401, 401]
        assert state.auth_waiting == 0
        assert (await client.get("/metrics", headers=basic("prom", PASSWORD))).status == 200

    serve(state, scenario)


def test_reload_rules(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "ca")
    server = make_leaf(tmp_path, "server", ca, ["IP:127.0.0.1"])
    renewed = make_leaf(tmp_path, "renewed", ca, ["IP:127.0.0.1"])
    tls = {"cert_file": str(server.cert), "key_file": str(server.key)}
    running = state_for(tmp_path, {"tls_server_config": tls})
    listener = running.server_context()
    assert listener is not None and listener.sni_callback is not None

    # A renewed certificate and new users are taken.
    new = state_for(
        tmp_path,
        {
            "tls_server_config": {"cert_file": str(renewed.cert), "key_file": str(renewed.key)},
            "basic_auth_users": {"prom": HASH},
        },
    )
    running.replace(new)
    assert running.context is new.context and isinstance(running.auth, BasicAuth)

    # What the listener fixed at start-up cannot change while running: refused, nothing changes.
    for changed in (
        {},  # TLS off
        {"tls_server_config": {**tls, "min_version": "TLS13"}},
        {
            "tls_server_config": {
                **tls,
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": str(ca.cert),
            }
        },
    ):
        refused = state_for(tmp_path, changed)
        with pytest.raises(WebConfigError, match="restart the exporter"):
            running.replace(refused)
        assert running.context is new.context


def test_scrapes_in_flight_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A scrape holds its place until its body is sent; the one beyond the limit gets 503.
    release = asyncio.Event()
    entered = asyncio.Event()
    real = http_app._metrics_response

    async def slow(request: web.Request, rendered: object) -> web.Response:
        entered.set()
        await release.wait()
        return await real(request, rendered)  # type: ignore[arg-type]

    monkeypatch.setattr(http_app, "_metrics_response", slow)

    async def main() -> None:
        exposition = Exposition(m.BucketLayout(0))
        store = SnapshotStore(exposition)
        app = web.Application()
        app[SNAPSHOTS] = store
        app[http_app.MAX_REQUESTS] = 1
        add_routes(app)
        async with TestClient(TestServer(app)) as client:
            first = asyncio.create_task(client.get("/metrics"))
            await asyncio.wait_for(entered.wait(), 30)
            over = await client.get("/metrics")
            assert over.status == 503
            assert over.headers["Retry-After"] == "1"
            assert (await client.get("/healthz")).status == 200, "probes are not scrapes"
            release.set()
            assert (await first).status == 200
            assert store.in_flight == 0
            assert (await client.get("/metrics")).status == 200
            assert store.responses["metrics", "503"] == 1
            assert store.responses["metrics", "200"] == 2

    asyncio.run(main())


def test_a_scrape_that_takes_too_long_gives_its_place_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # A reader that never reads must not keep a place under --web.max-requests for ever.
    stuck = asyncio.Event()

    async def never(request: web.Request, rendered: object) -> web.Response:
        await stuck.wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(http_app, "_metrics_response", never)
    monkeypatch.setattr(http_app, "SEND_TIMEOUT", 0.2)

    async def main() -> None:
        store = SnapshotStore(Exposition(m.BucketLayout(0)))
        app = web.Application()
        app[SNAPSHOTS] = store
        app[http_app.MAX_REQUESTS] = 1
        add_routes(app)
        async with TestClient(TestServer(app)) as client:
            with pytest.raises(aiohttp.ClientError):
                await (await client.get("/metrics", timeout=aiohttp.ClientTimeout(total=10))).read()
            assert store.in_flight == 0
            monkeypatch.undo()
            assert (await client.get("/metrics")).status == 200

    asyncio.run(main())
