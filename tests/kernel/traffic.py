#!/usr/bin/env python3
"""Ground-truth TCP traffic for kernel tests. Standard library only; run inside a simulated pod.

Protocol (default "sink" mode): the client sends exactly N bytes and shuts down its write side; the
server reads until EOF, optionally sleeps D ms, sends exactly M bytes and closes. Every count printed
is what the application passed to / got from the socket calls, so it is the ground truth for
byte-counting probes.

  server  --port P [--reply-bytes M] [--delay-ms D] [--connections K] [--ready-file F] [--mode sink|echo]
          serves exactly K connections (concurrently), then prints
          {"connections": K, "received": total, "sent": total}; exit 1 if any connection failed or
          fewer than K arrived within the timeout. The ready file is created once it listens.
          echo mode: each connection's lines are written back until EOF (reply-bytes/delay ignored).
  client  --host H --port P --connections K --send-bytes N [--expect-bytes M] [--concurrency C]
          prints {"connections": K, "sent": total, "received": total, "failed": n}; exit 1 if n > 0.
  connect --host H --port P [--timeout S]
          one connect attempt; prints {"result": "ok"|"refused"|"timeout"|"error", "errno": n}; exit 0.

All socket operations time out (--timeout, default 30 s).
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

CHUNK = 65536


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _log(msg: str) -> None:
    sys.stderr.write(f"traffic: {msg}\n")
    sys.stderr.flush()


def _send_exact(sock: socket.socket, n: int, fill: bytes) -> int:
    """Send exactly n bytes (send loop); returns the bytes sent. Raises on error."""
    buf = fill * (CHUNK // len(fill))
    sent = 0
    while sent < n:
        k = sock.send(memoryview(buf)[: min(CHUNK, n - sent)])
        if k <= 0:
            raise OSError("send returned 0")
        sent += k
    return sent


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0
        self.sent = 0
        self.failed = 0

    def add(self, received: int = 0, sent: int = 0, failed: int = 0) -> None:
        with self.lock:
            self.received += received
            self.sent += sent
            self.failed += failed


# ------------------------------------------------------------------------------------------------ server


def _serve_sink(conn: socket.socket, args: argparse.Namespace, c: _Counter) -> None:
    received = sent = 0
    try:
        while True:
            data = conn.recv(CHUNK)
            if not data:
                break
            received += len(data)
        if args.delay_ms > 0:
            time.sleep(args.delay_ms / 1000.0)
        if args.reply_bytes > 0:
            sent = _send_exact(conn, args.reply_bytes, b"s")
        c.add(received=received, sent=sent)
    except OSError as e:
        _log(f"server connection error: {e!r}")
        c.add(received=received, sent=sent, failed=1)
    finally:
        conn.close()


def _serve_echo(conn: socket.socket, args: argparse.Namespace, c: _Counter) -> None:
    received = sent = 0
    try:
        with conn.makefile("rb") as f:
            while True:
                line = f.readline(CHUNK)
                if not line:
                    break
                received += len(line)
                conn.sendall(line)
                sent += len(line)
        c.add(received=received, sent=sent)
    except OSError as e:
        _log(f"server connection error: {e!r}")
        c.add(received=received, sent=sent, failed=1)
    finally:
        conn.close()


def cmd_server(args: argparse.Namespace) -> int:
    handler: Callable[[socket.socket, argparse.Namespace, _Counter], None]
    handler = _serve_echo if args.mode == "echo" else _serve_sink
    c = _Counter()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.host, args.port))
    srv.listen(max(128, args.connections))
    srv.settimeout(args.timeout)
    if args.ready_file:
        with open(args.ready_file, "w", encoding="ascii") as f:
            f.write(f"{args.port}\n")
    threads: list[threading.Thread] = []
    accepted = 0
    try:
        while accepted < args.connections:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                _log(f"timed out after {accepted} of {args.connections} connections")
                break
            conn.settimeout(args.timeout)
            accepted += 1
            t = threading.Thread(target=handler, args=(conn, args, c), daemon=True)
            t.start()
            threads.append(t)
    finally:
        srv.close()
    deadline = time.monotonic() + args.timeout + args.delay_ms / 1000.0 + 5
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    with c.lock:
        _emit({"connections": accepted, "received": c.received, "sent": c.sent})
        ok = accepted == args.connections and c.failed == 0 and hung == 0
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------ client


def _client_one(args: argparse.Namespace, c: _Counter, i: int) -> None:
    sent = received = 0
    try:
        with socket.create_connection((args.host, args.port), timeout=args.timeout) as s:
            sent = _send_exact(s, args.send_bytes, b"c")
            s.shutdown(socket.SHUT_WR)
            while True:
                data = s.recv(CHUNK)
                if not data:
                    break
                received += len(data)
    except OSError as e:
        _log(f"client connection {i} error: {e!r}")
        c.add(received=received, sent=sent, failed=1)
        return
    bad = args.expect_bytes is not None and received != args.expect_bytes
    if bad:
        _log(f"client connection {i}: received {received} bytes, expected {args.expect_bytes}")
    c.add(received=received, sent=sent, failed=int(bad))


def cmd_client(args: argparse.Namespace) -> int:
    c = _Counter()
    conc = max(1, min(args.concurrency, args.connections or 1))
    if conc == 1:
        for i in range(args.connections):
            _client_one(args, c, i)
    else:
        with ThreadPoolExecutor(max_workers=conc) as ex:
            for f in [ex.submit(_client_one, args, c, i) for i in range(args.connections)]:
                f.result()
    _emit({"connections": args.connections, "sent": c.sent, "received": c.received, "failed": c.failed})
    return 1 if c.failed else 0


# ------------------------------------------------------------------------------------------------ connect


def cmd_connect(args: argparse.Namespace) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(args.timeout)
    try:
        s.connect((args.host, args.port))
        result, err = "ok", 0
    except ConnectionRefusedError:
        result, err = "refused", errno.ECONNREFUSED
    except TimeoutError as e:
        result, err = "timeout", e.errno or errno.ETIMEDOUT
    except OSError as e:
        result, err = "error", e.errno or 0
    finally:
        s.close()
    _emit({"result": result, "errno": err})
    return 0


# ------------------------------------------------------------------------------------------------ main


def _nonneg(v: str) -> int:
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def _port(v: str) -> int:
    n = int(v)
    if not 0 < n < 65536:
        raise argparse.ArgumentTypeError("port must be 1..65535")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("server")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=_port, required=True)
    s.add_argument("--reply-bytes", type=_nonneg, default=0)
    s.add_argument("--delay-ms", type=_nonneg, default=0)
    s.add_argument("--connections", type=_nonneg, default=1)
    s.add_argument("--ready-file")
    s.add_argument("--mode", choices=("sink", "echo"), default="sink")
    s.add_argument("--timeout", type=float, default=30.0)

    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=_port, required=True)
    c.add_argument("--connections", type=_nonneg, default=1)
    c.add_argument("--send-bytes", type=_nonneg, default=0)
    c.add_argument("--expect-bytes", type=_nonneg, default=None)
    c.add_argument("--concurrency", type=_nonneg, default=1)
    c.add_argument("--timeout", type=float, default=30.0)

    k = sub.add_parser("connect")
    k.add_argument("--host", required=True)
    k.add_argument("--port", type=_port, required=True)
    k.add_argument("--timeout", type=float, default=30.0)

    args = p.parse_args(argv)
    if args.cmd == "server":
        return cmd_server(args)
    if args.cmd == "client":
        return cmd_client(args)
    return cmd_connect(args)


if __name__ == "__main__":
    sys.exit(main())
