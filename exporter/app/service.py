"""Wiring: start-up checks, the aiohttp application's lifecycle, and the task group that
supervises the poller and the server until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from exporter.app.checkpoint import Checkpoint, SavedState, StateLock
from exporter.app.config import Config
from exporter.app.poller import Poller, PollerParts, settle_heap
from exporter.export.http_app import SNAPSHOTS, SnapshotStore, add_routes
from exporter.export.prometheus import Exposition
from exporter.kernel.btf import Btf
from exporter.kernel.maps import MapReader
from exporter.kernel.offsets import Offsets, resolve_offsets
from exporter.kernel.pins import Pins
from exporter.kernel.programs import MapSizes, load_programs, state_digest
from exporter.kernel.seeding import ConnectionSeed
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


class ServeError(Exception):
    """Fatal at start-up; one line with the fix."""


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
    )
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
    )


def open_state(
    config: Config, offsets: Offsets, sizes: MapSizes
) -> tuple[Pins | None, Checkpoint | None, SavedState | None]:
    """The pinned state to continue from, if any. Raises PinError (one line) when pins
    are asked for and bpffs is not there."""
    if not config.pin_dir:
        log.warning("--pin-dir none: counters restart from zero whenever the exporter does")
        return None, None, None
    digest = state_digest(offsets, sizes, config.requests)
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
    parts = await asyncio.to_thread(build_parts, config)
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
        if pusher is not None:
            await asyncio.to_thread(pusher.shutdown)
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


def make_app(config: Config) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app.cleanup_ctx.append(_kernel_ctx)
    add_routes(app)
    return app


@dataclass
class _Stop:
    event: asyncio.Event
    signal: str = ""


async def serve(config: Config) -> None:
    app = make_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.listen_host, config.listen_port)
        try:
            await site.start()
        except OSError as e:
            raise ServeError(
                f"cannot listen on {config.listen_host}:{config.listen_port}: {e.strerror or e}; "
                "choose another address with --listen HOST:PORT"
            ) from None
        host = f"[{config.listen_host}]" if ":" in config.listen_host else config.listen_host
        log.info("serving /metrics on http://%s:%d", host, config.listen_port)
        loop = asyncio.get_running_loop()
        stop = _Stop(asyncio.Event())

        def on_signal(name: str) -> None:
            stop.signal = name
            stop.event.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        async with asyncio.TaskGroup() as tg:
            poll_task = tg.create_task(app[POLLER].run(), name="poller")
            kube = app[POLLER].parts.kube
            kube_task = tg.create_task(kube.run(), name="kube-watch") if kube is not None else None
            await stop.event.wait()
            log.info("%s received: shutting down", stop.signal)
            poll_task.cancel()
            if kube_task is not None:
                kube_task.cancel()
    finally:
        await runner.cleanup()
