"""The poller: the one task that reads kernel maps and publishes snapshots.

Every blocking step (bpf syscalls, cgroup tree walks, file reads, rendering) runs in a
worker thread; the event loop only awaits it and swaps the published snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import platform
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from exporter import __version__
from exporter.app.checkpoint import Checkpoint, SavedState
from exporter.export.http_app import SnapshotStore
from exporter.export.prometheus import Exposition, Rendered
from exporter.kernel.bpfstats import prog_run_stats, stats_enabled
from exporter.kernel.maps import MapReader
from exporter.kernel.programs import LoadedPrograms
from exporter.kernel.tls_libs import OpenSslProbes
from exporter.metrics.ledger import Ledger
from exporter.metrics.lifecycle import Retired
from exporter.metrics.model import EMPTY_SNAPSHOT, ERRORS, Sample, Snapshot
from exporter.metrics.peers import PeerResolver
from exporter.metrics.raw import KernelRead, RawData
from exporter.metrics.snapshot import ExporterState, build_snapshot
from exporter.pods.identity import Identity, IdentityResolver
from exporter.pods.kube import KubeWatcher
from exporter.pods.metadata import MetadataSourceState, PodsFileSource, PodStore

log = logging.getLogger(__name__)


GC_THRESHOLDS = (10_000, 20, 100)
"""A poll allocates a few hundred thousand objects that live until the next poll, no
cycles among them; with the default (700, 10, 10) they cost two full collections per
poll (about a fifth of a poll at 1,000 pods)."""


def release_memory() -> None:
    """Hand malloc's free pages back to the kernel (glibc only; a no-op elsewhere). A poll's
    garbage is freed but scattered, so malloc would otherwise keep the poll's peak: at 1,000
    pods about 20 MiB, for 2-3 ms of this call."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_MADV_PAGEOUT = 21
_COMPILER_LIBS = re.compile(r"/lib(LLVM|clang)[^/]*\.so")


def release_compiler_pages(maps: str = "/proc/self/maps") -> int:
    """Ask the kernel to reclaim the pages of BCC's in-process compiler (libLLVM,
    libclang: ~80 MiB of RSS), which is never called again once the programs are loaded.
    Only read-only and executable mappings, and MADV_PAGEOUT, which never discards data:
    anything touched again is faulted back in. Returns the mappings advised."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        lines = Path(maps).read_text().splitlines()
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] not in ("r-xp", "r--p") or not _COMPILER_LIBS.search(parts[5]):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if libc.madvise(lo, hi - lo, _MADV_PAGEOUT) == 0:  # EINVAL before Linux 5.4: harmless
            advised += 1
    return advised


def settle_heap() -> None:
    """Once, after start-up (programs compiled, modules imported): hand the compiler's freed
    heap back (BCC's in-process clang leaves ~45 MiB), move what start-up left to the
    permanent generation so full collections stop rescanning it, and collect less often."""
    gc.collect()
    release_memory()
    release_compiler_pages()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def bcc_version() -> str:
    try:
        from bcc.version import __version__ as v

        return str(v)
    except Exception:
        return "unknown"


@dataclass
class PollerParts:
    programs: LoadedPrograms
    reader: MapReader
    resolver: IdentityResolver
    peers: PeerResolver
    store: PodStore
    pods_file: PodsFileSource | None
    exposition: Exposition
    max_series: int | None = 10000
    """Per family (Config.max_series); None: no cap."""
    kube: KubeWatcher | None = None
    """The Kubernetes API source; its task is run by service.serve, not by the poller."""
    checkpoint: Checkpoint | None = None
    """Where the totals are saved after each poll (with pinned maps); None: not saved."""
    saved: SavedState | None = None
    """The totals a previous exporter saved for the pinned maps in use, if any."""
    counters_since: float = field(default_factory=time.time)
    startup_errors: dict[str, int] = field(default_factory=dict)
    """Errors of start-up steps that were survived, by stage (podnet_exporter_errors_total)."""
    tls: OpenSslProbes | None = None
    """--tls openssl: the libraries probed, refreshed by each poll (the thread that owns BCC)."""


class FileSourceHealth:
    """Self-metric state of the pods file source, from the outcome of each poll's refresh()."""

    def __init__(self) -> None:
        # build_parts has loaded the file already (a failure there is fatal).
        self.up = True
        self.last_sync = time.time()
        self.loads = 1
        self.errors = 0

    def refreshed(self, *, changed: bool, failed: bool, now: float) -> None:
        if failed:
            self.up = False
            self.errors += 1
        elif changed:
            self.up = True
            self.loads += 1
            self.last_sync = now
        elif self.up:
            # Unchanged since a good read: still in sync. After a bad update it stays down.
            self.last_sync = now

    def state(self) -> MetadataSourceState:
        return MetadataSourceState("file", self.up, self.last_sync, self.loads, self.errors)


class Poller:
    def __init__(self, parts: PollerParts, snapshots: SnapshotStore, interval: float) -> None:
        self.parts = parts
        self.snapshots = snapshots
        self.interval = interval
        self.errors: Counter[str] = Counter(parts.startup_errors)
        self._logged: set[str] = set()
        self._polls = 0
        # The last snapshot built: which series are exported (they keep priority under the
        # series cap) and the running drop totals.
        self._previous: Snapshot = EMPTY_SNAPSHOT
        saved = parts.saved
        self.ledger = saved.ledger if saved is not None else Ledger()
        self.retired = (
            saved.retired if saved is not None else Retired(max_identities=parts.resolver.max_entries)
        )
        self.counters_since = saved.counters_since if saved is not None else parts.counters_since
        pins = parts.programs.pins
        self._gen_maps = pins.generation_map_ids() if pins is not None else ()
        self.otlp_stats: Callable[[], tuple[int, int, float] | None] = lambda: None
        self.file_health = FileSourceHealth() if parts.pods_file is not None else None
        self._http_responses: dict[tuple[str, str], int] = {}
        self._build = (
            __version__,
            platform.python_version(),
            bcc_version(),
            platform.release(),
            parts.programs.data_path,
        )

    def _error(self, stage: str, exc: BaseException) -> None:
        """Runtime errors are counted, logged once per stage and kind, and survived."""
        self.errors[stage] += 1
        key = f"{stage}:{type(exc).__name__}"
        if key not in self._logged:
            self._logged.add(key)
            log.error(
                "%s failed: %s (counted in podnet_exporter_errors_total{stage=%r}; "
                "further errors of this kind are not logged)",
                stage,
                exc,
                stage,
            )

    def _retire_dead(
        self, raw: RawData, read: KernelRead, ids: set[int], identities: dict[int, Identity]
    ) -> dict[int, Identity]:
        """Move dead cgroups' totals out of the ledger once the kernel holds nothing of
        them, keep them while their pod lives, and merge what is kept into this poll's
        data."""
        p = self.parts
        self.ledger.name(identities)
        dead = p.resolver.dead(ids)
        # A dead cgroup keeps the name it was last known by (saved with the totals: it may
        # have died while no exporter ran) until the kernel holds nothing more of it.
        for cg in dead:
            if cg not in identities and cg in self.ledger.names:
                identities[cg] = self.ledger.names[cg]
        still_counting = read.live.owners()
        gone = [cg for cg in dead if cg not in still_counting]
        for cg in gone:
            if cg in identities:
                self.retired.absorb(raw, cg, identities[cg])
        if gone:
            self.ledger.forget(gone)
            raw.drop(gone)
        live = {identities[cg] for cg in raw.cgroups if cg in identities}
        live |= {identities[cg] for cg, _ in raw.flows if cg in identities}

        def keep(ident: Identity) -> bool:
            # A pod that still exists keeps its dead containers' totals: counters of a
            # living pod never go backwards.
            return ident in live or (ident.pod_uid is not None and p.store.by_uid(ident.pod_uid) is not None)

        self.retired.prune(keep)
        return self.retired.merge(raw, identities)

    def poll_once(self) -> Rendered:
        """One full poll; blocking."""
        p = self.parts
        started = time.perf_counter()
        if p.pods_file is not None:
            errors_before = p.pods_file.errors
            changed, failed = False, False
            try:
                changed = p.pods_file.refresh()
            except Exception as e:
                self._error("pods_file", e)
                failed = True
            if self.file_health is not None:
                failed = failed or p.pods_file.errors > errors_before
                self.file_health.refreshed(changed=changed, failed=failed, now=time.time())
        try:
            p.peers.refresh_node_addresses(time.monotonic())
        except Exception as e:
            self._error("node_addresses", e)
        if p.tls is not None:
            self._refresh_tls(p.tls)
        read = p.reader.read(self.ledger.committed_through, self.ledger.committed_sockets)
        raw = self.ledger.apply(read, p.peers.classify)
        ids = set(raw.cgroups) | {cg for cg, _ in raw.flows} | set(raw.rtt) | set(raw.connect)
        ids |= set(raw.requests)
        identities = p.resolver.resolve(ids)
        if p.resolver.failed:
            # One owner's bad data costs that owner this poll, not everyone's.
            for problem in p.resolver.failed.values():
                self._error("owner", problem)
            raw.drop(p.resolver.failed)
            ids -= p.resolver.failed.keys()
        try:
            identities = self._retire_dead(raw, read, ids, identities)
        except Exception as e:
            self._error("cgroup_gc", e)
        self._save_then_delete()
        bpf_stats: dict[str, tuple[int, int]] = {}
        if stats_enabled():
            for tp, fd in p.programs.program_fds().items():
                st = prog_run_stats(fd)
                if st is not None:
                    bpf_stats[tp] = st
        self._polls += 1
        state = ExporterState(
            build=self._build,
            poll_seconds=time.perf_counter() - started,
            polls=self._polls,
            errors=dict(self.errors),
            programs={h.hook.label: h.attached for h in p.programs.hooks},
            unresolved=p.resolver.unresolved,
            pods=len(p.store),
            bpf_stats=bpf_stats,
            otlp=self.otlp_stats(),
            retired_dropped=self.retired.dropped,
            metadata=self._metadata_states(),
            http=self._http_responses,
            tls=p.tls.counts() if p.tls is not None else None,
        )
        snap = build_snapshot(
            raw,
            identities,
            state,
            time.time(),
            pods=p.store.pods(),
            max_series=p.max_series,
            previous=self._previous,
            counters_since=self.counters_since,
        )
        self._previous = snap
        rendered = p.exposition.render(snap)
        release_memory()
        return rendered

    def _refresh_tls(self, tls: OpenSslProbes) -> None:
        try:
            problems = tls.refresh()
        except Exception as e:
            self._error("tls", e)
            return
        for problem in problems:
            # One line per library (a failed one is retried only after an hour).
            self.errors["tls"] += 1
            log.warning("--tls openssl: %s", problem)
        for lib in tls.newly_attached:
            log.info("--tls openssl: probing %s (pid %d, inode %d)", lib.path, lib.pid, lib.ino)
        scan = tls.last_scan
        if scan is not None and scan.denied and "tls:denied" not in self._logged:
            self._logged.add("tls:denied")
            log.warning(
                "--tls openssl: the maps of %d processes could not be read (no CAP_SYS_PTRACE, or not in "
                "the host PID namespace?): TLS inside them is not recognised",
                scan.denied,
            )

    def _save_then_delete(self) -> None:
        """Save the totals, then delete the kernel entries they now hold. If the save
        fails the entries stay (the ledger knows it counted them) until one works."""
        p = self.parts
        if p.checkpoint is not None:
            state = SavedState(self.ledger, self.retired, self.counters_since)
            if not self._gen_maps or not p.checkpoint.save(state, self._gen_maps):
                self.errors["checkpoint"] += 1
                return
        try:
            p.reader.delete_final()
        except Exception as e:
            self._error("map_delete", e)
            return
        self.ledger.committed_sockets = frozenset()

    def render_errors(self) -> Rendered:
        """After a failed poll: the last good snapshot with the error counters as they are
        now, so the failure is visible in /metrics (the last poll timestamp stays that of
        the last good poll, and /readyz turns 503 once it is too old)."""
        prev = self._previous
        samples = dict(prev.samples)
        samples[ERRORS.name] = tuple(Sample((stage,), float(n)) for stage, n in sorted(self.errors.items()))
        snap = Snapshot.build(
            prev.taken_at, samples, prev.histograms, prev.pod_uids, counters_since=prev.counters_since
        )
        return self.parts.exposition.render(snap)

    def _metadata_states(self) -> tuple[MetadataSourceState, ...]:
        states = []
        if self.parts.kube is not None:
            states.append(self.parts.kube.state())
        if self.file_health is not None:
            states.append(self.file_health.state())
        return tuple(states)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            # Copied here, on the loop that counts them: the poll's thread must not iterate
            # a dict the handlers are adding to.
            self._http_responses = dict(self.snapshots.responses)
            work = asyncio.ensure_future(asyncio.to_thread(self.poll_once))
            try:
                rendered = await asyncio.shield(work)
            except asyncio.CancelledError:
                # A thread cannot be interrupted, and the programs it reads (their counters'
                # array is mapped into this process) are closed once this task ends: end
                # only after the poll in flight has.
                await asyncio.wait([work])
                raise
            except Exception as e:
                self._error("poll", e)
                try:
                    self.snapshots.current = await asyncio.to_thread(self.render_errors)
                except Exception as again:
                    self._error("render", again)
            else:
                self.snapshots.current = rendered
                self.snapshots.polls += 1
                self.snapshots.last_success = loop.time()
                self.snapshots.ready.set()
            # Fixed-rate schedule: a slow poll shortens the wait instead of drifting.
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))
