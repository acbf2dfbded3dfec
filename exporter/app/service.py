"""Wiring: start-up checks, the aiohttp application's lifecycle, and the task group that
supervises the poller and the server until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web

from exporter.app.checkpoint import Checkpoint, SavedState, StateLock
from exporter.app.config import Config
from exporter.app.poller import Poller, PollerParts, settle_heap
from exporter.export.http_app import MAX_REQUESTS, SNAPSHOTS, WEB, SnapshotStore, WebState, add_routes
from exporter.export.prometheus import Exposition
from exporter.export.web_config import WebConfigError, files_stamp
from exporter.kernel.btf import Btf
from exporter.kernel.maps import MapReader
from exporter.kernel.offsets import Offsets, resolve_offsets
from exporter.kernel.pins import Pins
from exporter.kernel.programs import OPENSSL_PROBES, LoadedPrograms, MapSizes, load_programs, state_digest
from exporter.kernel.seeding import ConnectionSeed
from exporter.kernel.tls_libs import OpenSslProbes
from exporter.metrics.ledger import Ledger
from exporter.metrics.lifecycle import Retired
from exporter.metrics.model import BucketLayout
from exporter.metrics.peers import PeerResolver
from exporter.pods.cgroups import CgroupIndex, find_cgroup2_mount
from exporter.pods.identity import IdentityResolver
from exporter.pods.kube import KubeWatcher
from exporter.pods.metadata import PodsFileSource, PodStore

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
STATE_LOCK_WAIT = 120.0
"""Seconds a new exporter waits for the one still holding the state (a surge upgrade)."""
POLLER = web.AppKey("poller", Poller)
WEB_CONFIG_CHECK = 1.0
"""Seconds between checks of the web config file and its certificates for changes."""

T = TypeVar("T")


class ServeError(Exception):
    """Fatal at start-up; one line with the fix."""


async def in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """Run blocking `fn` in a daemon thread. Unlike asyncio.to_thread, a cancelled await
    leaves nothing for asyncio.run() to wait for at exit: a SIGTERM during start-up (BCC
    compiling for seconds, or waiting for the state lock) ends the process at once."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: object) -> None:
        if done.done():
            return
        if ok:
            done.set_result(value)  # type: ignore[arg-type]
        else:
            done.set_exception(value)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result: object = fn()
            ok = True
        except BaseException as e:  # handed to the awaiting task, which reports it
            result, ok = e, False
        with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
            loop.call_soon_threadsafe(deliver, ok, result)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await done


def build_parts(config: Config) -> PollerParts:
    """Blocking start-up: everything that must work before serving. Raises the modules'
    one-line errors (BtfError, CgroupError, PodsFileError, ProgramLoadError)."""
    store = PodStore()
    pods_file = None
    if config.pods_file:
        pods_file = PodsFileSource(config.pods_file, store)
        pods_file.load_initial()
    # The API source starts listing once serving: readiness never waits for the API.
    kube = KubeWatcher(config.kube, config.node_name, store) if config.kube is not None else None
    root = config.cgroup_root or find_cgroup2_mount()
    index = CgroupIndex(root, max_entries=config.map_entries)
    index.rescan()
    btf = Btf.load()
    offsets = resolve_offsets(btf)
    sizes = MapSizes(config.map_entries)
    pins, checkpoint, saved = open_state(config, offsets, sizes)
    seed = ConnectionSeed()
    seed_failures = 0
    programs = load_programs(
        btf,
        offsets,
        sizes,
        requests=config.requests,
        kernel_headers=config.kernel_headers,
        pins=pins,
        before_attach=seed.before_attach,
        tls=config.tls,
    )
    tls = _tls_probes(config, programs)
    if saved is None:
        saved = SavedState(Ledger(), Retired(max_identities=config.map_entries), time.time())
    if seed.ran:
        # tcp_state starts with no connection tracked: the ones that exist are counted anew.
        saved.ledger.seed_active(seed.settle())
        seed_failures = len(seed.errors)
    if programs.adopted:
        log.info(
            "continuing the counts of the programs left attached in %s: %s",
            pins.dir if pins is not None else "",
            ", ".join(sorted(programs.adopted)),
        )
    attached = sum(h.attached for h in programs.hooks)
    log.info(
        "attached %d of %d eBPF programs (%s); cgroup v2 at %s; %d pods known",
        attached,
        len(programs.hooks),
        "; ".join(f"{name}: {how}" for name, how in programs.builds.items()),
        root,
        len(store),
    )
    return PollerParts(
        programs=programs,
        reader=MapReader(programs),
        resolver=IdentityResolver(index, store, max_entries=config.map_entries),
        peers=PeerResolver(store),
        store=store,
        pods_file=pods_file,
        exposition=Exposition(BucketLayout(scale=config.histogram_scale)),
        max_series=config.max_series,
        kube=kube,
        checkpoint=checkpoint if pins is not None else None,
        saved=saved,
        startup_errors={"seed_connections": seed_failures} if seed_failures else {},
        tls=tls,
    )


def _tls_probes(config: Config, programs: LoadedPrograms) -> OpenSslProbes | None:
    if config.tls == "off":
        return None
    obj = programs.tls_object()
    if obj is None:
        # Loud: asked for, not there (the build that loaded has no TLS programs; why is in
        # the fallback warning above and in doctor).
        log.warning(
            "--tls openssl: no build with TLS recognition loaded (%s): requests inside TLS count as turns; "
            "see 'podnet-exporter doctor'",
            programs.builds.get("tcp_traffic", "tcp_traffic not loaded"),
        )
        return None
    probes = [(u.symbol, u.function, u.ret) for u in OPENSSL_PROBES]
    log.info("--tls openssl: probing OpenSSL (libssl.so.3, .so.1.1) in every process, rescanned every 5 s")
    tls = OpenSslProbes(obj, probes)
    if tls.swept:
        log.info("--tls openssl: removed %d uprobe definitions a killed exporter left in tracefs", tls.swept)
    return tls


def open_state(
    config: Config, offsets: Offsets, sizes: MapSizes
) -> tuple[Pins | None, Checkpoint | None, SavedState | None]:
    """The pinned state to continue from, if any. Raises PinError (one line) when pins
    are asked for and bpffs is not there."""
    if not config.pin_dir:
        log.warning("--pin-dir none: counters restart from zero whenever the exporter does")
        return None, None, None
    digest = state_digest(offsets, sizes, config.requests, config.tls)
    pins = Pins(config.pin_dir, digest)
    checkpoint = Checkpoint(config.state_dir, digest)
    # Held until the process exits (the kernel drops the lock with the fd).
    StateLock(config.state_dir).acquire(timeout=STATE_LOCK_WAIT)
    pins.prepare()
    for old in pins.discard_others():
        log.warning(
            "removed the pins of another podnet build at %s: its programs are detached, its counts end", old
        )
    if config.fresh and pins.discard():
        log.warning("--fresh: discarded the pinned maps and programs in %s", pins.dir)
    saved = None
    if pins.has_links() and not config.fresh:
        saved = checkpoint.load(pins.generation_map_ids(), config.map_entries)
        if saved is None:
            log.warning(
                "discarded the pinned maps and programs in %s: without their saved totals they cannot go on",
                pins.dir,
            )
    if saved is None:
        # Nothing to continue: no half-made pins may be reused either.
        pins.discard()
        checkpoint.remove()
        pins.prepare()
    return pins, checkpoint, saved


async def _kernel_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    parts = await in_daemon_thread(lambda: build_parts(config), "podnet-start")
    snapshots = SnapshotStore(parts.exposition, stale_after=config.ready_stale_polls * config.poll_interval)
    app[SNAPSHOTS] = snapshots
    poller = Poller(parts, snapshots, config.poll_interval)
    app[POLLER] = poller
    settle_heap()
    pusher = None
    if config.otlp is not None:
        # Imported only when used: the OpenTelemetry SDK and gRPC cost ~15 MiB.
        from exporter.export.otlp import OtlpPusher

        pusher = OtlpPusher(
            config.otlp,
            node_name=config.node_name,
            cluster_name=config.cluster_name,
            get_snapshot=lambda: snapshots.current.snapshot,
            histogram_scale=config.histogram_scale,
        )
        poller.otlp_stats = lambda: pusher.stats if pusher is not None else None
        pusher.start()
        log.info(
            "pushing OTLP (%s) to %s every %gs",
            config.otlp.protocol,
            config.otlp.shown_endpoint,
            config.otlp.interval,
        )
    try:
        yield
    finally:
        pins = parts.programs.pins
        # With pins the programs keep counting for the next start (an upgrade, a restart):
        # nothing counted in between is lost. Without, detach: nothing outlives the exporter.
        parts.programs.close(detach=pins is None)
        if pins is None:
            log.info("eBPF programs detached")
        else:
            log.info(
                "eBPF programs stay attached, pinned in %s, so the next start continues their counts; "
                "'podnet-exporter reset' detaches them",
                pins.dir,
            )
        if pusher is not None:
            # Last: the final push of the last snapshot may wait up to --otlp-timeout for a
            # slow collector, and nothing else should wait behind it.
            await asyncio.to_thread(pusher.shutdown)


def make_app(config: Config, web_state: WebState | None = None) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[MAX_REQUESTS] = config.web_max_requests
    if web_state is not None:
        app[WEB] = web_state
    app.cleanup_ctx.append(_kernel_ctx)
    add_routes(app)
    return app


@dataclass
class _Signals:
    """What the signal handlers saw. Installed before anything slow, so a SIGTERM during
    start-up (PID 1 in a container ignores signals it has no handler for) ends it."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reload: asyncio.Event = field(default_factory=asyncio.Event)
    name: str = ""
    starting: asyncio.Task[object] | None = None
    """The task to cancel on a stop signal while starting up."""


def _install_signals(loop: asyncio.AbstractEventLoop, signals: _Signals) -> None:
    def on_stop(name: str) -> None:
        signals.name = name
        signals.stop.set()
        if signals.starting is not None:
            signals.starting.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, signals.reload.set)


async def _watch_web(state: WebState, signals: _Signals, poller: Poller) -> None:
    """Re-read the web config when it or a file it names changes (a renewed certificate, a
    rotated Secret), or on SIGHUP. A bad new version is counted and logged; the last good
    one stays in force."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signals.reload.wait(), WEB_CONFIG_CHECK)
        hup = signals.reload.is_set()
        signals.reload.clear()
        try:
            stamp = await asyncio.to_thread(files_stamp, state.config.files())
            if stamp == state.stamp and not hup:
                continue
            new = await asyncio.to_thread(WebState.read, state.config.path)
            state.replace(new)
        except WebConfigError as e:
            poller.errors["web_config"] += 1
            log.error(
                '%s; keeping the web config in force (podnet_exporter_errors_total{stage="web_config"})', e
            )
            state.stamp = stamp  # logged once per change, not once a second
            continue
        log.info("web config %s reloaded%s", state.config.path, " (SIGHUP)" if hup else "")


async def serve(config: Config) -> bool:
    """Run until SIGTERM or SIGINT. Returns True when the signal came during start-up: the
    caller then exits at once, without waiting for a compile still running in its thread."""
    loop = asyncio.get_running_loop()
    signals = _Signals(starting=asyncio.current_task())
    _install_signals(loop, signals)
    try:
        web_state = (
            await asyncio.to_thread(WebState.read, config.web_config_file) if config.web_config_file else None
        )
        app = make_app(config, web_state)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        signals.starting = None
    except asyncio.CancelledError:
        if not signals.name:
            raise
        log.info("%s received during start-up: exiting", signals.name)
        return True
    try:
        try:
            site = web.TCPSite(
                runner,
                config.listen_host,
                config.listen_port,
                ssl_context=web_state.server_context() if web_state is not None else None,
            )
            await site.start()
        except OSError as e:
            raise ServeError(
                f"cannot listen on {config.listen_host}:{config.listen_port}: {e.strerror or e}; "
                "choose another address with --listen HOST:PORT"
            ) from None
        host = f"[{config.listen_host}]" if ":" in config.listen_host else config.listen_host
        scheme = "https" if web_state is not None and web_state.config.tls is not None else "http"
        auth = " (basic auth)" if web_state is not None and web_state.auth is not None else ""
        log.info("serving /metrics on %s://%s:%d%s", scheme, host, config.listen_port, auth)
        if signals.stop.is_set():  # a signal between the end of start-up and now
            return False
        async with asyncio.TaskGroup() as tg:
            poller = app[POLLER]
            tasks = [tg.create_task(poller.run(), name="poller")]
            if poller.parts.kube is not None:
                tasks.append(tg.create_task(poller.parts.kube.run(), name="kube-watch"))
            if web_state is not None:
                tasks.append(tg.create_task(_watch_web(web_state, signals, poller), name="web-config"))
            else:
                tasks.append(tg.create_task(_ignore_hup(signals), name="sighup"))
            await signals.stop.wait()
            log.info("%s received: shutting down", signals.name)
            for task in tasks:
                task.cancel()
    finally:
        await runner.cleanup()
    return False


async def _ignore_hup(signals: _Signals) -> None:
    while True:
        await signals.reload.wait()
        signals.reload.clear()
        log.info("SIGHUP ignored: only --web.config.file is re-read on SIGHUP; other settings need a restart")
