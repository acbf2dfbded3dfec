#!/usr/bin/env python3
"""TCP scenarios for kernel tests beyond traffic.py's byte streams. Standard library only;
run inside a simulated pod. Every wait is bounded.

  hold      --host H --port P --connections K --ready-file R --release-file F
            open K connections, create R, keep them open until F exists, close them.
  rst-server --port P --ready-file R
            accept one connection, read its first bytes, close it with SO_LINGER 0 (a reset).
  rst-client --host H --port P
            connect, send 10 bytes, read until the reset; prints {"reset": true|false}.
  pingpong  --host H --port P --connections K --rounds N [--hold-file F --ready-file R]
            K sequential connections to an echo server, N one-line round trips each; with
            --hold-file, the last connection stays open (still pinging) until F exists.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time

TIMEOUT = 30.0


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


def _wait_file(path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.02)


def cmd_hold(a: argparse.Namespace) -> int:
    socks = [socket.create_connection((a.host, a.port), timeout=TIMEOUT) for _ in range(a.connections)]
    _touch(a.ready_file)
    _wait_file(a.release_file)
    for s in socks:
        s.close()
    print(json.dumps({"held": len(socks)}))
    return 0


def cmd_rst_server(a: argparse.Namespace) -> int:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", a.port))
    srv.listen()
    srv.settimeout(TIMEOUT)
    _touch(a.ready_file)
    conn, _ = srv.accept()
    conn.settimeout(TIMEOUT)
    conn.recv(100)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    srv.close()
    print(json.dumps({"reset_sent": True}))
    return 0


def cmd_rst_client(a: argparse.Namespace) -> int:
    s = socket.create_connection((a.host, a.port), timeout=TIMEOUT)
    s.sendall(b"0123456789")
    reset = False
    try:
        while s.recv(100):
            pass
    except ConnectionResetError:
        reset = True
    s.close()
    print(json.dumps({"reset": reset}))
    return 0 if reset else 1


def _rounds(s: socket.socket, n: int) -> None:
    f = s.makefile("rb")
    for _ in range(n):
        s.sendall(b"ping\n")
        if f.readline() != b"ping\n":
            raise RuntimeError("bad echo")


def cmd_pingpong(a: argparse.Namespace) -> int:
    for i in range(a.connections):
        s = socket.create_connection((a.host, a.port), timeout=TIMEOUT)
        _rounds(s, a.rounds)
        if a.hold_file and i == a.connections - 1:
            _touch(a.ready_file)
            deadline = time.monotonic() + 120
            while not os.path.exists(a.hold_file) and time.monotonic() < deadline:
                _rounds(s, 1)
                time.sleep(0.01)
        s.close()
    print(json.dumps({"connections": a.connections}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold")
    h.add_argument("--host", required=True)
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--connections", type=int, required=True)
    h.add_argument("--ready-file", required=True)
    h.add_argument("--release-file", required=True)
    rs = sub.add_parser("rst-server")
    rs.add_argument("--port", type=int, required=True)
    rs.add_argument("--ready-file", required=True)
    rc = sub.add_parser("rst-client")
    rc.add_argument("--host", required=True)
    rc.add_argument("--port", type=int, required=True)
    pp = sub.add_parser("pingpong")
    pp.add_argument("--host", required=True)
    pp.add_argument("--port", type=int, required=True)
    pp.add_argument("--connections", type=int, default=1)
    pp.add_argument("--rounds", type=int, default=10)
    pp.add_argument("--hold-file", default="")
    pp.add_argument("--ready-file", default="")
    a = p.parse_args()
    return {
        "hold": cmd_hold,
        "rst-server": cmd_rst_server,
        "rst-client": cmd_rst_client,
        "pingpong": cmd_pingpong,
    }[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
