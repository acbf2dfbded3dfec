#!/usr/bin/env python3
"""HTTP/1.1 ground truth for kernel tests (standard library only; run inside a pod).

server --port P --delay-ms D --ready-file R
       keep-alive HTTP/1.1 server; GET/POST/PUT/DELETE/PROPFIND /status/NNN answers NNN after D ms;
       serves until killed.
client --host H --port P --connections C --requests N --method M --path /status/NNN [--close]
       C connections in parallel, N requests each (a new connection per request with --close);
       prints {"requests": total, "statuses": {code: count}}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    delay = 0.0

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        time.sleep(self.delay)
        try:
            code = int(self.path.rsplit("/", 1)[-1])
        except ValueError:
            code = 200
        body = b"x" * 100
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PROPFIND = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def server(a: argparse.Namespace) -> int:
    Handler.delay = a.delay_ms / 1000
    srv = ThreadingHTTPServer(("0.0.0.0", a.port), Handler)
    open(a.ready_file, "w").close()
    srv.serve_forever()
    return 0


def client(a: argparse.Namespace) -> int:
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def one_connection() -> None:
        conn = http.client.HTTPConnection(a.host, a.port, timeout=30)
        for _ in range(a.requests):
            headers = {"Connection": "close"} if a.close else {}
            body = b"payload" if a.method in ("POST", "PUT") else None
            conn.request(a.method, a.path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            with lock:
                statuses[resp.status] += 1
            if a.close:
                conn.close()
                conn = http.client.HTTPConnection(a.host, a.port, timeout=30)
        conn.close()

    threads = [threading.Thread(target=one_connection) for _ in range(a.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"requests": sum(statuses.values()), "statuses": statuses}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--delay-ms", type=float, default=0)
    s.add_argument("--ready-file", required=True)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--connections", type=int, default=1)
    c.add_argument("--requests", type=int, default=1)
    c.add_argument("--method", default="GET")
    c.add_argument("--path", default="/status/200")
    c.add_argument("--close", action="store_true")
    a = p.parse_args()
    return server(a) if a.cmd == "server" else client(a)


if __name__ == "__main__":
    sys.exit(main())
