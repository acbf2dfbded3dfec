"""sock_diag parsing and direction, on crafted netlink buffers (no kernel needed)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from pathlib import Path

import pytest

from exporter.kernel import sockdiag as sd
from exporter.kernel.sockdiag import DiagMsg, NetlinkParseError, SockDiagError, TcpSocket

SEQ = 7
EST, LISTEN, TW, CW = sd.TCP_ESTABLISHED, sd.TCP_LISTEN, sd.TCP_TIME_WAIT, sd.TCP_CLOSE_WAIT


def attr(typ: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), typ) + data
    return raw + bytes(-len(raw) % 4)


def diag_payload(
    src: str,
    sport: int,
    dst: str = "0.0.0.0",
    dport: int = 0,
    state: int = EST,
    cookie: int = 0x1_0000_0002,
    cgroup: int | None = 4242,
    extra: bytes = b"",
) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = socket.AF_INET if a.version == 4 else socket.AF_INET6
    sockid = struct.pack(
        "=HH16s16sIII",
        socket.htons(sport),
        socket.htons(dport),
        a.packed.ljust(16, b"\0"),
        b.packed.ljust(16, b"\0"),
        3,
        cookie & 0xFFFFFFFF,
        cookie >> 32,
    )
    head = struct.pack("=BBBB", family, state, 0, 0) + sockid + struct.pack("=IIIII", 0, 0, 0, 1000, 99)
    attrs = extra + (attr(sd.INET_DIAG_CGROUP_ID, struct.pack("=Q", cgroup)) if cgroup is not None else b"")
    return head + attrs


def nlmsg(typ: int, payload: bytes, seq: int = SEQ, flags: int = 2) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(payload), typ, flags, seq, 0) + payload
    return raw + bytes(-len(raw) % 4)


def diag(payload: bytes, **kw: int) -> bytes:
    return nlmsg(sd.SOCK_DIAG_BY_FAMILY, payload, **kw)


DONE = nlmsg(sd.NLMSG_DONE, struct.pack("=i", 0))


def test_build_request() -> None:
    req = sd.build_request(socket.AF_INET6, SEQ)
    assert len(req) == 16 + 56
    length, typ, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, typ, flags, seq, pid) == (72, 20, 0x301, SEQ, 0)
    family, proto, ext, pad, states = struct.unpack_from("=BBBBI", req, 16)
    assert (family, proto, ext, pad) == (socket.AF_INET6, socket.IPPROTO_TCP, 0, 0)
    wanted = {1, 4, 5, 8, 9, 10, 11}  # ESTABLISHED..CLOSING except TIME_WAIT/CLOSE, plus LISTEN
    assert {s for s in range(32) if states & (1 << s)} == wanted
    assert req[24:] == bytes(48)


V6_MSG = diag_payload("2001:db8::1", 443, "2001:db8::2", 5555, cookie=0xDEAD_BEEF_0000_0001, cgroup=77)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(
            diag_payload("10.0.0.1", 8080, "10.0.0.2", 40000),
            DiagMsg(socket.AF_INET, EST, 8080, 40000, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 3,
                    0x1_0000_0002, 99, 4242, None),
            id="v4",
        ),
        pytest.param(
            V6_MSG,
            DiagMsg(socket.AF_INET6, EST, 443, 5555, ipaddress.ip_address("2001:db8::1").packed,
                    ipaddress.ip_address("2001:db8::2").packed, 3, 0xDEAD_BEEF_0000_0001, 99, 77, None),
            id="v6",
        ),
        pytest.param(
            diag_payload("10.0.0.1", 1, cgroup=None),
            DiagMsg(socket.AF_INET, EST, 1, 0, bytes([10, 0, 0, 1]), bytes(4), 3, 0x1_0000_0002, 99, 0, None),
            id="missing-cgroup-attribute",
        ),
        pytest.param(
            diag_payload("::", 80, "::", 0, state=LISTEN, cgroup=5,
                         extra=attr(sd.INET_DIAG_SKV6ONLY, b"\x01") + attr(14, b"") + attr(99, b"xyz")),
            DiagMsg(socket.AF_INET6, LISTEN, 80, 0, bytes(16), bytes(16), 3, 0x1_0000_0002, 99, 5, True),
            id="v6only-pad-and-unknown-attributes",
        ),
    ],
)  # fmt: skip
def test_parse_diag_msg(payload: bytes, expected: DiagMsg) -> None:
    assert sd.parse_diag_msg(payload) == expected


@pytest.mark.parametrize(
    ("buf", "n_msgs", "done", "interrupted"),
    [
        pytest.param(diag(diag_payload("10.0.0.1", 1)) + diag(V6_MSG) + DONE, 2, True, False, id="two+done"),
        pytest.param(
            diag(diag_payload("10.0.0.1", 1)) + diag(V6_MSG), 2, False, False, id="multipart-no-done"
        ),
        pytest.param(DONE, 0, True, False, id="empty-dump"),
        pytest.param(nlmsg(sd.NLMSG_DONE, b""), 0, True, False, id="done-without-payload"),
        pytest.param(diag(V6_MSG, seq=SEQ + 1) + DONE, 0, True, False, id="other-seq-skipped"),
        pytest.param(diag(V6_MSG, seq=SEQ + 1), 0, False, False, id="other-seq-done-not-ours"),
        pytest.param(
            nlmsg(sd.NLMSG_ERROR, struct.pack("=i", 0) + bytes(16)) + DONE, 0, True, False, id="ack"
        ),
        pytest.param(nlmsg(sd.NLMSG_NOOP, b"") + diag(V6_MSG) + DONE, 1, True, False, id="noop"),
        pytest.param(diag(V6_MSG, flags=2 | sd.NLM_F_DUMP_INTR) + DONE, 1, True, True, id="dump-interrupted"),
        pytest.param(b"", 0, False, False, id="empty-buffer"),
    ],
)
def test_parse_messages(buf: bytes, n_msgs: int, done: bool, interrupted: bool) -> None:
    reply = sd.parse_messages(buf, SEQ)
    assert (len(reply.messages), reply.done, reply.interrupted) == (n_msgs, done, interrupted)


def test_parse_messages_stops_at_done() -> None:
    reply = sd.parse_messages(diag(V6_MSG) + DONE + b"garbage that is never read")
    assert reply.done and len(reply.messages) == 1


_GOOD = diag(diag_payload("10.0.0.1", 1))


@pytest.mark.parametrize(
    ("buf", "err", "text"),
    [
        pytest.param(nlmsg(sd.NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + bytes(16)), errno.EPERM,
                     "NLMSG_ERROR", id="nlmsg-error"),
        pytest.param(_GOOD + nlmsg(sd.NLMSG_ERROR, struct.pack("=i", -errno.ENOENT)), errno.ENOENT,
                     "NLMSG_ERROR", id="error-after-data"),
        pytest.param(nlmsg(sd.NLMSG_ERROR, b"\x01"), errno.EBADMSG, "truncated NLMSG_ERROR",
                     id="short-error"),
        pytest.param(nlmsg(sd.NLMSG_DONE, struct.pack("=i", -errno.EINTR)), errno.EINTR, "dump ended",
                     id="done-with-error"),
        pytest.param(_GOOD[:10], errno.EBADMSG, "truncated netlink header", id="truncated-header"),
        pytest.param(_GOOD[:-4], errno.EBADMSG, "truncated netlink message", id="truncated-message"),
        pytest.param(_GOOD + _GOOD[:20], errno.EBADMSG, "truncated netlink message", id="truncated-second"),
        pytest.param(struct.pack("=IHHII", 8, 20, 2, SEQ, 0), errno.EBADMSG, "truncated netlink message",
                     id="length-below-header"),
        pytest.param(diag(diag_payload("10.0.0.1", 1)[:60]), errno.EBADMSG, "inet_diag_msg truncated",
                     id="truncated-diag-msg"),
        pytest.param(diag(diag_payload("10.0.0.1", 1, cgroup=None) + struct.pack("=HH", 12, 21) + b"\0" * 4),
                     errno.EBADMSG, "truncated attribute", id="truncated-attribute"),
        pytest.param(diag(diag_payload("10.0.0.1", 1, cgroup=None) + attr(sd.INET_DIAG_CGROUP_ID, b"1234")),
                     errno.EBADMSG, "INET_DIAG_CGROUP_ID of 4 bytes", id="short-cgroup-attribute"),
        pytest.param(nlmsg(77, b""), errno.EBADMSG, "unexpected netlink message type 77", id="unknown-type"),
        pytest.param(diag(b"\x01" + diag_payload("10.0.0.1", 1)[1:]), errno.EBADMSG, "unexpected family 1",
                     id="unknown-family"),
    ],
)  # fmt: skip
def test_parse_messages_errors(buf: bytes, err: int, text: str) -> None:
    with pytest.raises(NetlinkParseError, match=text) as info:
        sd.parse_messages(buf, SEQ)
    assert info.value.errno == err


def _listener(addr: str, port: int, v6only: bool | None = None) -> bytes:
    extra = attr(sd.INET_DIAG_SKV6ONLY, bytes([v6only])) if v6only is not None else b""
    return diag_payload(addr, port, state=LISTEN, cookie=1, extra=extra)


# (listeners, socket local address, local port, state) -> expected: None (not listed) or inbound
@pytest.mark.parametrize(
    ("listeners", "local", "port", "state", "expected"),
    [
        pytest.param([], "10.0.0.1", 80, EST, False, id="no-listener-outbound"),
        pytest.param([("0.0.0.0", 80)], "10.0.0.1", 80, EST, True, id="v4-wildcard"),
        pytest.param([("0.0.0.0", 81)], "10.0.0.1", 80, EST, False, id="other-port"),
        pytest.param([("10.0.0.1", 80)], "10.0.0.1", 80, EST, True, id="v4-exact"),
        pytest.param([("127.0.0.1", 80)], "10.0.0.1", 80, EST, False, id="v4-other-address"),
        pytest.param([("0.0.0.0", 80)], "2001:db8::1", 80, EST, False, id="v4-wildcard-not-v6"),
        pytest.param([("::", 80)], "2001:db8::1", 80, EST, True, id="v6-wildcard"),
        pytest.param([("::", 80, False)], "::ffff:10.0.0.1", 80, EST, True, id="dual-stack-v4-mapped"),
        pytest.param([("::", 80, True)], "::ffff:10.0.0.1", 80, EST, False, id="v6only-not-v4-mapped"),
        pytest.param([("::", 80, True)], "2001:db8::1", 80, EST, True, id="v6only-v6"),
        pytest.param([("::", 80, False)], "10.0.0.1", 80, EST, True, id="dual-stack-v4-socket"),
        pytest.param([("::ffff:10.0.0.1", 80)], "::ffff:10.0.0.1", 80, EST, True, id="v4-mapped-exact"),
        pytest.param([("::1", 80)], "::1", 80, EST, True, id="v6-exact"),
        pytest.param([("::1", 80)], "2001:db8::1", 80, EST, False, id="v6-other-address"),
        pytest.param([("0.0.0.0", 80)], "10.0.0.1", 80, CW, True, id="close-wait-listed"),
        pytest.param([], "10.0.0.1", 80, sd.TCP_FIN_WAIT2, False, id="fin-wait2-listed"),
        pytest.param([], "10.0.0.1", 80, sd.TCP_LAST_ACK, False, id="last-ack-listed"),
        pytest.param([("0.0.0.0", 80)], "10.0.0.1", 80, TW, None, id="time-wait-not-listed"),
        pytest.param([], "10.0.0.1", 80, sd.TCP_SYN_SENT, None, id="syn-sent-not-listed"),
        pytest.param([], "10.0.0.1", 80, sd.TCP_CLOSE, None, id="close-not-listed"),
    ],
)
def test_classify(
    listeners: list[tuple[str, int] | tuple[str, int, bool]],
    local: str,
    port: int,
    state: int,
    expected: bool | None,
) -> None:
    msgs = [sd.parse_diag_msg(_listener(*lst)) for lst in listeners]
    peer = "10.9.9.9" if ipaddress.ip_address(local).version == 4 else "2001:db8::9"
    msgs.append(sd.parse_diag_msg(diag_payload(local, port, peer, 5000, state=state, cookie=55, cgroup=9)))
    got = sd.classify(msgs, netns=123)
    if expected is None:
        assert got == []
    else:
        assert got == [TcpSocket(cookie=55, cgroup_id=9, inbound=expected, netns=123)]


def test_classify_listener_in_both_families_of_one_dump() -> None:
    """A v4 listener's port makes only v4 sockets inbound, a v6only one's only v6 sockets."""
    msgs = [
        sd.parse_diag_msg(_listener("0.0.0.0", 80)),
        sd.parse_diag_msg(_listener("::", 443, True)),
        sd.parse_diag_msg(diag_payload("10.0.0.1", 80, "10.0.0.2", 1, cookie=1)),
        sd.parse_diag_msg(diag_payload("10.0.0.1", 443, "10.0.0.2", 2, cookie=2)),
        sd.parse_diag_msg(diag_payload("2001:db8::1", 443, "2001:db8::2", 3, cookie=3)),
        sd.parse_diag_msg(diag_payload("2001:db8::1", 80, "2001:db8::2", 4, cookie=4)),
    ]
    assert {s.cookie: s.inbound for s in sd.classify(msgs, 1)} == {1: True, 2: False, 3: True, 4: False}


def test_error_is_one_line_with_path_and_errno() -> None:
    e = SockDiagError("/proc/42/ns/net", "setns", errno.EPERM)
    assert "\n" not in str(e)
    assert "/proc/42/ns/net" in str(e) and "errno 1 EPERM" in str(e) and "setns" in str(e)
    assert e.errno == errno.EPERM and e.netns_path == "/proc/42/ns/net"
    assert "own netns" in str(SockDiagError(None, "socket(AF_NETLINK)", errno.EMFILE))


def test_established_sockets_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SockDiagError, match=r"nope.*errno 2 ENOENT") as info:
        sd.established_sockets(str(tmp_path / "nope"))
    assert info.value.errno == errno.ENOENT


def _fake_proc(tmp_path: Path, mountinfo: str = "") -> tuple[Path, dict[str, int]]:
    """A /proc look-alike: pid dirs whose ns/net are files (own pid, 10 and 11 share one)."""
    proc = tmp_path / "proc"
    inodes = {}
    shared = tmp_path / "ns-shared"
    shared.write_text("")
    for pid in (str(os.getpid()), "10", "11", "12", "self", "net"):
        (proc / pid / "ns").mkdir(parents=True)
    for pid in ("10", "11"):
        (proc / pid / "ns" / "net").symlink_to(shared)
    (proc / str(os.getpid()) / "ns" / "net").write_text("")
    # 12: exited (no ns/net); "self" and "net" are not pids
    (proc / "self" / "mountinfo").write_text(mountinfo)
    inodes["own"] = os.stat(proc / str(os.getpid()) / "ns" / "net").st_ino
    inodes["shared"] = shared.stat().st_ino
    return proc, inodes


def test_network_namespaces(tmp_path: Path) -> None:
    pinned = tmp_path / "run netns x"  # a space: mountinfo escapes it as \040
    pinned.write_text("")
    ino = pinned.stat().st_ino
    stale_ino = ino + 1_000_000
    escaped = str(pinned).replace(" ", "\\040")
    mountinfo = (
        f"100 30 0:4 net:[{ino}] {escaped} rw shared:5 - nsfs nsfs rw\n"
        f"101 30 0:4 net:[{stale_ino}] /nonexistent rw - nsfs nsfs rw\n"
        "102 30 0:4 mnt:[4026531841] /run/x rw - nsfs nsfs rw\n"
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
    )
    proc, inodes = _fake_proc(tmp_path, mountinfo)
    got = sd.network_namespaces(str(proc))
    assert got == {
        inodes["own"]: f"{proc}/{os.getpid()}/ns/net",
        inodes["shared"]: f"{proc}/10/ns/net",
        ino: str(pinned),
    }


def test_all_established_skips_exited_and_reports_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespaces = {1: "/p/1/ns/net", 2: "/p/2/ns/net", 3: "/p/3/ns/net", 4: "/p/4/ns/net", 5: "/p/5/ns/net"}
    monkeypatch.setattr(sd, "network_namespaces", lambda proc="/proc": namespaces)

    def fake_read(path: str | None) -> tuple[int, list[TcpSocket]]:
        n = int(path.split("/")[2]) if path else 0
        if n == 2:
            raise SockDiagError(path, "open", errno.ENOENT)  # the process exited
        if n == 3:
            raise SockDiagError(path, "setns", errno.EPERM)
        if n == 5:  # pid reused by a process in namespace 1, already read
            return 1, [TcpSocket(1, 1, False, 1)]
        return n, [TcpSocket(n, 7, True, n)]

    monkeypatch.setattr(sd, "_read_netns", fake_read)
    sockets, errors = sd.all_established("/p")
    assert sockets == [TcpSocket(1, 7, True, 1), TcpSocket(4, 7, True, 4)]
    assert len(errors) == 1 and "/p/3/ns/net" in errors[0] and "EPERM" in errors[0]
