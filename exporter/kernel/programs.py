"""Compile bpf/*.bpf.c with BCC and attach each program to its tracepoint.

The hot-path program (tcp_traffic) is loaded as a BTF-typed tracepoint program (tp_btf,
exporter/kernel/bpf_syscall.py) where the kernel allows it: plain loads instead of
bpf_probe_read_kernel and socket-local storage instead of a socket-keyed hash map. On
kernels without tp_btf the same source is built for raw tracepoints (-DPODNET_TP_BTF
absent). The other programs run once per connection event and use raw tracepoints.

Each hook is checked against the running kernel before anything is compiled: the
tracepoint must exist with the arguments the C code reads, and the struct fields the
program reads must resolve in BTF. A hook that fails any check (or fails to attach) is
reported with its reason; the others still run.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

from exporter.kernel.bpf_structs import MAP_TYPES
from exporter.kernel.bpf_syscall import (
    BpfSyscallError,
    MappedArray,
    attach_tp_btf,
    link_prog_id,
    load_tp_btf,
    map_array,
    obj_get,
    obj_pin,
    prog_fd_by_id,
)
from exporter.kernel.btf import Btf
from exporter.kernel.headers import find_tree
from exporter.kernel.offsets import Offsets
from exporter.kernel.pins import Pins, build_digest, variant_tag

log = logging.getLogger(__name__)

BPF_DIR = Path(os.environ.get("PODNET_BPF_DIR", Path(__file__).resolve().parents[2] / "bpf"))


class ProgramLoadError(Exception):
    """Fatal at start-up: nothing could be attached. One line with the fix."""


@dataclass(frozen=True)
class Hook:
    tracepoint: str
    function: str
    args: tuple[str, ...]
    """Leading raw-tracepoint arguments the C code reads (const ignored); later kernels
    may append more."""
    required: bool = False
    """The program is unsafe without this hook (e.g. it frees per-socket state): if it
    cannot attach, none of the program's hooks run."""

    @property
    def label(self) -> str:
        """Unique across programs: the `program` label of the self-metrics."""
        return self.function.removeprefix("on_")


@dataclass(frozen=True)
class TailCall:
    """A program the hook of `tracepoint` (None: the TLS uprobes) tail-calls through slot
    0 of `array`. Builds without `function` (the C leaves it out) have no such call."""

    tracepoint: str | None
    function: str
    array: str

    @property
    def label(self) -> str:
        return self.function


@dataclass(frozen=True)
class ProgramSpec:
    name: str
    hooks: tuple[Hook, ...]
    fields: tuple[str, ...]
    """EXTRA_FIELDS macros this program reads beyond bpf/podnet.h's."""
    metrics: tuple[str, ...]
    btf_typed: bool = False
    """Built with -DPODNET_TP_BTF and loaded as tp_btf programs where the kernel can."""
    socket_slots: str | None = None
    """The tp_btf build's array of live sockets' byte counters, mapped into the poller:
    without it that build's byte counters could not be read, so it is required."""
    tracks_requests: bool = False
    """Built per Config.requests (with or without HTTP recognition, or without requests)."""
    tail_calls: tuple[TailCall, ...] = ()
    """Programs reached by tail call, loaded into their arrays before the hooks attach."""

    @property
    def source(self) -> Path:
        return BPF_DIR / f"{self.name}.bpf.c"


_SOCK = "struct sock *"
_SKB = "struct sk_buff *"

PROGRAMS: tuple[ProgramSpec, ...] = (
    ProgramSpec(
        "tcp_traffic",
        (
            Hook("sock_send_length", "on_sock_send_length", (_SOCK, "int", "int")),
            Hook("sock_recv_length", "on_sock_recv_length", (_SOCK, "int", "int")),
            Hook("tcp_destroy_sock", "on_tcp_destroy_sock", (_SOCK,), required=True),
            Hook("inet_sock_set_state", "on_traffic_sock_state", (_SOCK, "int", "int"), required=True),
        ),
        ("PODNET_OFF_TCP_SRTT_US",),
        (
            "podnet_tcp_sent_bytes_total",
            "podnet_tcp_received_bytes_total",
            "podnet_flow_bytes_total",
            "podnet_tcp_rtt_seconds",
            "podnet_requests_total",
            "podnet_request_duration_seconds",
        ),
        btf_typed=True,
        socket_slots="tcp_sock_slots",
        tracks_requests=True,
        # HTTP/2: the frame walker continues where the hook's budget ends (bpf/http2.h).
        tail_calls=(
            TailCall("sock_send_length", "h2_walk_on_sent", "h2_walk_sent"),
            TailCall("sock_recv_length", "h2_walk_on_received", "h2_walk_received"),
            TailCall(None, "h2_walk_on_tls", "h2_walk_tls"),
        ),
    ),
    ProgramSpec(
        "tcp_state",
        (Hook("inet_sock_set_state", "on_inet_sock_set_state", (_SOCK, "int", "int")),),
        ("PODNET_OFF_SK_ERR",),
        (
            "podnet_tcp_connections_opened_total",
            "podnet_tcp_connections_closed_total",
            "podnet_tcp_connections_failed_total",
            "podnet_tcp_active_connections",
            "podnet_tcp_connect_duration_seconds",
        ),
    ),
    ProgramSpec(
        "tcp_events",
        (
            Hook("tcp_retransmit_skb", "on_tcp_retransmit_skb", (_SOCK, _SKB)),
            Hook("tcp_send_reset", "on_tcp_send_reset", (_SOCK,)),
            Hook("tcp_receive_reset", "on_tcp_receive_reset", (_SOCK,)),
        ),
        ("PODNET_OFF_SKB_CB", "PODNET_OFF_TCP_SKB_CB_GSO_SEGS"),
        ("podnet_tcp_retransmits_total", "podnet_tcp_resets_total"),
    ),
)


@dataclass(frozen=True)
class Variant:
    """One way to build and attach a program; tried in order until every hook attaches."""

    cflags: tuple[str, ...]
    tp_btf: bool = False

    TP_BTF = "BTF-typed tracepoints"

    def describe(self) -> str:
        parts = [self.TP_BTF if self.tp_btf else "raw tracepoints"]
        if "-DPODNET_NO_REQUESTS" in self.cflags:
            parts.append("requests off")
        elif "-DPODNET_NO_PEEK" in self.cflags:
            parts.append("requests without HTTP recognition")
        elif "-DPODNET_NO_HTTP2" in self.cflags:
            parts.append("requests without HTTP/2")
        if "-DPODNET_TLS" in self.cflags:
            parts.append("TLS (OpenSSL)")
        return ", ".join(parts)


TlsMode = Literal["off", "openssl"]
"""TLS recognition (Config.tls): "openssl" builds the uprobe programs of bpf/tcp_traffic.bpf.c."""
TLS_MODES: Final[tuple[TlsMode, ...]] = get_args(TlsMode)


@dataclass(frozen=True)
class Uprobe:
    symbol: str
    function: str
    ret: bool = False


# What --tls openssl attaches to each libssl found (bpf/tcp_traffic.bpf.c, PODNET_TLS).
OPENSSL_PROBES: Final[tuple[Uprobe, ...]] = (
    Uprobe("SSL_write", "on_ssl_write"),
    Uprobe("SSL_write", "on_ssl_return", ret=True),
    Uprobe("SSL_read", "on_ssl_read"),
    Uprobe("SSL_read", "on_ssl_return", ret=True),
    Uprobe("SSL_write_ex", "on_ssl_write_ex"),
    Uprobe("SSL_write_ex", "on_ssl_return", ret=True),
    Uprobe("SSL_read_ex", "on_ssl_read_ex"),
    Uprobe("SSL_read_ex", "on_ssl_return", ret=True),
    # The handshake: its records are not counted as turns of the socket, and the socket
    # tells the connection its role. SSL_connect and SSL_accept may not go through
    # SSL_do_handshake's entry point.
    Uprobe("SSL_do_handshake", "on_ssl_handshake"),
    Uprobe("SSL_do_handshake", "on_ssl_return", ret=True),
    Uprobe("SSL_connect", "on_ssl_handshake"),
    Uprobe("SSL_connect", "on_ssl_return", ret=True),
    Uprobe("SSL_accept", "on_ssl_handshake"),
    Uprobe("SSL_accept", "on_ssl_return", ret=True),
    Uprobe("SSL_free", "on_ssl_free"),
)
UPROBE_FUNCTIONS: Final = tuple(sorted({u.function for u in OPENSSL_PROBES}))

RequestMode = Literal["http", "http1", "turns", "off"]
"""Request tracking build (Config.requests): see _REQUEST_BUILDS."""
REQUEST_MODES: Final[tuple[RequestMode, ...]] = get_args(RequestMode)

_REQUEST_BUILDS: dict[RequestMode, list[tuple[str, ...]]] = {
    # Kernels older than 5.15 lack the helpers that find a syscall's buffer: the program
    # then loads without HTTP recognition instead of not at all.
    # HTTP/2 needs the frame walker (tail calls): without it, HTTP/1.x recognition still works.
    "http": [(), ("-DPODNET_NO_HTTP2",), ("-DPODNET_NO_PEEK",)],
    "http1": [("-DPODNET_NO_HTTP2",), ("-DPODNET_NO_PEEK",)],
    "turns": [("-DPODNET_NO_PEEK",)],
    "off": [("-DPODNET_NO_REQUESTS",)],
}


def variants(spec: ProgramSpec, requests: RequestMode = "http", tls: TlsMode = "off") -> list[Variant]:
    peek = _REQUEST_BUILDS[requests] if spec.tracks_requests else [()]
    if tls == "openssl" and spec.tracks_requests:
        # TLS recognition reads plaintext like HTTP recognition does: not in builds that read none.
        peek = [p if "-DPODNET_NO_PEEK" in p else (*p, "-DPODNET_TLS") for p in peek]
    out = [Variant(("-DPODNET_TP_BTF", *p), tp_btf=True) for p in peek] if spec.btf_typed else []
    return out + [Variant(p) for p in peek]


@dataclass(frozen=True)
class MapSizes:
    cgroups: int = 65536

    @property
    def flows(self) -> int:
        """(owner, peer) flows: the kernel's flow map, and the poller's totals of dead sockets."""
        return self.cgroups * 4

    def cflags(self) -> list[str]:
        # Owners are few (containers + host services); sockets, flows and histogram
        # slots are several per owner. Maps are not preallocated: memory follows use.
        return [
            f"-DPODNET_MAP_ENTRIES={self.cgroups}",
            f"-DPODNET_FLOW_ENTRIES={self.flows}",
            f"-DPODNET_SOCK_ENTRIES={self.cgroups * 4}",
            # Live sockets' counters: an array, so allocated whole (48 bytes a slot). A
            # socket that finds no free slot is counted in the flow map instead.
            f"-DPODNET_SOCK_SLOTS={self.cgroups}",
            f"-DPODNET_HIST_ENTRIES={self.cgroups * 8}",
            # HTTP/2 parser state (~1 KiB a direction, LRU: preallocated) and open streams, and
            # TLS connections: 8 MiB, 1.6 MiB and 3.75 MiB at the default 65536.
            f"-DPODNET_H2_CONNS={max(self.cgroups // 8, 64)}",
            f"-DPODNET_H2_STREAMS={max(self.cgroups // 4, 128)}",
            f"-DPODNET_TLS_CONNS={max(self.cgroups // 4, 128)}",
        ]


@dataclass
class HookStatus:
    program: str
    hook: Hook
    attached: bool = False
    reason: str = ""


@dataclass
class LoadedPrograms:
    """The BCC objects and what got attached. Only the poller thread reads their maps."""

    objects: dict[str, Any] = field(default_factory=dict)
    hooks: list[HookStatus] = field(default_factory=list)
    tp_btf: dict[str, tuple[int, int]] = field(default_factory=dict)
    """hook label -> (program fd, link fd) of hooks attached as tp_btf programs."""
    builds: dict[str, str] = field(default_factory=dict)
    """program -> how it was built and attached (Variant.describe), for logs and doctor."""
    headers: str = ""
    """The kernel headers tree BCC compiled against (kernel.headers.find_tree), for messages."""
    passed_over: dict[str, list[str]] = field(default_factory=dict)
    """program -> the builds tried before the one that loaded, each with why it did not
    (Variant.describe: reason): logged as a warning at start-up and shown by doctor."""
    socket_slots: dict[str, MappedArray] = field(default_factory=dict)
    """program -> its array of live sockets' counters, mapped read-only (tp_btf builds)."""
    pins: Pins | None = None
    """Where maps and links are pinned; None: they live as long as this process."""
    adopted: set[str] = field(default_factory=set)
    """Programs found still attached and pinned by a previous exporter: their maps and
    counts carry on."""
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    """hook label -> (program fd, link fd) of hooks adopted from pins."""
    pinned_maps: dict[str, str] = field(default_factory=dict)
    """adopted program -> the prefix of its pinned maps: its tables read those, not the
    unused maps BCC created when compiling it."""
    variant_tags: dict[str, str] = field(default_factory=dict)
    """program -> the tag (pins.variant_tag) of the build loaded last."""
    tls_program: str | None = None
    """The program whose build has the TLS uprobe programs (OPENSSL_PROBES), ready to attach."""
    tail_fds: dict[str, int] = field(default_factory=dict)
    """tail-called function -> its program fd (the arrays hold their own references)."""
    tail_arrays: list[tuple[str, str]] = field(default_factory=list)
    """(program, array) of the tail calls filled."""
    _pinned_fds: dict[tuple[str, str], int] = field(default_factory=dict)

    def socket_slot_array(self, program: str) -> MappedArray | None:
        """The program's live-socket slots, read in place by the poller (sockbytes.read_slots)."""
        return self.socket_slots.get(program) if self.attached(program) else None

    def table(self, program: str, name: str) -> Any | None:
        obj = self.objects.get(program)
        if obj is None:
            return None
        # Our ctypes mirrors, not BCC's generated ones: one definition of each layout.
        types = MAP_TYPES.get(name)
        table = (
            obj.get_table(name.encode())
            if types is None
            else obj.get_table(name.encode(), keytype=types[0], leaftype=types[1])
        )
        prefix = self.pinned_maps.get(program)
        if prefix is not None and self.pins is not None:
            fd = self._pinned_fds.get((program, name))
            if fd is None:
                fd = self.pins.open_map(prefix, name)
                if fd is None:
                    return None
                self._pinned_fds[(program, name)] = fd
            table.map_fd = fd
        return table

    def program_fds(self) -> dict[str, int]:
        """hook label -> fd of the attached program, for run-time statistics."""
        out: dict[str, int] = {}
        for h in self.hooks:
            fds = self.tp_btf.get(h.hook.label) or self.links.get(h.hook.label)
            if h.attached and fds is not None:
                out[h.hook.label] = fds[0]
                continue
            obj = self.objects.get(h.program)
            fn = obj.funcs.get(h.hook.function.encode()) if h.attached and obj is not None else None
            if fn is not None:
                out[h.hook.label] = fn.fd
        # The HTTP/2 walkers and the TLS uprobes: what recognising those protocols costs.
        out.update(self.tail_fds)
        tls = self.tls_object()
        if tls is not None:
            for name in UPROBE_FUNCTIONS:
                fn = tls.funcs.get(name.encode())
                if fn is not None:
                    out[name] = fn.fd
        return out

    def tls_object(self) -> Any | None:
        """The BCC object whose uprobe programs TLS libraries get (tls_libs.OpenSslProbes)."""
        return self.objects.get(self.tls_program or "")

    def attached(self, program: str) -> bool:
        return any(h.attached for h in self.hooks if h.program == program)

    @property
    def data_path(self) -> str:
        """How the hot path (tcp_traffic) runs: "tp_btf", "raw_tracepoint" or "none"; the
        `data_path` label of podnet_exporter_build_info."""
        how = self.builds.get("tcp_traffic")
        if how is None:
            return "none"
        return "tp_btf" if how.startswith(Variant.TP_BTF) else "raw_tracepoint"

    def close_tp_btf(self, labels: Sequence[str]) -> None:
        for label in labels:
            _close_link(self.tp_btf.pop(label, None))

    def close_tp_btf_links(self) -> None:
        for label in list(self.links):
            _close_link(self.links.pop(label, None))

    def unmap_socket_slots(self, program: str) -> None:
        mapped = self.socket_slots.pop(program, None)
        if mapped is not None:
            mapped.close()

    def close(self, detach: bool = True) -> None:
        """Close everything. Without pins that detaches the programs (the kernel frees
        programs and maps with their last fd); with pins they stay attached and counting
        for the next start, unless `detach`, which removes the pins too."""
        if detach or self.pins is None:
            # A walker is in its own array (it tail-calls itself): the kernel breaks that cycle
            # only later, in a deferred work item; emptying the arrays frees them now.
            for program, array in self.tail_arrays:
                with contextlib.suppress(Exception):
                    table = self.table(program, array)
                    if table is not None:
                        table.clear()
        self.tail_arrays.clear()
        self.close_tp_btf(list(self.tp_btf))
        self.close_tp_btf_links()
        for fd in self._pinned_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pinned_fds.clear()
        for fd in self.tail_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.tail_fds.clear()
        if detach and self.pins is not None:
            self.pins.discard()
        for program in list(self.socket_slots):
            self.unmap_socket_slots(program)
        for obj in self.objects.values():
            with contextlib.suppress(Exception):
                obj.cleanup()
        self.objects.clear()
        for h in self.hooks:
            h.attached = False


def _normalise(ctype: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\bconst\b", "", ctype)).strip()


def check_hook(btf: Btf, hook: Hook) -> tuple[str | None, int]:
    """(why the hook cannot work here or None, number of tracepoint arguments)."""
    args = btf.raw_tracepoint_args(hook.tracepoint)
    if args is None:
        return f"kernel has no tracepoint {hook.tracepoint}", 0
    have = tuple(_normalise(a) for a in args)
    if have[: len(hook.args)] != hook.args:
        want = ", ".join(hook.args)
        return f"tracepoint {hook.tracepoint} takes ({', '.join(have)}), podnet expects ({want}, ...)", len(
            args
        )
    return None, len(args)


# Syscall numbers whose user buffer HTTP recognition may read (bpf/requests.h).
_SYSCALLS = {
    "x86_64": {
        "READ": 0,
        "WRITE": 1,
        "READV": 19,
        "WRITEV": 20,
        "SENDTO": 44,
        "RECVFROM": 45,
        "SENDMSG": 46,
        "RECVMSG": 47,
    },
}


def syscall_cflags(machine: str | None = None) -> list[str]:
    """Empty on other architectures: there requests are counted without HTTP details."""
    nrs = _SYSCALLS.get(machine or os.uname().machine, {})
    return [f"-DPODNET_NR_{name}={nr}" for name, nr in sorted(nrs.items())]


def program_cflags(spec: ProgramSpec, offsets: Offsets, sizes: MapSizes, nargs: dict[str, int]) -> list[str]:
    flags = [f"-I{BPF_DIR}", *offsets.cflags(), *sizes.cflags(), *syscall_cflags()]
    flags += [f"-DPODNET_TP_{tp.upper()}_NARGS={n}" for tp, n in sorted(nargs.items())]
    return flags


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """libbcc prints compiler diagnostics straight to fd 2; keep them for one summary
    line instead of a wall of clang output."""
    out: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.extend(tmp.read().decode(errors="replace").splitlines())


def _first_error(lines: Sequence[str], exc: BaseException) -> str:
    for line in lines:
        if "error:" in line:
            return line.strip()
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _close_link(fds: tuple[int, int] | None) -> None:
    """Close a (program fd, link fd) pair, link first: that detaches the program."""
    for fd in reversed(fds or ()):
        with contextlib.suppress(OSError):
            os.close(fd)


def _linked(prog_fd: int, link: Callable[[int], int]) -> tuple[int, int]:
    """(prog_fd, link(prog_fd)); the program fd is closed if linking fails."""
    try:
        return prog_fd, link(prog_fd)
    except BpfSyscallError:
        os.close(prog_fd)
        raise


def _attach_tp_btf(loaded: LoadedPrograms, btf: Btf, obj: Any, st: HookStatus) -> None:
    type_id = btf.tracepoint_type_id(st.hook.tracepoint)
    if type_id is None:
        raise BpfSyscallError(f"kernel has no tracepoint {st.hook.tracepoint}")
    loaded.tp_btf[st.hook.label] = _linked(load_tp_btf(obj, st.hook.function, type_id), attach_tp_btf)


def _has_function(obj: Any, function: str) -> bool:
    from bcc import lib  # the same libbcc that compiled obj

    return bool(lib.bpf_function_start(obj.module, function.encode()))


def _fill_tail_calls(loaded: LoadedPrograms, btf: Btf, spec: ProgramSpec, obj: Any, variant: Variant) -> None:
    """Load each tail-called program like its hook (tp_btf programs only tail-call programs
    of the same tracepoint) and put it in its array."""
    for tc in spec.tail_calls:
        if not _has_function(obj, tc.function):
            continue
        if tc.tracepoint is None:
            with _captured_stderr():
                fd = os.dup(obj.load_func(tc.function.encode(), obj.KPROBE).fd)
        elif variant.tp_btf:
            type_id = btf.tracepoint_type_id(tc.tracepoint)
            if type_id is None:
                raise BpfSyscallError(f"kernel has no tracepoint {tc.tracepoint}")
            fd = load_tp_btf(obj, tc.function, type_id)
        else:
            with _captured_stderr():
                fd = os.dup(obj.load_func(tc.function.encode(), obj.RAW_TRACEPOINT).fd)
        old = loaded.tail_fds.pop(tc.label, None)
        if old is not None:
            os.close(old)
        loaded.tail_fds[tc.label] = fd
        obj.get_table(tc.array.encode())[ct.c_int(0)] = ct.c_int(fd)
        loaded.tail_arrays.append((spec.name, tc.array))


def _load_uprobes(loaded: LoadedPrograms, spec: ProgramSpec, obj: Any, tag: str, adopt: bool) -> None:
    """Make the build's TLS uprobe programs ready for attaching to libraries as they are
    found. They share the build's maps, so they are pinned with it, and a later exporter
    adopting the build attaches those very programs (BCC's load_func returns what its
    `funcs` holds)."""
    if not _has_function(obj, UPROBE_FUNCTIONS[0]):
        return
    pins = loaded.pins
    for fn in UPROBE_FUNCTIONS:
        if adopt and pins is not None:
            try:
                fd = obj_get(pins.prog_path(spec.name, tag, fn))
            except OSError as e:
                raise BpfSyscallError(f"pinned TLS program {fn} unusable: {e.strerror}") from None
            obj.funcs[fn.encode()] = obj.Function(obj, fn.encode(), fd)
            continue
        with _captured_stderr():
            prog = obj.load_func(fn.encode(), obj.KPROBE)
        if pins is not None:
            obj_pin(prog.fd, pins.prog_path(spec.name, tag, fn))
    loaded.tls_program = spec.name


def _map_socket_slots(loaded: LoadedPrograms, spec: ProgramSpec, obj: Any) -> None:
    if spec.socket_slots is None:
        return
    table = loaded.table(spec.name, spec.socket_slots) if spec.name in loaded.objects else None
    if table is None:
        raise BpfSyscallError(f"map {spec.socket_slots} is not in the compiled program")
    value_type = MAP_TYPES[spec.socket_slots][1]
    loaded.socket_slots[spec.name] = map_array(table.get_fd(), value_type, table.max_entries)


def _compile_and_attach(
    loaded: LoadedPrograms,
    btf: Btf,
    spec: ProgramSpec,
    statuses: list[HookStatus],
    usable: list[HookStatus],
    cflags: list[str],
    variant: Variant,
    debug: int,
    bpf_class: Any,
    last: bool,
    before_attach: Callable[[str, Any], None] | None = None,
) -> bool:
    """One attempt; True when done: every hook attached, or this was the last attempt
    (then the hooks that attached stay, unless a required one failed). With pins, a
    variant a previous exporter left attached is adopted (its links and maps), not
    attached again; a fresh one is attached and its links pinned."""
    tag = variant_tag(variant.cflags)
    pins = loaded.pins
    adopt = pins is not None and pins.adopted(spec.name) == tag
    # Adopting: built without pins (BCC would open them by map id, which needs
    # CAP_SYS_ADMIN); the tables are pointed at the pinned maps instead (table()).
    pin_flags = pins.cflags(spec.name, tag) if pins is not None and not adopt else []
    try:
        with _captured_stderr() as diag:
            obj = bpf_class(src_file=str(spec.source).encode(), cflags=cflags + pin_flags, debug=debug)
    except Exception as e:  # BCC raises bare Exception on compile failure
        why = _first_error(diag, e)
        reason = f"BCC could not compile {spec.source.name}: {why} (kernel headers: {loaded.headers})"
        for st in usable:
            st.reason = reason
        if pins is not None:
            pins.unpin_prefix(spec.name, tag)
        return True  # another variant would not compile either
    loaded.objects[spec.name] = obj
    loaded.variant_tags[spec.name] = tag
    if adopt and pins is not None:
        loaded.pinned_maps[spec.name] = pins.prefix(spec.name, tag)
    if variant.tp_btf:
        try:
            _map_socket_slots(loaded, spec, obj)
        except BpfSyscallError as e:
            for st in usable:
                st.reason = str(e)
            obj.cleanup()
            del loaded.objects[spec.name]
            if pins is not None:
                pins.unpin_prefix(spec.name, tag)
            return last
    if adopt and pins is not None:
        _adopt_links(loaded, spec.name, usable, pins, tag)
        try:
            _load_uprobes(loaded, spec, obj, tag, adopt=True)
        except BpfSyscallError as e:
            for st in usable:
                st.attached, st.reason = False, str(e)
        if all(st.attached for st in usable):
            loaded.adopted.add(spec.name)
            loaded.builds[spec.name] = variant.describe()
            return True
        # Some pin is missing or stale: start this program afresh.
        log.warning(
            "cannot take over the pinned %s programs in %s (%s): starting them afresh, their counts since "
            "the last poll are lost",
            spec.name,
            pins.dir,
            next((st.reason for st in usable if st.reason), "?"),
        )
        loaded.close_tp_btf_links()
        loaded.unmap_socket_slots(spec.name)
        del loaded.pinned_maps[spec.name]
        for st in usable:
            st.attached, st.reason = False, ""
        obj.cleanup()
        pins.unpin_prefix(spec.name, tag)
        obj = bpf_class(
            src_file=str(spec.source).encode(), cflags=cflags + pins.cflags(spec.name, tag), debug=debug
        )
        loaded.objects[spec.name] = obj
        if variant.tp_btf:
            _map_socket_slots(loaded, spec, obj)
    try:
        _fill_tail_calls(loaded, btf, spec, obj, variant)
        _load_uprobes(loaded, spec, obj, tag, adopt=False)
    except Exception as e:
        for st in usable:
            st.reason = f"tail-called program: {e}"
        loaded.unmap_socket_slots(spec.name)
        obj.cleanup()
        del loaded.objects[spec.name]
        if pins is not None:
            pins.unpin_prefix(spec.name, tag)
        return last
    if before_attach is not None:
        before_attach(spec.name, obj)
    for st in usable:
        try:
            if variant.tp_btf:
                _attach_tp_btf(loaded, btf, obj, st)
            else:
                tp, fn = st.hook.tracepoint.encode(), st.hook.function.encode()
                with _captured_stderr():
                    obj.attach_raw_tracepoint(tp=tp, fn_name=fn)
            st.attached = True
            if pins is not None:
                _pin_link(loaded, obj, st, pins, spec.name, tag)
        except Exception as e:
            kind = "tp_btf" if variant.tp_btf else "raw tracepoint"
            st.reason = f"attach to {kind} {st.hook.tracepoint} failed: {e}"
    failed = [st for st in usable if st.hook.required and not st.attached]
    if all(st.attached for st in usable) or (last and not failed):
        loaded.builds[spec.name] = variant.describe()
        return True
    loaded.close_tp_btf([st.hook.label for st in usable])
    loaded.unmap_socket_slots(spec.name)
    obj.cleanup()
    del loaded.objects[spec.name]
    if pins is not None:
        pins.unpin_prefix(spec.name, tag)
    for st in statuses:
        st.attached = False
        if failed:
            st.reason = st.reason or f"needs {failed[0].hook.tracepoint}: {failed[0].reason}"
    return last


def _pin_link(loaded: LoadedPrograms, obj: Any, st: HookStatus, pins: Pins, program: str, tag: str) -> None:
    """Pin a hook's attachment so that it outlives this process, and its program so that
    the next exporter can read its statistics (BPF_PROG_GET_FD_BY_ID needs CAP_SYS_ADMIN)."""
    fds = loaded.tp_btf.get(st.hook.label)
    prog_fd: int | None
    link_fd: int | None
    if fds is not None:
        prog_fd, link_fd = fds
    else:
        link_fd = obj.raw_tracepoint_fds.get(st.hook.tracepoint.encode())
        fn = obj.funcs.get(st.hook.function.encode())
        prog_fd = fn.fd if fn is not None else None
    if link_fd is None or prog_fd is None:
        raise BpfSyscallError(f"no link to pin for {st.hook.tracepoint}")
    obj_pin(prog_fd, pins.prog_path(program, tag, st.hook.label))
    obj_pin(link_fd, pins.link_path(program, tag, st.hook.label))


def _adopt_links(
    loaded: LoadedPrograms, program: str, usable: list[HookStatus], pins: Pins, tag: str
) -> None:
    """Take over the pinned attachments of a previous exporter's identical programs."""
    for st in usable:
        try:
            link_fd = obj_get(pins.link_path(program, tag, st.hook.label))
        except OSError as e:
            st.reason = f"pinned link of {st.hook.tracepoint} unusable: {e.strerror}"
            continue
        try:
            prog_fd = obj_get(pins.prog_path(program, tag, st.hook.label))
        except OSError:
            try:
                prog_fd = prog_fd_by_id(link_prog_id(link_fd))
            except OSError as e:
                os.close(link_fd)
                st.reason = f"pinned program of {st.hook.tracepoint} unusable: {e.strerror}"
                continue
        loaded.links[st.hook.label] = (prog_fd, link_fd)
        st.attached = True


def _warn_fallback(loaded: LoadedPrograms, program: str) -> None:
    """A build that is not the first choice never runs silently: say what was passed over
    and why (the first choice is the cheapest per event)."""
    passed = loaded.passed_over.get(program)
    how = loaded.builds.get(program)
    if not passed or how is None:
        return
    log.warning(
        "program %s runs as %s, not the preferred build: %s; see 'podnet-exporter doctor'",
        program,
        how,
        "; ".join(passed),
    )


def state_digest(offsets: Offsets, sizes: MapSizes, requests: RequestMode, tls: TlsMode = "off") -> str:
    """What pinned state must match to be reused (exporter.kernel.pins)."""
    sources = [p for p in BPF_DIR.iterdir() if p.suffix in (".c", ".h")]
    return build_digest(
        sources, [*offsets.cflags(), *sizes.cflags(), *syscall_cflags(), f"requests={requests}", f"tls={tls}"]
    )


def load_programs(
    btf: Btf,
    offsets: Offsets,
    sizes: MapSizes,
    specs: Sequence[ProgramSpec] = PROGRAMS,
    debug: int = 0,
    requests: RequestMode = "http",
    tp_btf: bool = True,
    kernel_headers: str | None = None,
    tls: TlsMode = "off",
    pins: Pins | None = None,
    before_attach: Callable[[str, Any], None] | None = None,
) -> LoadedPrograms:
    """`requests` is a Config.requests mode: "turns" builds the hot path without reading
    payloads, "off" without request tracking (no clock read per event); `tp_btf=False`
    forces the raw-tracepoint build. `kernel_headers` is Config.kernel_headers: BCC is
    pointed at the first usable headers tree (headers.find_tree) before anything
    compiles, because libbcc crashes on a tree it cannot use."""
    headers = find_tree(kernel_headers)
    if not headers.ok:
        raise ProgramLoadError(headers.reason)
    headers.use()
    from bcc import BPF  # imported late: `doctor` must work where BCC is missing

    loaded = LoadedPrograms(headers=headers.detail, pins=pins)
    for spec in specs:
        statuses = [HookStatus(spec.name, h) for h in spec.hooks]
        loaded.hooks.extend(statuses)
        missing = [offsets.missing[m] for m in spec.fields if m in offsets.missing]
        if missing:
            for st in statuses:
                st.reason = missing[0]
            continue
        nargs: dict[str, int] = {}
        for st in statuses:
            why, n = check_hook(btf, st.hook)
            nargs[st.hook.tracepoint] = n
            if why:
                st.reason = why
        broken = [st for st in statuses if st.reason and st.hook.required]
        if broken:
            for st in statuses:
                st.reason = st.reason or f"needs {broken[0].hook.tracepoint}: {broken[0].reason}"
            continue
        usable = [st for st in statuses if not st.reason]
        if not usable:
            continue
        base = program_cflags(spec, offsets, sizes, nargs)
        tries = [v for v in variants(spec, requests, tls) if tp_btf or not v.tp_btf]
        old = pins.adopted(spec.name) if pins is not None else None
        # The build a previous exporter left attached goes first: adopting it keeps counting
        # without a gap; any other build's pins are removed below, detaching it.
        tries.sort(key=lambda v: variant_tag(v.cflags) != old)
        for i, variant in enumerate(tries):
            for st in usable:
                st.reason, st.attached = "", False
            last = i == len(tries) - 1
            flags = base + list(variant.cflags)
            if _compile_and_attach(
                loaded, btf, spec, statuses, usable, flags, variant, debug, BPF, last, before_attach
            ):
                break
            why = next((st.reason for st in usable if st.reason), "no reason given")
            loaded.passed_over.setdefault(spec.name, []).append(f"{variant.describe()}: {why}")
        used = loaded.variant_tags.get(spec.name)
        if pins is not None and old is not None and used != old:
            pins.unpin_prefix(spec.name, old)
        _warn_fallback(loaded, spec.name)
    for st in loaded.hooks:
        if not st.attached:
            log.warning(
                "program %s/%s unavailable: %s; metrics affected: %s",
                st.program,
                st.hook.tracepoint,
                st.reason,
                ", ".join(next(s.metrics for s in specs if s.name == st.program)),
            )
    if not any(st.attached for st in loaded.hooks):
        reasons = sorted({st.reason for st in loaded.hooks})
        loaded.close()
        raise ProgramLoadError(
            f"no eBPF program could be attached: {reasons[0] if reasons else 'no programs'}"
        )
    return loaded
