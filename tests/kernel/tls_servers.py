"""TLS ground truth for kernel tests: nginx serving HTTP/1.1 and HTTP/2 over TLS (its access log
counts what it served, see h2_servers.Served), curl as its client, and a Python ssl server and
client (`python tls_servers.py server|client ...`, run in pods) for OpenSSL's SSL_read_ex /
SSL_write_ex, which is what Python's ssl module calls.

Certificates come from tests/certs.py: a CA and one leaf with the server pod's IP in its SAN.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import http.server
import json
import os
import ssl
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/certs.py, also when run as a script in a pod

from certs import Pair, make_ca, make_leaf  # noqa: E402

CURL = "/usr/bin/curl"
SCRIPT = str(Path(__file__).resolve())
PY_PATHS = {"/ok": 200, "/created": 201, "/missing": 404, "/boom": 500}


def certs_for(directory: Path, ip: str) -> tuple[Pair, Pair]:
    """(CA, server leaf for `ip`), readable by nginx's worker."""
    ca = make_ca(directory, "tls-ca")
    leaf = make_leaf(directory, "tls-server", ca, sans=[f"IP:{ip}"])
    for p in (directory, ca.cert, leaf.cert, leaf.key):
        os.chmod(p, 0o755 if p == directory else 0o644)
    return ca, leaf


def curl_tls(pod: object, ca: Pair, urls: list[str], http2: bool) -> list[tuple[str, int]]:
    """Every URL with one curl (one connection, reused), over TLS; (HTTP version, status) each."""
    argv = [CURL, "-sS", "--cacert", str(ca.cert), "--http2" if http2 else "--http1.1"]
    for url in urls:
        argv += ["-o", "/dev/null", "-w", "%{http_version} %{response_code} %{num_connects}\\n", url]
    r = pod.run(argv, timeout=60)  # type: ignore[attr-defined]
    rows = [line.split() for line in r.stdout.decode().splitlines()]
    assert len(rows) == len(urls), r.stdout
    assert sum(int(n) for _, _, n in rows) == 1, ("curl opened more than one connection", rows)
    return [(v, int(code)) for v, code, _ in rows]


# --- Python ssl server and client (run in pods as a script) ------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        code = PY_PATHS.get(self.path.split("?")[0], 404)
        body = b"x" * 100
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def _server(args: argparse.Namespace) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    httpd = http.server.ThreadingHTTPServer(("0.0.0.0", args.port), _Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    Path(args.ready_file).write_text("ready")
    httpd.serve_forever()


def client_plan(n: int) -> list[tuple[str, str]]:
    """(method, path) of the i-th request: mixed methods and statuses."""
    paths = list(PY_PATHS)
    return [("POST" if i % 5 == 4 else "GET", paths[i % len(paths)]) for i in range(n)]


def _client(args: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(cafile=args.ca)
    conn = http.client.HTTPSConnection(args.host, args.port, context=ctx, timeout=30)
    got: Counter[str] = Counter()
    socks = set()
    for i, (method, path) in enumerate(client_plan(args.requests)):
        body = b"y" * 50 if method == "POST" else None
        conn.request(method, f"{path}?i={i}", body=body)
        r = conn.getresponse()
        r.read()
        got[f"{method} {r.status // 100}xx"] += 1
        assert conn.sock is not None
        socks.add(conn.sock.getsockname())
    conn.close()
    print(json.dumps({"counts": got, "connections": len(socks)}))


async def _asyncio_server(args: argparse.Namespace) -> None:
    """HTTP/1.1 keep-alive over asyncio's TLS: OpenSSL through a memory BIO, the records
    written to the socket by the event loop outside any SSL call."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            code = PY_PATHS.get(line.split()[1].decode().split("?")[0], 404)
            writer.write(f"HTTP/1.1 {code} X\r\nContent-Length: 2\r\n\r\nok".encode())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "0.0.0.0", args.port, ssl=ctx)
    Path(args.ready_file).write_text("ready")
    await server.serve_forever()


async def _asyncio_client(args: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(cafile=args.ca)
    reader, writer = await asyncio.open_connection(args.host, args.port, ssl=ctx)
    got: Counter[str] = Counter()
    for i in range(args.requests):
        writer.write(f"GET /ok?i={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status = int((await reader.readline()).split()[1])
        while (await reader.readline()) != b"\r\n":
            pass
        await reader.readexactly(2)
        got[f"GET {status // 100}xx"] += 1
    writer.close()
    print(json.dumps({"counts": got, "connections": 1}))


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--ready-file", required=True)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--ca", required=True)
    c.add_argument("--requests", type=int, default=20)
    c.add_argument("--asyncio", action="store_true", help="asyncio streams (memory BIO)")
    s.add_argument("--asyncio", action="store_true", help="asyncio streams (memory BIO)")
    args = p.parse_args()
    if args.asyncio:
        asyncio.run(_asyncio_server(args) if args.cmd == "server" else _asyncio_client(args))
    else:
        _server(args) if args.cmd == "server" else _client(args)


if __name__ == "__main__":
    main()
