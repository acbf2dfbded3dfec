"""Tests for exporter.pods.kube: the Kubernetes API pod source, against the protocol-faithful fake API server
in tests/fake_kube_api.py (127.0.0.1 only). No assertion depends on wall-clock time: tests wait for
conditions with bounded timeouts."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import random
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from exporter.app import config as config_module
from exporter.app.config import ConfigError, parse_args, resolve
from exporter.app.poller import FileSourceHealth
from exporter.metrics import model as m
from exporter.metrics.raw import RawData
from exporter.metrics.snapshot import ExporterState, build_snapshot
from exporter.pods.kube import Backoff, KubeConfig, KubeWatcher, Timing, parse_pod_list_response
from exporter.pods.metadata import MetadataSourceState, PodStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_kube_api import FakeKubeApi, eventually, make_pod  # lives in tests/, shared with the kernel tests

NODE = "node-a"
TOKEN = "test-token"
FAST = Timing(
    backoff_initial=0.02,
    backoff_max=0.2,
    connect_timeout=2.0,
    list_timeout=5.0,
    watch_seconds=(60, 60),
    idle_slack=5.0,
    min_healthy_watch=0.2,
)

P = ParamSpec("P")


def async_test(fn: Callable[P, Awaitable[None]]) -> Callable[P, None]:
    """Run an async test on a fresh event loop (pytest-asyncio is not a dependency)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))  # type: ignore[arg-type]

    return run


@pytest.fixture
def api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def watcher(api: FakeKubeApi, token_file: Path, timing: Timing = FAST) -> KubeWatcher:
    config = KubeConfig(api.url, str(token_file), None, False, False)
    return KubeWatcher(config, NODE, PodStore(), timing, random.Random(7))


@asynccontextmanager
async def running(w: KubeWatcher) -> AsyncIterator[KubeWatcher]:
    task = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def uid(pod: dict[str, Any]) -> str:
    value = pod["metadata"]["uid"]
    assert isinstance(value, str)
    return value


def names(w: KubeWatcher) -> set[str]:
    return {p.name for p in w.store.pods()}


async def synced(w: KubeWatcher, api: FakeKubeApi) -> None:
    """Wait until the watcher has listed and its watch is open."""
    await eventually(lambda: w.up and api.open_watches == 1, "list done and watch open")


def kube_errors(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "exporter.pods.kube" and r.levelno == level]


# ---- list and watch ------------------------------------------------------------------------------------


@async_test
async def test_initial_list_fills_the_store_with_this_nodes_pods(api: FakeKubeApi, token_file: Path) -> None:
    web = make_pod("web-7c9f8d6b5-x2x9q", node=NODE, workload="web", ip="10.244.1.5")
    db = make_pod("db-0", node=NODE, workload="db", kind="StatefulSet", ip="10.244.1.6")
    api.add_pod(web)
    api.add_pod(db)
    api.add_pod(make_pod("elsewhere", node="node-b", ip="10.244.2.5"))
    list_rv = str(api.resource_version)
    async with running(watcher(api, token_file)) as w:
        await synced(w, api)
        assert names(w) == {"web-7c9f8d6b5-x2x9q", "db-0"}
        meta = w.store.by_uid(uid(web))
        assert meta is not None
        assert (meta.workload, meta.workload_kind) == ("web", "Deployment")
        assert w.store.by_ip("10.244.1.6") == w.store.by_uid(uid(db))
        state = w.state()
        assert (state.source, state.up, state.relists, state.errors) == ("kubernetes", True, 1, 0)
        assert state.last_sync > 0

    (listed,) = api.lists()
    assert listed.params["fieldSelector"] == f"spec.nodeName={NODE}"
    # The first list may be served from the API server's watch cache.
    assert listed.params["resourceVersion"] == "0"
    watch = api.watches()[0]
    assert watch.params["resourceVersion"] == list_rv
    assert watch.params["allowWatchBookmarks"] == "true"
    assert watch.params["fieldSelector"] == f"spec.nodeName={NODE}"
    assert int(watch.params["timeoutSeconds"]) == 60
    assert {r.authorization for r in api.requests} == {f"Bearer {TOKEN}"}


@async_test
async def test_added_modified_and_deleted_pods_reach_the_store(api: FakeKubeApi, token_file: Path) -> None:
    async with running(watcher(api, token_file)) as w:
        await synced(w, api)
        assert names(w) == set()
        web = make_pod("web-7c9f8d6b5-x2x9q", node=NODE, workload="web", ip="10.244.1.5")
        api.add_pod(web)
        await eventually(lambda: w.store.by_uid(uid(web)) is not None, "ADDED pod in the store")

        moved = copy.deepcopy(api.pod(uid(web)))
        moved["status"]["podIPs"] = [{"ip": "10.244.1.99"}]
        moved["status"]["containerStatuses"][0]["containerID"] = "containerd://" + "ab" * 32
        rv = api.modify_pod(moved)
        await eventually(lambda: w.resource_version == str(rv), "MODIFIED seen")
        meta = w.store.by_uid(uid(web))
        assert meta is not None and meta.pod_ips == ("10.244.1.99",)
        assert meta.container_name("ab" * 32) == "app"
        assert w.store.by_ip("10.244.1.5") is None

        # Other nodes' pods never reach this node's store.
        api.add_pod(make_pod("elsewhere", node="node-b"))
        rv = api.delete_pod(uid(web))
        await eventually(lambda: w.resource_version == str(rv), "DELETED seen")
        assert names(w) == set()
        assert len(api.lists()) == 1
        assert w.state().errors == 0


@async_test
async def test_a_pod_scheduled_onto_this_node_is_added(api: FakeKubeApi, token_file: Path) -> None:
    pending = make_pod("late", node="")
    api.add_pod(pending)
    async with running(watcher(api, token_file)) as w:
        await synced(w, api)
        bound = api.pod(uid(pending))
        bound["spec"]["nodeName"] = NODE
        api.modify_pod(bound)
        await eventually(lambda: names(w) == {"late"}, "pod bound to this node appears")


@async_test
async def test_bookmarks_advance_the_resource_version(api: FakeKubeApi, token_file: Path) -> None:
    async with running(watcher(api, token_file)) as w:
        await synced(w, api)
        before = w.state().last_sync
        # Changes to other objects move the cluster's resourceVersion with no pod event for us.
        rv = api.advance(5)
        api.bookmark()
        await eventually(lambda: w.resource_version == str(rv), "bookmark RV adopted")
        assert w.state().last_sync >= before
        # A new watch resumes from the bookmark, not from the list.
        api.drop_watches()
        await eventually(lambda: len(api.watches()) == 2, "re-watch")
        assert api.watches()[1].params["resourceVersion"] == str(rv)
        assert len(api.lists()) == 1


@async_test
async def test_a_watch_refused_with_400_relists(api: FakeKubeApi, token_file: Path) -> None:
    # A resourceVersion the server will not watch from (here: one it never issued) would be
    # retried for ever; like client-go, the watcher lists again instead.
    async with running(watcher(api, token_file)) as w:
        await synced(w, api)
        api.bookmark("not-a-version")
        await eventually(lambda: w.resource_version == "not-a-version", "odd bookmark RV adopted")
        api.drop_watches()
        await eventually(lambda: len(api.lists()) == 2, "relist after the 400")
        await eventually(lambda: w.resource_version is not None and w.resource_version.isdigit(), "listed RV")
        api.add_pod(make_pod("after", node=NODE))
        await eventually(lambda: names(w) == {"after"}, "watching again")
        assert [r.status for r in api.watches()].count(400) == 1


# ---- expiry, drops, outages ----------------------------------------------------------------------------


@pytest.mark.parametrize("expire", ["event", "http"])
@async_test
async def test_expired_resource_version_relists(expire: str, token_file: Path) -> None:
    with FakeKubeApi(token=TOKEN, expire=expire) as api:
        gone = make_pod("gone", node=NODE)
        api.add_pod(gone)
        async with running(watcher(api, token_file)) as w:
            await synced(w, api)
            assert names(w) == {"gone"}
            # Down long enough for the server to compact the history past our resourceVersion.
            api.go_down()
            api.delete_pod(uid(gone))
            api.add_pod(make_pod("new", node=NODE))
            api.compact()
            api.come_up()
            await eventually(lambda: names(w) == {"new"}, "relisted after 410")
            await eventually(lambda: api.open_watches == 1, "watching again")
            assert w.state().relists == 2
            assert w.state().up
        relist = api.lists()[1]
        # After a 410 only the current state will do: no resourceVersion (a quorum read).
        assert "resourceVersion" not in relist.params
        assert api.watches()[-1].params["resourceVersion"] == str(api.resource_version)


@async_test
async def test_error_event_410_on_an_open_watch_relists(api: FakeKubeApi, token_file: Path) -> None:
    async with running(watcher(api, token_file)) as w:
        await synced(w, api)
        api.error_event(410, "Expired", "too old resource version: 1 (2)")
        await eventually(lambda: w.state().relists == 2, "relist")
        assert w.state().errors == 0


@async_test
async def test_other_error_events_rewatch_from_the_same_version(api: FakeKubeApi, token_file: Path) -> None:
    async with running(watcher(api, token_file)) as w:
        await synced(w, api)
        rv = w.resource_version
        api.error_event(500, "InternalError", "etcd leader changed")
        await eventually(lambda: len(api.watches()) == 2 and api.open_watches == 1, "re-watch")
        assert api.watches()[1].params["resourceVersion"] == rv
        assert len(api.lists()) == 1
        assert w.state().errors == 1


@pytest.mark.parametrize("mid_line", [False, True], ids=["between-events", "mid-event"])
@async_test
async def test_dropped_watch_resumes_from_the_last_version_without_relist(
    mid_line: bool, api: FakeKubeApi, token_file: Path
) -> None:
    async with running(watcher(api, token_file)) as w:
        await synced(w, api)
        last = api.add_pod(make_pod("a", node=NODE))
        await eventually(lambda: w.resource_version == str(last), "event seen")
        assert api.drop_watches(mid_line=mid_line) == 1
        # A change while the watcher reconnects is replayed from the server's history.
        api.add_pod(make_pod("b", node=NODE))
        await eventually(lambda: names(w) == {"a", "b"}, "event after the drop")
        assert len(api.lists()) == 1
        assert api.watches()[1].params["resourceVersion"] == str(last)
        assert w.state().up


@async_test
async def test_watch_timeout_rewatches_without_error(api: FakeKubeApi, token_file: Path) -> None:
    timing = Timing(backoff_initial=0.02, backoff_max=0.2, watch_seconds=(1, 1), min_healthy_watch=0.2)
    async with running(watcher(api, token_file, timing)) as w:
        await eventually(lambda: len(api.watches()) >= 3, "watches end at timeoutSeconds and resume")
        assert {r.params["resourceVersion"] for r in api.watches()} == {w.resource_version}
        assert w.state().errors == 0
        assert len(api.lists()) == 1


@async_test
async def test_outage_keeps_the_store_and_recovers(
    api: FakeKubeApi, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter.pods.kube")
    api.add_pod(make_pod("steady", node=NODE))
    async with running(watcher(api, token_file)) as w:
        await synced(w, api)
        api.go_down()
        await eventually(lambda: not w.state().up and w.state().errors >= 3, "source down, retrying")
        frozen = w.state().last_sync
        # Last-known metadata stays while the API is away.
        assert names(w) == {"steady"}
        assert w.state().last_sync == frozen
        added = api.add_pod(make_pod("meanwhile", node=NODE))
        api.come_up()
        await eventually(lambda: names(w) == {"steady", "meanwhile"}, "caught up after the outage")
        await eventually(lambda: w.state().up, "source up again")
        assert w.state().last_sync > frozen
        assert w.resource_version == str(added)
        assert len(api.lists()) == 1, "the history still held our version: no relist"
    errors = kube_errors(caplog)
    assert len(errors) == 1, errors  # one line per outage, not one per retry
    assert "cannot connect (Connection refused)" in errors[0]
    assert any("in sync again" in r.getMessage() for r in caplog.records)


@async_test
async def test_first_list_failure_logs_one_clear_line_and_keeps_retrying(
    api: FakeKubeApi, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api.add_pod(make_pod("p", node=NODE))
    api.go_down()
    async with running(watcher(api, token_file)) as w:
        await eventually(lambda: w.state().errors >= 3, "retries")
        assert not w.state().up and w.state().last_sync == 0
        api.come_up()
        await eventually(lambda: names(w) == {"p"}, "listed once the API is back")
    (line,) = kube_errors(caplog)
    assert line.splitlines() == [line]
    assert api.url in line


@async_test
async def test_wrong_token_is_one_clear_error_line(
    api: FakeKubeApi, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file.write_text("not-the-token\n")
    async with running(watcher(api, token_file)) as w:
        await eventually(lambda: len(api.lists()) >= 3, "retries")
        assert {r.status for r in api.requests} == {401}
        assert not w.state().up and w.state().errors >= 3
        (line,) = kube_errors(caplog)
        assert line.splitlines() == [line]
        assert "HTTP 401" in line and str(token_file) in line and "--kube-token-file" in line
        # The token file is re-read for every request (rotated service-account tokens).
        token_file.write_text(TOKEN)
        await eventually(lambda: w.state().up, "recovers with the right token")


@async_test
async def test_forbidden_says_what_permission_is_missing(
    api: FakeKubeApi, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api.forbidden = True
    async with running(watcher(api, token_file)):
        await eventually(lambda: len(api.lists()) >= 2, "retries")
    (line,) = kube_errors(caplog)
    assert "HTTP 403 Forbidden" in line and 'cannot list resource "pods"' in line
    assert "get/list/watch on pods" in line


def test_fake_checks_token_and_field_selector(api: FakeKubeApi) -> None:
    def get(query: str, token: str = TOKEN) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            api.url + "/api/v1/pods?" + query, headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    api.add_pod(make_pod("here", node=NODE))
    api.add_pod(make_pod("there", node="node-b"))
    code, body = get("fieldSelector=spec.nodeName%3Dnode-a")
    assert code == 200 and body["kind"] == "PodList" and body["apiVersion"] == "v1"
    assert [p["metadata"]["name"] for p in body["items"]] == ["here"]
    assert body["metadata"]["resourceVersion"] == str(api.resource_version)
    assert get("fieldSelector=metadata.name%3Dx")[0] == 400
    code, body = get("", token="wrong")
    assert (code, body["kind"], body["code"]) == (401, "Status", 401)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@async_test
async def test_https_with_the_configured_ca_or_insecure(
    certificate: tuple[Path, Path], token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    with FakeKubeApi(token=TOKEN, ssl_context=server_ctx) as api:
        api.add_pod(make_pod("tls", node=NODE))
        assert api.url.startswith("https://")
        for ca, insecure in ((str(cert), False), (None, True)):
            config = KubeConfig(api.url, str(token_file), ca, insecure, False)
            async with running(KubeWatcher(config, NODE, PodStore(), FAST)) as w:
                await eventually(lambda w=w: names(w) == {"tls"}, f"listed over TLS (ca={ca})")
        # Without the CA the server's certificate is not trusted: one clear line, no data.
        config = KubeConfig(api.url, str(token_file), None, False, False)
        async with running(KubeWatcher(config, NODE, PodStore(), FAST)) as w:
            await eventually(lambda: w.state().errors >= 2, "TLS failures")
            assert names(w) == set() and not w.state().up
    (line,) = kube_errors(caplog)
    assert "cannot connect (TLS:" in line and "certificate verify failed" in line


# ---- malformed objects ------------------------------------------------------------------------------


def broken(pod: dict[str, Any]) -> dict[str, Any]:
    bad = copy.deepcopy(pod)
    bad["status"]["podIPs"] = [{"ip": "not-an-ip"}]
    return bad


@async_test
async def test_malformed_pods_are_skipped_counted_and_logged_once(
    api: FakeKubeApi, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = make_pod("good", node=NODE, ip="10.244.1.5")
    api.add_pod(good)
    api.add_pod(broken(make_pod("bad-from-the-start", node=NODE)))
    async with running(watcher(api, token_file)) as w:
        await synced(w, api)
        assert names(w) == {"good"}
        assert (w.malformed, w.state().errors) == (1, 1)

        # A malformed new version keeps the last good one; the same problem twice is logged once.
        api.modify_pod(broken(api.pod(uid(good))))
        rv = api.modify_pod(broken(api.pod(uid(good))))
        await eventually(lambda: w.resource_version == str(rv), "malformed events consumed")
        meta = w.store.by_uid(uid(good))
        assert meta is not None and meta.pod_ips == ("10.244.1.5",)
        assert w.malformed == 3 and w.state().errors == 3

        fixed = api.pod(uid(good))
        fixed["status"]["podIPs"] = [{"ip": "10.244.1.8"}]
        rv = api.modify_pod(fixed)
        await eventually(lambda: w.resource_version == str(rv), "good event after bad ones")
        meta = w.store.by_uid(uid(good))
        assert meta is not None and meta.pod_ips == ("10.244.1.8",)
        # Skipping objects never costs the watch.
        assert len(api.watches()) == 1 and len(api.lists()) == 1
        assert w.state().up
    warnings = kube_errors(caplog, logging.WARNING)
    assert len(warnings) == 2, warnings
    assert "bad-from-the-start" in warnings[0] and "status.podIPs[0].ip" in warnings[0]
    assert "pod shop/good" in warnings[1]


@async_test
async def test_events_larger_than_aiohttps_line_limit(api: FakeKubeApi, token_file: Path) -> None:
    async with running(watcher(api, token_file)) as w:
        await synced(w, api)
        big = make_pod("annotated", node=NODE)
        big["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "x" * 700_000}
        api.add_pod(big)
        await eventually(lambda: names(w) == {"annotated"}, "700 kB event")
        assert w.state().errors == 0


def test_parse_pod_list_response() -> None:
    good = make_pod("good", node=NODE)
    body = {
        "apiVersion": "v1",
        "kind": "PodList",
        "metadata": {"resourceVersion": "42"},
        "items": [good, {"metadata": {"uid": "u1", "name": "x"}}, good],
    }
    pods, problems, rv = parse_pod_list_response(json.dumps(body).encode())
    assert rv == "42" and list(pods) == [uid(good)]
    assert [u for u, _ in problems] == ["u1", None]
    assert "metadata.namespace missing" in problems[0][1]
    assert "listed twice" in problems[1][1]
    empty = {"kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": None}
    assert parse_pod_list_response(json.dumps(empty).encode()) == ({}, [], "7")


# ---- pieces -------------------------------------------------------------------------------------------


def test_backoff_is_exponential_jittered_and_bounded() -> None:
    b = Backoff(0.5, 30.0, random.Random(1))
    delays = [b.next_delay() for _ in range(200)]
    for n, d in enumerate(delays):
        cap = min(30.0, 0.5 * 2**n)
        assert cap / 2 <= d <= cap
    assert max(delays) <= 30.0
    assert len(set(delays)) == len(delays), "jittered"
    b.reset()
    assert b.next_delay() <= 0.5


def test_metadata_self_metrics() -> None:
    state = ExporterState(
        metadata=(
            MetadataSourceState("kubernetes", False, 1700000000.5, 3, 7),
            MetadataSourceState("file", True, 1700000001.0, 1, 0),
        )
    )
    snap = build_snapshot(RawData(), {}, state, 1700000002.0)

    def values(spec: m.MetricSpec) -> dict[tuple[str, ...], float]:
        return {s.labels: s.value for s in snap.samples[spec.name]}

    assert values(m.METADATA_UP) == {("kubernetes",): 0, ("file",): 1}
    assert values(m.METADATA_LAST_SYNC) == {("kubernetes",): 1700000000.5, ("file",): 1700000001.0}
    assert values(m.METADATA_RELISTS) == {("kubernetes",): 3, ("file",): 1}
    assert values(m.METADATA_ERRORS) == {("kubernetes",): 7, ("file",): 0}
    assert m.METADATA_UP.exposed_name == "podnet_exporter_metadata_source_up"
    assert m.METADATA_RELISTS.exposed_name == "podnet_exporter_metadata_relists_total"
    assert m.METADATA_ERRORS.exposed_name == "podnet_exporter_metadata_errors_total"


def test_file_source_health() -> None:
    h = FileSourceHealth()
    assert h.state().up and h.state().relists == 1
    h.refreshed(changed=False, failed=False, now=10.0)
    assert h.state() == MetadataSourceState("file", True, 10.0, 1, 0)
    h.refreshed(changed=False, failed=True, now=11.0)
    h.refreshed(changed=False, failed=False, now=12.0)  # still the bad file: stays down
    assert h.state() == MetadataSourceState("file", False, 10.0, 1, 1)
    h.refreshed(changed=True, failed=False, now=13.0)
    assert h.state() == MetadataSourceState("file", True, 13.0, 2, 1)


# ---- configuration ------------------------------------------------------------------------------------


def run_config(*argv: str, env: dict[str, str] | None = None) -> config_module.Config:
    _, namespace = parse_args(["run", *argv])
    return resolve(namespace, env or {})


def config_error(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        run_config(*argv, env=env)
    message = str(info.value)
    assert message.splitlines() == [message]
    return message


@pytest.fixture
def service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(config_module, "SERVICE_ACCOUNT_DIR", str(sa))
    return sa


IN_POD = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def test_kube_api_flags(tmp_path: Path, token_file: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    args = ("--kube-api", "https://api.example:6443/", "--kube-token-file", str(token_file))
    config = run_config(*args, "--kube-ca-file", str(ca), "--kube-insecure-skip-tls-verify")
    assert config.kube == KubeConfig("https://api.example:6443", str(token_file), str(ca), True, False)
    assert run_config(env={"PODNET_KUBE_API": "http://127.0.0.1:8001"}).kube == KubeConfig(
        "http://127.0.0.1:8001", None, None, False, False
    )
    assert run_config().kube is None
    upper = run_config("--kube-api", "HTTPS://api.example:6443").kube
    assert upper is not None and upper.url == "https://api.example:6443"


def test_kube_settings_in_the_config_file(tmp_path: Path, token_file: Path) -> None:
    path = tmp_path / "podnet.yaml"
    path.write_text(
        "kube_api: https://10.0.0.1:6443\n"
        f"kube_token_file: {token_file}\n"
        "kube_insecure_skip_tls_verify: true\n"
    )
    kube = run_config("--config", str(path)).kube
    assert kube == KubeConfig("https://10.0.0.1:6443", str(token_file), None, True, False)


def test_in_a_pod_the_clusters_api_is_used(service_account: Path) -> None:
    kube = run_config(env=IN_POD).kube
    assert kube == KubeConfig(
        "https://10.96.0.1:443", str(service_account / "token"), str(service_account / "ca.crt"), False, True
    )
    v6 = run_config(env={"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}).kube
    assert v6 is not None and v6.url == "https://[fd00::1]:443"
    # An explicit URL still takes the mounted credentials.
    explicit = run_config("--kube-api", "https://other:443", env=IN_POD).kube
    assert explicit is not None and explicit.token_file == str(service_account / "token")
    assert not explicit.in_cluster


def test_in_a_pod_a_pods_file_wins(service_account: Path, tmp_path: Path) -> None:
    pods = tmp_path / "pods.json"
    pods.write_text('{"kind": "List", "items": []}')
    assert run_config("--pods-file", str(pods), env=IN_POD).kube is None


def test_pods_file_and_kube_api_are_alternatives(tmp_path: Path) -> None:
    pods = tmp_path / "pods.json"
    pods.write_text('{"kind": "List", "items": []}')
    message = config_error("--pods-file", str(pods), "--kube-api", "http://127.0.0.1:8001")
    assert message == "--pods-file and --kube-api are alternative pod metadata sources; set only one"
    message = config_error("--pods-file", str(pods), env={"PODNET_KUBE_API": "http://127.0.0.1:8001"})
    assert "PODNET_KUBE_API" in message and "--pods-file" in message
    message = config_error("--pods-file", str(pods), env={"PODNET_KUBE_TOKEN_FILE": str(pods)})
    assert message == "PODNET_KUBE_TOKEN_FILE is set but the Kubernetes API is not used (--pods-file is set)"


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (
            ("--kube-api", "127.0.0.1:8001"),
            "--kube-api '127.0.0.1:8001': must be a URL with scheme http or https",
        ),
        (("--kube-api", "ftp://x"), "scheme http or https"),
        (("--kube-api", "https://bad host"), "spaces"),
        (("--kube-api", "https://a:443/?x=1"), "query"),
        (("--kube-api", "http://x", "--kube-token-file", "/nonexistent/token"), "no such file"),
        (
            ("--kube-token-file", "/etc/hostname"),
            "--kube-token-file is set but the Kubernetes API is not used",
        ),
        (("--kube-insecure-skip-tls-verify",), "not used (no --kube-api and not in a pod)"),
        (("--kube-ca-file", "/etc/hostname"), "--kube-ca-file is set but"),
    ],
)
def test_bad_kube_settings(argv: tuple[str, ...], problem: str) -> None:
    assert problem in config_error(*argv)
