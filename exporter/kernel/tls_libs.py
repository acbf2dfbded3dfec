"""Which OpenSSL libraries the processes on this host have mapped, and attaching uprobes to them.

podnet recognises requests inside TLS by probing OpenSSL's SSL_read/SSL_write where the
plaintext is. A uprobe attaches to a file (an inode), not to a process, so every process that
maps the same file is covered by one attachment. Processes in containers see their own
filesystem: the library is found through /proc/<pid>/maps (the path as that process sees it)
and opened for attaching as /proc/<pid>/root/<path>. Containers come and go, so the caller
scans again periodically (LibraryScanner keeps what it read, see below) and attaches what is
new (TlsAttacher), and detaches what no process maps any more.

Identity of a library (Library.key). A uprobe lands on the real inode under an overlay
(d_real_inode), but stat() through an overlay mount, and /proc/<pid>/maps too on recent kernels,
report the overlay's own st_dev: two containers of one image show one library file under two
(dev, ino) pairs. Attaching both would run the programs twice per call and count every
request twice (checked on 6.18: 10 calls, 20 hits). On overlayfs the key is therefore
(st_ino, st_size, st_mtime_ns) without the device: overlay keeps the lower file's inode
number (unique across layers with xino), and size + mtime guard against a collision across
filesystems. A copied-up library (rewritten inside a container) keeps the lower inode number
and mtime while being another inode: it is taken for the lower one and not probed (rare).

Pinned mounts. An attachment holds the path it was opened by, so the container's root mount
stays busy (umount fails with EBUSY) until the library is detached: detach_gone() must run on
every scan, before attach_new(), so that a stopped container is released within one interval.

Names: libssl.so.3 (OpenSSL 3: Debian 12, Ubuntu 22.04+, Alpine 3.17+) and libssl.so.1.1
(Debian 11, Ubuntu 20.04, RHEL 8), and their versioned file names, which is what maps shows
where the soname is a symlink (RHEL/Fedora: libssl.so.3.0.7, RHEL 8: libssl.so.1.1.1k).
Not matched: NSS's libssl3.so, libssl.so.1.0.x (no SSL_*_ex, other struct layouts), backups
such as libssl.so.3.bak, and OpenSSL linked statically into a binary (or BoringSSL: Envoy,
Go's crypto/tls, which are no libssl at all).

Cost. Reading every process's maps on every scan is too heavy with thousands of processes, so
LibraryScanner reads /proc/<pid>/stat (small) of every pid, and maps only of a process it has
not seen (a new (starttime, comm): comm changes on exec, which matters because a container's
first process is the runtime's init until it execs the entrypoint), then again after a delay
that doubles up to recheck_max: a library loaded later with dlopen (Python loads libssl at
`import ssl`) is found within that delay, quickly for young processes, which is when it happens.

Blocking code, standard library and ctypes only; BCC is reached through the object the caller
passes in (attach_openssl), so tests can run it with fakes.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

LIBSSL_NAMES = re.compile(r"libssl\.so\.(?:3|1\.1)(?:\.[0-9][0-9a-z]*)*")
"""Basenames of the libraries probed (fullmatch)."""

OPTIONAL_SYMBOLS = frozenset({"SSL_read_ex", "SSL_write_ex"})
"""Absent before OpenSSL 1.1.1: a library without them is still probed through the rest."""

DEFAULT_LIMIT = 256
"""Distinct libraries scanned and attached at most: each costs one uprobe per probe."""

_DELETED = " (deleted)"
_OVERLAYFS_MAGIC = 0x794C7630
_VANISHED = frozenset({errno_mod.ENOENT, errno_mod.ESRCH})
_DENIED = frozenset({errno_mod.EACCES, errno_mod.EPERM})
_BCC_NO_SYMBOL = "could not determine address of symbol"  # bcc/__init__.py _check_path_symbol


def _is_libssl(path: str) -> bool:
    return LIBSSL_NAMES.fullmatch(path.rpartition("/")[2]) is not None


def libssl_paths(maps_text: str) -> set[str]:
    """Paths of the libssl files mapped in a /proc/<pid>/maps text. Mappings of a file that
    has been removed (" (deleted)") are left out: there is no path left to attach through."""
    if "libssl.so." not in maps_text:  # most processes: no line to split
        return set()
    found = set()
    for line in maps_text.splitlines():
        # address perms offset dev inode [path]; the path may hold spaces, split off 5 fields only
        fields = line.split(None, 5)
        if len(fields) < 6:
            continue
        path = fields[5]
        if not path.startswith("/") or path.endswith(_DELETED):
            continue
        if _is_libssl(path):
            found.add(path)
    return found


@dataclass(frozen=True)
class Library:
    dev: int  # st_dev as stat() through open_path reports it (an overlay's own device)
    ino: int
    path: str  # as the process sees it (its /proc/<pid>/maps)
    open_path: str  # /proc/<pid>/root/<path>: the same file from the exporter's side
    pid: int  # a process that mapped it when it was found (it may have exited since)
    size: int = 0
    mtime_ns: int = 0
    overlay: bool = False

    @property
    def key(self) -> tuple[int, ...]:
        """Identity of the file uprobes attach to (see the module docstring)."""
        if self.overlay:
            return (self.ino, self.size, self.mtime_ns)
        return (self.dev, self.ino)


@dataclass
class ScanStats:
    pids: int = 0  # processes listed in /proc
    maps_read: int = 0  # of those, maps read in this scan (new, or due for a recheck)
    vanished: int = 0  # exited between listing and reading (ENOENT, ESRCH)
    denied: int = 0  # EACCES / EPERM: the exporter lacks the privilege for that process
    libraries: int = 0  # distinct libraries returned
    dropped: int = 0  # distinct libraries left out over the limit
    seconds: float = 0.0


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]


def _on_overlay(path: str) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        return False
    return bool((buf.f_type & 0xFFFFFFFF) == _OVERLAYFS_MAGIC)


def _library(proc: str, pid: int, path: str, overlay: Callable[[str], bool]) -> Library:
    """Raises OSError when the file cannot be reached from here any more."""
    open_path = f"{proc}/{pid}/root{path}"
    try:
        st = os.stat(open_path)
    except FileNotFoundError:
        # maps shows a path from the root of the process's mount namespace: below its own
        # root only when that root is the namespace's (pivot_root, as container runtimes do).
        # A process chrooted in a namespace of its own shows its root's path first, as does
        # /proc/<pid>/root: take that off.
        root = os.readlink(f"{proc}/{pid}/root").rstrip("/")
        if not root or not path.startswith(root + "/"):
            raise
        open_path = f"{proc}/{pid}/root{path[len(root) :]}"
        st = os.stat(open_path)
    return Library(
        dev=st.st_dev,
        ino=st.st_ino,
        path=path,
        open_path=open_path,
        pid=pid,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        overlay=overlay(open_path),
    )


def _identity(stat_text: str) -> tuple[int, str] | None:
    """(starttime, comm) from a /proc/<pid>/stat text: a new process or a new program."""
    head, sep, rest = stat_text.rpartition(")")  # comm may hold ")" and spaces
    fields = rest.split()
    if not sep or len(fields) < 20:
        return None
    comm = head.partition("(")[2]
    return int(fields[19]), comm  # field 22 of stat(5); fields[0] is field 3 (state)


@dataclass
class _Entry:
    identity: tuple[int, str]
    libraries: list[Library]
    next_check: float
    delay: float


def _pids(proc: str) -> list[int]:
    return sorted(int(name) for name in os.listdir(proc) if name.isdigit())


class LibraryScanner:
    """Finds mapped libssl files, remembering per process what it read (module docstring).
    One scanner per exporter; not thread-safe."""

    def __init__(
        self,
        proc: str = "/proc",
        *,
        limit: int = DEFAULT_LIMIT,
        recheck_min: float = 5.0,
        recheck_max: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        overlay: Callable[[str], bool] = _on_overlay,
    ) -> None:
        self.proc = proc.rstrip("/") or "/"
        self.limit = limit
        self.recheck_min = recheck_min
        self.recheck_max = recheck_max
        self._clock = clock
        self._overlay = overlay
        # Insertion order = order first seen: over the limit, the newest libraries are the ones
        # left out, so that what is attached stays in the list (and is not detached).
        self._entries: dict[int, _Entry] = {}

    def scan(self) -> tuple[list[Library], ScanStats]:
        started = time.monotonic()
        stats = ScanStats()
        now = self._clock()
        pids = _pids(self.proc)
        stats.pids = len(pids)
        live = set(pids)
        for pid in [p for p in self._entries if p not in live]:
            del self._entries[pid]
        for pid in pids:
            try:
                self._visit(pid, now, stats)
            except OSError as e:
                self._entries.pop(pid, None)
                if e.errno in _DENIED:
                    stats.denied += 1
                elif e.errno in _VANISHED:
                    stats.vanished += 1
                else:
                    raise
        libraries: dict[tuple[int, ...], Library] = {}
        dropped: set[tuple[int, ...]] = set()
        for entry in self._entries.values():
            for lib in entry.libraries:
                if lib.key in libraries or lib.key in dropped:
                    continue
                if len(libraries) >= self.limit:
                    dropped.add(lib.key)
                else:
                    libraries[lib.key] = lib
        stats.libraries = len(libraries)
        stats.dropped = len(dropped)
        stats.seconds = time.monotonic() - started
        return list(libraries.values()), stats

    def _visit(self, pid: int, now: float, stats: ScanStats) -> None:
        with open(f"{self.proc}/{pid}/stat") as f:
            identity = _identity(f.read())
        if identity is None:
            return
        entry = self._entries.get(pid)
        if entry is not None and entry.identity == identity and now < entry.next_check:
            return
        with open(f"{self.proc}/{pid}/maps") as f:
            text = f.read()
        stats.maps_read += 1
        libraries = []
        for path in sorted(libssl_paths(text)):
            try:
                libraries.append(_library(self.proc, pid, path, self._overlay))
            except OSError as e:
                # Mapped but not reachable: the process exited, or the file was replaced.
                if e.errno not in _VANISHED:
                    raise
        if entry is not None and entry.identity == identity:
            delay = min(entry.delay * 2, self.recheck_max)
            entry.libraries, entry.next_check, entry.delay = libraries, now + delay, delay
        else:
            self._entries.pop(pid, None)
            delay = self.recheck_min
            self._entries[pid] = _Entry(identity, libraries, now + delay, delay)


def find_libraries(proc: str = "/proc", *, limit: int = DEFAULT_LIMIT) -> tuple[list[Library], ScanStats]:
    """One scan with nothing remembered: every process's maps is read."""
    return LibraryScanner(proc, limit=limit).scan()


H = TypeVar("H")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else '(no message)'}"


@dataclass
class TlsAttacher(Generic[H]):
    """The libraries probed, by Library.key, with what attach() returned for each.

    A library whose attach raised is not tried again for retry_after seconds: the reasons
    that last (no such symbol, a stripped or foreign build, too many probes) would otherwise
    cost an attempt and a log line on every scan, while one that passes (the process exited
    between the scan and the attach) is retried by then. Counters for self-metrics:
    attached (now), attached_total, failed_total, failing (now), dropped (last call, over
    the limit), detached_total."""

    limit: int = DEFAULT_LIMIT
    retry_after: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    attached_total: int = 0
    failed_total: int = 0
    detached_total: int = 0
    dropped: int = 0
    _handles: dict[tuple[int, ...], tuple[Library, H]] = field(default_factory=dict)
    _retry_at: dict[tuple[int, ...], float] = field(default_factory=dict)

    @property
    def attached(self) -> int:
        return len(self._handles)

    @property
    def failing(self) -> int:
        return len(self._retry_at)

    def libraries(self) -> list[Library]:
        return [lib for lib, _ in self._handles.values()]

    def attach_new(self, libs: Iterable[Library], attach: Callable[[Library], H]) -> list[str]:
        """attach(lib) for every library not attached yet; one line per failure, for the log."""
        now = self.clock()
        problems = []
        self.dropped = 0
        for lib in libs:
            key = lib.key
            if key in self._handles or now < self._retry_at.get(key, now):
                continue
            if len(self._handles) >= self.limit:
                self.dropped += 1
                continue
            try:
                handle = attach(lib)
            except Exception as e:  # BCC raises bare Exception
                self._retry_at[key] = now + self.retry_after
                self.failed_total += 1
                problems.append(
                    f"libssl {lib.path} (pid {lib.pid}, inode {lib.ino}): {_one_line(e)}; "
                    f"not retried for {self.retry_after:g} s"
                )
                continue
            self._retry_at.pop(key, None)
            self._handles[key] = (lib, handle)
            self.attached_total += 1
        return problems

    def detach_gone(self, libs: Iterable[Library], detach: Callable[[H], None]) -> list[str]:
        """detach(handle) of every attached library not in `libs` (no process maps it any
        more): this releases the mount it was opened through. Failures are forgotten too."""
        present = {lib.key for lib in libs}
        for key in [k for k in self._retry_at if k not in present]:
            del self._retry_at[key]
        return self._detach([k for k in self._handles if k not in present], detach)

    def detach_all(self, detach: Callable[[H], None]) -> list[str]:
        self._retry_at.clear()
        return self._detach(list(self._handles), detach)

    def _detach(self, keys: Sequence[tuple[int, ...]], detach: Callable[[H], None]) -> list[str]:
        problems = []
        for key in keys:
            lib, handle = self._handles.pop(key)
            self.detached_total += 1
            try:
                detach(handle)
            except Exception as e:  # BCC raises bare Exception
                problems.append(f"libssl {lib.path} (pid {lib.pid}, inode {lib.ino}): detach: {_one_line(e)}")
        return problems


def attach_openssl(
    obj: Any,
    lib: Library,
    probes: Sequence[tuple[str, str, bool]],
    optional: Collection[str] = OPTIONAL_SYMBOLS,
) -> list[bytes]:
    """Attach each (symbol, BCC function name, is_return) of `probes` to `lib` through BCC's
    `obj` (attach_uprobe / attach_uretprobe, pid -1: every process mapping the file).

    Returns the uprobe event names added to obj.uprobe_fds (the handle for detach_openssl).
    A symbol in `optional` that the library lacks is skipped; any other failure detaches what
    this call attached and raises, naming the symbol. BCC 0.26 reports a missing symbol (and a
    file it cannot open) as a bare Exception "could not determine address of symbol ..."."""
    before = set(obj.uprobe_fds)
    try:
        for symbol, fn_name, is_return in probes:
            attach = obj.attach_uretprobe if is_return else obj.attach_uprobe
            fds = dict(obj.uprobe_fds)
            try:
                attach(name=lib.open_path.encode(), sym=symbol.encode(), fn_name=fn_name.encode(), pid=-1)
            except Exception as e:
                missing = _BCC_NO_SYMBOL in str(e)
                if missing and symbol in optional and os.path.exists(lib.open_path):
                    continue
                if missing and os.path.exists(lib.open_path):
                    raise LookupError(f"no symbol {symbol} (OpenSSL build without it?)") from e
                if missing:
                    raise FileNotFoundError(f"{lib.open_path} is gone (the process exited)") from e
                kind = "uretprobe" if is_return else "uprobe"
                raise RuntimeError(f"{kind} {symbol} -> {fn_name}: {_one_line(e)}") from e
            _check_collision(obj, fds)
    except BaseException:
        detach_openssl(obj, [ev for ev in obj.uprobe_fds if ev not in before])
        raise
    return [ev for ev in obj.uprobe_fds if ev not in before]


def _check_collision(obj: Any, fds: dict[bytes, int]) -> None:
    """BCC names a uprobe event after the path and offset only and keeps one fd per name: a
    second attachment under a name in use (a pid reused by a process mapping another file at
    the same path) would replace the first one's fd, which then could never be detached.
    Undo the new one instead."""
    for ev, fd in list(obj.uprobe_fds.items()):
        if ev in fds and fds[ev] != fd:
            obj.uprobe_fds[ev] = fds[ev]
            os.close(fd)
            raise RuntimeError(f"uprobe event {ev.decode(errors='replace')} is in use by another library")


def detach_openssl(obj: Any, events: Iterable[bytes]) -> None:
    """Detach uprobe events that attach_openssl returned; ones already gone are skipped."""
    for ev in events:
        if ev in obj.uprobe_fds:
            obj.detach_uprobe_event(ev)


# BCC names a uprobe it makes in tracefs after the path, offset and its own pid; ours are
# made through /proc/self/fd/N (OpenSslProbes._attach).
_OUR_TRACEFS_EVENT = re.compile(r"^[pr]:uprobes/([pr]__proc_self_fd_\d+_0x[0-9a-f]+_bcc_(\d+)) ")


def sweep_stale_uprobe_events(
    tracefs: str = "/sys/kernel/tracing", alive: Callable[[int], bool] | None = None
) -> int:
    """Remove the tracefs uprobe definitions an exporter killed without its clean-up left (they
    are made there without CAP_SYS_ADMIN): those of dead processes. Returns how many."""
    is_alive = alive or (lambda pid: os.path.exists(f"/proc/{pid}"))
    path = os.path.join(tracefs, "uprobe_events")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    stale = [m.group(1) for m in map(_OUR_TRACEFS_EVENT.match, lines) if m and not is_alive(int(m.group(2)))]
    removed = 0
    for name in stale:
        # os.write: Python's append mode seeks to the end first, which tracefs refuses.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, f"-:uprobes/{name}\n".encode())
            finally:
                os.close(fd)
            removed += 1
        except OSError:
            continue  # in use, or gone meanwhile
    return removed


class OpenSslProbes:
    """Keeps the uprobes of `probes` ((symbol, BCC function, is_return), programs.OPENSSL_PROBES)
    on every libssl the host's processes map: each refresh() past `interval` seconds scans,
    detaches what no process maps any more, then attaches what is new. Runs in the thread
    that owns `obj` (the poller's)."""

    def __init__(
        self,
        obj: Any,
        probes: Sequence[tuple[str, str, bool]],
        *,
        interval: float = 5.0,
        scanner: LibraryScanner | None = None,
        attacher: TlsAttacher[tuple[list[bytes], int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._obj = obj
        self._probes = tuple(probes)
        self.interval = interval
        self.scanner = scanner or LibraryScanner()
        self.attacher: TlsAttacher[tuple[list[bytes], int]] = attacher or TlsAttacher()
        self._clock = clock
        self._next = clock()
        self.last_scan: ScanStats | None = None
        self.swept = sweep_stale_uprobe_events()
        self.newly_attached: list[Library] = []

    def refresh(self) -> list[str]:
        """One line per library that could not be probed or released, for the log; the
        libraries probed since the last call are in `newly_attached`."""
        self.newly_attached = []
        now = self._clock()
        if now < self._next:
            return []
        self._next = now + self.interval
        libs, self.last_scan = self.scanner.scan()
        problems = self.attacher.detach_gone(libs, self._detach)
        return problems + self.attacher.attach_new(libs, self._attach)

    def counts(self) -> tuple[int, int, int]:
        """(attached, failing, dropped) for podnet_exporter_tls_libraries."""
        a = self.attacher
        return a.attached, a.failing, a.dropped + (self.last_scan.dropped if self.last_scan else 0)

    def close(self) -> list[str]:
        return self.attacher.detach_all(self._detach)

    def _attach(self, lib: Library) -> tuple[list[bytes], int]:
        # Through a descriptor of our own, /proc/self/fd/N: without CAP_SYS_ADMIN the kernel
        # refuses uprobe perf events (EACCES here) and BCC falls back to tracefs, whose event
        # names (made from the path, at most 64 characters) a /proc/<pid>/root/... path
        # overflows (EINVAL). The descriptor stays open while attached: its number keeps
        # BCC's event names apart.
        fd = os.open(lib.open_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            events = attach_openssl(self._obj, replace(lib, open_path=f"/proc/self/fd/{fd}"), self._probes)
        except BaseException:
            os.close(fd)
            raise
        self.newly_attached.append(lib)
        return events, fd

    def _detach(self, handle: tuple[list[bytes], int]) -> None:
        events, fd = handle
        try:
            detach_openssl(self._obj, events)
        finally:
            os.close(fd)
