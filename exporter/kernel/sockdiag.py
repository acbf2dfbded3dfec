"""The TCP connections that already exist, from NETLINK_SOCK_DIAG, in every network namespace.

podnet counts a connection active from the moment it reaches ESTABLISHED until it reaches CLOSE
(bpf/tcp_state.bpf.c). Connections opened before podnet started were never seen reaching
ESTABLISHED, so at start-up this module lists them, for the counter to start from the truth.

Blocking code, standard library and ctypes only. Parsing is kept in pure functions over bytes
(build_request, parse_messages, parse_diag_msg, classify) so tests can feed crafted buffers.

States: a socket is listed when it is in ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK
or CLOSING: every state a full socket passes through between ESTABLISHED and CLOSE. Not listed:
SYN_SENT / SYN_RECV / NEW_SYN_RECV (not yet established), LISTEN, CLOSE, and TIME_WAIT (the full
socket has already gone through CLOSE when the kernel hands it over to a time-wait mini socket).

Direction: the kernel does not say whether a socket was accepted or connected. A socket is called
inbound when its local port is the port of a LISTEN socket in the same network namespace bound to
the socket's local address or to a wildcard (0.0.0.0 for IPv4; :: for IPv6, which also covers
v4-mapped addresses unless the listener is IPV6_V6ONLY). Known limits:
- a client socket whose source port happens to be a listening port (bind() with SO_REUSEADDR /
  SO_REUSEPORT, or a port reused after the listener closed) is misread as inbound;
- an accepted socket whose listener has been closed is read as outbound;
- listeners bound to a device (SO_BINDTODEVICE) or in a VRF are matched by address and port only.

Namespaces are found through /proc/<pid>/ns/net (one path per namespace) and, for namespaces that
no process is in, through nsfs bind mounts visible in /proc/self/mountinfo (e.g. /run/netns/<name>).
A namespace pinned only by an open file descriptor of some process is not found.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as errno_mod
import os
import re
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# --- netlink / sock_diag constants (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h) -----
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x01
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
INET_DIAG_SKV6ONLY = 11
INET_DIAG_CGROUP_ID = 21  # u64, kernel >= 5.7 with CONFIG_SOCK_CGROUP_DATA, sent with every message

TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11

ACTIVE_STATES = frozenset(
    {TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING}
)
DUMP_STATES = sum(1 << s for s in ACTIVE_STATES | {TCP_LISTEN})

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_sockid: __be16 sport, __be16 dport, __be32 src[4], __be32 dst[4], __u32 if, __u32 cookie[2]
_SOCKID = struct.Struct("=2s2s16s16sIII")
_REQ_HEAD = struct.Struct("=BBBBI")  # inet_diag_req_v2: family, protocol, ext, pad, states
# inet_diag_msg: family, state, timer, retrans, id, expires, rqueue, wqueue, uid, inode
_DIAG_MSG = struct.Struct("=BBBB48sIIIII")
_RTATTR = struct.Struct("=HH")
_NLMSG_ERR_CODE = struct.Struct("=i")
_RECV_BUFSIZE = 1 << 18
_RECV_TIMEOUT = 10.0
_DUMP_TRIES = 3
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_CLONE_NEWNET = 0x40000000
_THREAD_NETNS = "/proc/thread-self/ns/net"

assert _SOCKID.size == 48 and _DIAG_MSG.size == 72 and _REQ_HEAD.size + _SOCKID.size == 56


@dataclass(frozen=True)
class TcpSocket:
    cookie: int  # inet_diag_msg.id.idiag_cookie as one u64 (cookie[0] | cookie[1] << 32)
    cgroup_id: int  # INET_DIAG_CGROUP_ID attribute (0 if the kernel does not send it)
    inbound: bool  # accepted from a listener in the same netns (see the module docstring)
    netns: int  # inode of the network namespace


class SockDiagError(Exception):
    """One line naming the namespace path and the errno."""

    def __init__(self, netns_path: str | None, what: str, err: int) -> None:
        where = netns_path if netns_path is not None else "own netns"
        name = errno_mod.errorcode.get(err, "?")
        super().__init__(f"sock_diag {where}: {what}: {os.strerror(err)} (errno {err} {name})")
        self.netns_path = netns_path
        self.errno = err


class NetlinkParseError(ValueError):
    """A reply that does not parse, or an NLMSG_ERROR / failed NLMSG_DONE (errno > 0 then)."""

    def __init__(self, message: str, err: int = errno_mod.EBADMSG) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class DiagMsg:
    """One inet_diag_msg, as much as this module needs."""

    family: int
    state: int
    sport: int
    dport: int
    src: bytes  # 4 bytes (AF_INET) or 16 (AF_INET6)
    dst: bytes
    ifindex: int
    cookie: int
    inode: int
    cgroup_id: int  # 0 when the attribute is absent
    v6only: bool | None  # INET_DIAG_SKV6ONLY (sent for AF_INET6 listeners); None when absent


@dataclass
class ParsedReply:
    """What one recv() buffer held."""

    messages: list[DiagMsg]
    done: bool  # NLMSG_DONE seen: the dump is complete
    interrupted: bool  # some message had NLM_F_DUMP_INTR: the dump may be inconsistent


# --- pure functions ------------------------------------------------------------------------------


def build_request(family: int, seq: int, states: int = DUMP_STATES) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request (nlmsghdr + inet_diag_req_v2) for TCP sockets of `family`."""
    body = _REQ_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0, states) + bytes(_SOCKID.size)
    hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return hdr + body


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_attrs(buf: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each rtattr in `buf`; raises NetlinkParseError on a truncated one."""
    off = 0
    while off + _RTATTR.size <= len(buf):
        length, typ = _RTATTR.unpack_from(buf, off)
        if length < _RTATTR.size or off + length > len(buf):
            raise NetlinkParseError(f"truncated attribute (type {typ}, length {length}) at offset {off}")
        yield typ & 0x3FFF, buf[off + _RTATTR.size : off + length]  # drop NLA_F_NESTED/BYTEORDER
        off += _align4(length)


def parse_diag_msg(payload: bytes) -> DiagMsg:
    """Parse the payload of one SOCK_DIAG_BY_FAMILY message (inet_diag_msg + attributes)."""
    if len(payload) < _DIAG_MSG.size:
        raise NetlinkParseError(f"inet_diag_msg truncated: {len(payload)} < {_DIAG_MSG.size} bytes")
    family, state, _timer, _retrans, sockid, _exp, _rq, _wq, _uid, inode = _DIAG_MSG.unpack_from(payload)
    sport, dport, src, dst, ifindex, c0, c1 = _SOCKID.unpack(sockid)
    if family == socket.AF_INET:
        src, dst = src[:4], dst[:4]
    elif family != socket.AF_INET6:
        raise NetlinkParseError(f"inet_diag_msg of unexpected family {family}")
    cgroup_id = 0
    v6only: bool | None = None
    for typ, data in parse_attrs(payload[_DIAG_MSG.size :]):
        if typ == INET_DIAG_CGROUP_ID:
            if len(data) < 8:
                raise NetlinkParseError(f"INET_DIAG_CGROUP_ID of {len(data)} bytes")
            (cgroup_id,) = struct.unpack_from("=Q", data)
        elif typ == INET_DIAG_SKV6ONLY and data:
            v6only = bool(data[0])
    return DiagMsg(
        family=family,
        state=state,
        sport=int.from_bytes(sport, "big"),
        dport=int.from_bytes(dport, "big"),
        src=src,
        dst=dst,
        ifindex=ifindex,
        cookie=c0 | (c1 << 32),
        inode=inode,
        cgroup_id=cgroup_id,
        v6only=v6only,
    )


def parse_messages(buf: bytes, seq: int | None = None) -> ParsedReply:
    """Parse one netlink receive buffer (possibly several messages). Messages of another sequence
    number are skipped when `seq` is given. Raises NetlinkParseError on a truncated message, on
    NLMSG_ERROR with a non-zero code and on an NLMSG_DONE that carries an error (errno set)."""
    out = ParsedReply([], False, False)
    off = 0
    while off < len(buf):
        if len(buf) - off < _NLMSGHDR.size:
            raise NetlinkParseError(f"truncated netlink header: {len(buf) - off} bytes at offset {off}")
        length, typ, flags, mseq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size or off + length > len(buf):
            raise NetlinkParseError(
                f"truncated netlink message: length {length} at offset {off} of a {len(buf)}-byte buffer"
            )
        payload = buf[off + _NLMSGHDR.size : off + length]
        off += _align4(length)
        if seq is not None and mseq != seq:
            continue
        if flags & NLM_F_DUMP_INTR:
            out.interrupted = True
        if typ == NLMSG_ERROR:
            if len(payload) < _NLMSG_ERR_CODE.size:
                raise NetlinkParseError("truncated NLMSG_ERROR")
            (code,) = _NLMSG_ERR_CODE.unpack_from(payload)
            if code == 0:  # an ACK
                continue
            raise NetlinkParseError(f"NLMSG_ERROR {code}", -code if code < 0 else code)
        if typ == NLMSG_DONE:
            if len(payload) >= _NLMSG_ERR_CODE.size:
                (code,) = _NLMSG_ERR_CODE.unpack_from(payload)
                if code < 0:
                    raise NetlinkParseError(f"dump ended with error {code}", -code)
            out.done = True
            return out
        if typ in (NLMSG_NOOP, NLMSG_OVERRUN):
            continue
        if typ != SOCK_DIAG_BY_FAMILY:
            raise NetlinkParseError(f"unexpected netlink message type {typ}")
        out.messages.append(parse_diag_msg(payload))
    return out


def _as_v6(family: int, addr: bytes) -> bytes:
    return _V4_MAPPED + addr if family == socket.AF_INET else addr


def classify(messages: Iterable[DiagMsg], netns: int) -> list[TcpSocket]:
    """The active (non-listening) sockets of one namespace's dump, with their direction.

    `messages` must hold the LISTEN sockets of both families of that namespace as well."""
    msgs = list(messages)
    # (port, 16-byte address) of specific listeners; ports of wildcard listeners
    exact: set[tuple[int, bytes]] = set()
    wild_v4: set[int] = set()  # 0.0.0.0, or :: when it is dual-stack (matches v4-mapped)
    wild_v6: set[int] = set()  # ::
    for m in msgs:
        if m.state != TCP_LISTEN:
            continue
        if m.family == socket.AF_INET:
            if m.src == bytes(4):
                wild_v4.add(m.sport)
            else:
                exact.add((m.sport, _as_v6(m.family, m.src)))
        elif m.src == bytes(16):
            wild_v6.add(m.sport)
            if not m.v6only:
                wild_v4.add(m.sport)
        else:
            exact.add((m.sport, m.src))
    out: list[TcpSocket] = []
    for m in msgs:
        if m.state not in ACTIVE_STATES:
            continue
        local = _as_v6(m.family, m.src)
        mapped = local.startswith(_V4_MAPPED)
        inbound = (m.sport, local) in exact or m.sport in (wild_v4 if mapped else wild_v6)
        out.append(TcpSocket(cookie=m.cookie, cgroup_id=m.cgroup_id, inbound=inbound, netns=netns))
    return out


# --- namespaces ----------------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _setns(fd: int, nstype: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _unescape_mount(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def network_namespaces(proc: str = "/proc") -> dict[int, str]:
    """netns inode -> a path to open it (/proc/<pid>/ns/net), one per namespace, this process's own
    included. Namespaces no process is in are added from nsfs bind mounts (e.g. /run/netns/<name>)
    in {proc}/self/mountinfo. Processes that exit meanwhile, or that cannot be inspected, are skipped."""
    found: dict[int, str] = {}
    own = str(os.getpid())
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        pids = []
    pids.sort(key=lambda p: (p != own, int(p)))  # own first, so its path is ours
    if own not in pids:
        pids.insert(0, own)
    for pid in pids:
        path = os.path.join(proc, pid, "ns", "net")
        try:
            ino = os.stat(path).st_ino
        except OSError:  # exited, a kernel thread without namespaces, or not ours to see
            continue
        found.setdefault(ino, path)
    try:
        with open(os.path.join(proc, "self", "mountinfo"), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split(" ")
        if not sep or len(fields) < 5 or right.split(" ", 1)[0] != "nsfs":
            continue
        m = re.fullmatch(r"net:\[(\d+)\]", fields[3])
        if m and int(m.group(1)) not in found:
            mount_point = _unescape_mount(fields[4])
            with contextlib.suppress(OSError):
                if os.stat(mount_point).st_ino == int(m.group(1)):
                    found[int(m.group(1))] = mount_point
    return found


def _open_diag_socket(netns_path: str | None) -> tuple[socket.socket, int]:
    """A NETLINK_SOCK_DIAG socket created in the namespace at `netns_path` (None: the calling
    thread's), and that namespace's inode. The calling thread is in the target namespace only
    between the two setns() calls, and is always put back (SockDiagError if even that fails)."""
    if netns_path is None:
        ino = os.stat(_THREAD_NETNS).st_ino
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG), ino
        except OSError as e:
            raise SockDiagError(None, "socket(AF_NETLINK)", e.errno or errno_mod.EIO) from e
    try:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SockDiagError(netns_path, "open", e.errno or errno_mod.EIO) from e
    try:
        ino = os.fstat(target).st_ino
        try:
            orig = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SockDiagError(netns_path, f"open {_THREAD_NETNS}", e.errno or errno_mod.EIO) from e
        try:
            if os.fstat(orig).st_ino == ino:  # already there: no setns needed
                try:
                    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG), ino
                except OSError as e:
                    raise SockDiagError(netns_path, "socket(AF_NETLINK)", e.errno or errno_mod.EIO) from e
            try:
                _setns(target, _CLONE_NEWNET)
            except OSError as e:
                raise SockDiagError(netns_path, "setns", e.errno or errno_mod.EIO) from e
            failure: SockDiagError | None = None
            sock: socket.socket | None = None
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
            except OSError as e:
                failure = SockDiagError(netns_path, "socket(AF_NETLINK)", e.errno or errno_mod.EIO)
            finally:
                try:
                    _setns(orig, _CLONE_NEWNET)
                except OSError as e:
                    if sock is not None:
                        sock.close()
                    # The thread is stranded in another namespace: nothing it does next is right.
                    raise SockDiagError(
                        netns_path, "setns back to the original netns", e.errno or errno_mod.EIO
                    ) from e
            if failure is not None:
                raise failure
            assert sock is not None
            return sock, ino
        finally:
            os.close(orig)
    finally:
        os.close(target)


def _dump(sock: socket.socket, family: int, seq: int) -> tuple[list[DiagMsg], bool]:
    """All messages of one family's dump, and whether the kernel flagged it interrupted."""
    sock.sendto(build_request(family, seq), (0, 0))
    msgs: list[DiagMsg] = []
    interrupted = False
    while True:
        data, _anc, flags, _addr = sock.recvmsg(_RECV_BUFSIZE)
        if flags & socket.MSG_TRUNC:
            raise NetlinkParseError(f"netlink reply larger than {_RECV_BUFSIZE} bytes", errno_mod.EMSGSIZE)
        if not data:
            raise NetlinkParseError("netlink socket closed mid-dump", errno_mod.EPIPE)
        reply = parse_messages(data, seq)
        msgs.extend(reply.messages)
        interrupted = interrupted or reply.interrupted
        if reply.done:
            return msgs, interrupted


def established_sockets(netns_path: str | None = None) -> list[TcpSocket]:
    """Established TCP sockets (ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING:
    see the module docstring) of one netns (None: the caller's), IPv4 and IPv6. Enters the netns on
    the calling thread only for as long as it takes to open the netlink socket, and always returns
    the thread to its original netns (even on error). Raises SockDiagError on failure."""
    return _read_netns(netns_path)[1]


def _read_netns(netns_path: str | None) -> tuple[int, list[TcpSocket]]:
    """established_sockets(), plus the inode of the namespace actually read."""
    sock, ino = _open_diag_socket(netns_path)
    with sock:
        try:
            sock.settimeout(_RECV_TIMEOUT)
            seq = 1
            for _ in range(_DUMP_TRIES):
                msgs: list[DiagMsg] = []
                interrupted = False
                for family in (socket.AF_INET, socket.AF_INET6):
                    part, intr = _dump(sock, family, seq)
                    seq += 1
                    msgs.extend(part)
                    interrupted = interrupted or intr
                if not interrupted:
                    break
            return ino, classify(msgs, ino)
        except NetlinkParseError as e:
            raise SockDiagError(netns_path, str(e), e.errno) from e
        except TimeoutError as e:
            raise SockDiagError(netns_path, "no netlink reply", errno_mod.ETIMEDOUT) from e
        except OSError as e:
            raise SockDiagError(netns_path, "netlink", e.errno or errno_mod.EIO) from e


def all_established(proc: str = "/proc") -> tuple[list[TcpSocket], list[str]]:
    """Every netns's sockets, plus one error line per namespace that could not be read (a process
    that exited, or a namespace that went away, is not an error)."""
    sockets: list[TcpSocket] = []
    errors: list[str] = []
    try:
        own = os.stat(_THREAD_NETNS).st_ino
    except OSError:
        own = -1
    seen: set[int] = set()
    for ino, path in network_namespaces(proc).items():
        try:
            real, found = _read_netns(None if ino == own else path)
        except SockDiagError as e:
            if e.errno in (errno_mod.ENOENT, errno_mod.ESRCH):
                continue
            errors.append(str(e))
            continue
        if real in seen:  # a pid reused since the listing led to a namespace read already
            continue
        seen.add(real)
        sockets.extend(found)
    return sockets, errors
