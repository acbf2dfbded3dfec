#!/usr/bin/env python3
"""gRPC (HTTP/2) ground truth for kernel tests (grpcio, no generated code; run inside a pod).

grpc-server --port P --ready-file R [--delay-ms D]
       insecure gRPC server on 0.0.0.0:P serving the unary method /podnet.test.Echo/Call:
       the request b"ok" is answered OK after D ms, b"code=N" is aborted with status N after D ms.
       Every answer (the reply, or the abort's message) names the peer it came from, so that
       the client can count the TCP connections its calls used. Serves until killed.
grpc-client --host H --port P --calls N --fail-every K --concurrency C
       ONE channel (one TCP connection) to H:P; N unary calls with at most C in flight; every
       K-th call (K > 0) asks for a non-OK status, cycling through FAIL_CODES. Prints
       {"calls": N, "statuses": {"<code number>": count}, "peers": [client address as the
       server saw it, ...]} with the statuses as the client observed them.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from concurrent import futures
from typing import Any

import grpc

SERVICE = "podnet.test.Echo"
METHOD = f"/{SERVICE}/Call"
# NOT_FOUND, INTERNAL, UNAVAILABLE, INVALID_ARGUMENT: the codes the client cycles through.
FAIL_CODES = (5, 13, 14, 3)
_BY_NUMBER = {int(c.value[0]): c for c in grpc.StatusCode}


def _identity(b: bytes) -> bytes:
    return b


def wanted_code(i: int, fail_every: int) -> int:
    """The status the i-th call (from 1) asks for: 0, or a code from FAIL_CODES every K-th call."""
    if fail_every <= 0 or i % fail_every:
        return 0
    return FAIL_CODES[(i // fail_every - 1) % len(FAIL_CODES)]


def grpc_server(a: argparse.Namespace) -> int:
    delay = a.delay_ms / 1000

    def call(request: bytes, context: Any) -> bytes:
        time.sleep(delay)
        peer = context.peer()
        if request.startswith(b"code="):
            code = int(request[5:])
            if code != 0:
                context.abort(_BY_NUMBER[code], f"asked for {code} peer={peer}")
        return f"ok peer={peer}".encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Call": grpc.unary_unary_rpc_method_handler(
                call, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=128),
        handlers=[handler],
        maximum_concurrent_rpcs=None,
        options=[("grpc.so_reuseport", 0)],
    )
    server.add_insecure_port(f"0.0.0.0:{a.port}")
    server.start()
    open(a.ready_file, "w").close()
    server.wait_for_termination()
    return 0


def grpc_client(a: argparse.Namespace) -> int:
    # One channel with a subchannel of its own: one TCP connection carries every call.
    channel = grpc.insecure_channel(
        f"ipv4:{a.host}:{a.port}",
        options=[("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)],
    )
    grpc.channel_ready_future(channel).result(timeout=30)
    call = channel.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)
    slots = threading.BoundedSemaphore(a.concurrency)
    lock = threading.Lock()
    statuses: Counter[int] = Counter()
    peers: set[str] = set()
    done = threading.Event()
    finished = 0

    def on_done(f: Any) -> None:
        nonlocal finished
        exc = f.exception()
        if exc is None:
            code, text = 0, f.result().decode()
        else:
            code, text = int(exc.code().value[0]), exc.details() or ""
        with lock:
            statuses[code] += 1
            if "peer=" in text:
                peers.add(text.split("peer=", 1)[1])
            finished += 1
            if finished == a.calls:
                done.set()
        slots.release()

    for i in range(1, a.calls + 1):
        slots.acquire()
        call.future(f"code={wanted_code(i, a.fail_every)}".encode(), timeout=60).add_done_callback(on_done)
    if a.calls and not done.wait(120):
        print("calls did not finish", file=sys.stderr)
        return 1
    channel.close()
    summary = {
        "calls": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "peers": sorted(peers),
    }
    print(json.dumps(summary))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("grpc-server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--ready-file", required=True)
    s.add_argument("--delay-ms", type=float, default=0)
    c = sub.add_parser("grpc-client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--calls", type=int, default=1)
    c.add_argument("--fail-every", type=int, default=0)
    c.add_argument("--concurrency", type=int, default=1)
    a = p.parse_args()
    return grpc_server(a) if a.cmd == "grpc-server" else grpc_client(a)


if __name__ == "__main__":
    sys.exit(main())
