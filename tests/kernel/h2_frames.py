"""Hand-made HTTP/2 conversations: a client and a server (one process, two sockets on
loopback) exchange frames built byte by byte, written and read in chosen pieces, so the
exporter's frame walker and HPACK decoder meet every shape the tests name: frame headers
split across iovecs and syscalls, PADDED and PRIORITY HEADERS, CONTINUATION, literal and
Huffman-coded statuses, informational responses, resets, and gRPC fields referenced
through the dynamic table.

    h2_frames.py SCENARIO WRITE READ PORT [CONNECTIONS]

WRITE: whole (one send per side and turn), iovecs (one sendmsg of 1-3 byte iovecs),
bytes (one send per byte). READ: whole, iovecs (recvmsg into 1-3 byte buffers), bytes.
The connection preface is always written and read whole.
Prints the streams the scenario makes, as JSON: [[method, status_class, protocol,
grpc_status], ...].
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, CONTINUATION = 0, 1, 3, 4, 9
END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def lit(s: bytes) -> bytes:
    """An HPACK string literal, not Huffman-coded (length < 127)."""
    return bytes([len(s)]) + s


def huff(code: bytes) -> bytes:
    """An HPACK string literal whose bytes are already Huffman-coded."""
    return bytes([0x80 | len(code)]) + code


GET, POST, SCHEME_HTTP, PATH_ROOT = b"\x82", b"\x83", b"\x86", b"\x84"
S200, S404, S500 = b"\x88", b"\x8d", b"\x8e"
HUFFMAN_503 = bytes([0x6C, 0x0C, 0xFF])  # '5' 011011, '0' 00000, '3' 011001, then EOS padding


@dataclass(frozen=True)
class Scenario:
    request: bytes
    response: bytes
    streams: list[tuple[str, str, str, str]]
    """What each stream should count as: method, status class, protocol, gRPC status."""


def basic() -> Scenario:
    req = PREFACE + frame(SETTINGS, 0, 0)
    req += frame(HEADERS, END_STREAM | END_HEADERS, 1, GET + SCHEME_HTTP + PATH_ROOT)
    req += frame(HEADERS, END_HEADERS, 3, POST + SCHEME_HTTP + PATH_ROOT) + frame(
        DATA, END_STREAM, 3, b"body"
    )
    req += frame(HEADERS, END_STREAM | END_HEADERS, 5, GET + SCHEME_HTTP + PATH_ROOT)
    resp = frame(SETTINGS, 0, 0)
    resp += frame(HEADERS, END_HEADERS, 1, S200) + frame(DATA, END_STREAM, 1, b"ok")
    resp += frame(HEADERS, END_STREAM | END_HEADERS, 3, S404)
    resp += (
        frame(HEADERS, END_HEADERS, 5, S500) + frame(DATA, 0, 5, b"x" * 300) + frame(DATA, END_STREAM, 5, b"")
    )
    return Scenario(
        req, resp, [("GET", "2xx", "http2", ""), ("POST", "4xx", "http2", ""), ("GET", "5xx", "http2", "")]
    )


def shapes() -> Scenario:
    """PADDED + PRIORITY with CONTINUATION; literal methods and statuses, raw and Huffman;
    an informational response before the final one."""
    req = PREFACE + frame(SETTINGS, 0, 0)
    pad = 5
    first = (
        bytes([pad]) + bytes(5) + GET + SCHEME_HTTP + bytes(pad)
    )  # pad length, priority, fragment, padding
    req += frame(HEADERS, END_STREAM | PADDED | PRIORITY, 1, first)
    req += frame(CONTINUATION, 0, 1, PATH_ROOT)
    req += frame(CONTINUATION, END_HEADERS, 1, b"\x41" + lit(b"example.test"))  # :authority, indexed name
    req += frame(HEADERS, END_STREAM | END_HEADERS, 3, b"\x42" + lit(b"PUT") + SCHEME_HTTP + PATH_ROOT)
    req += frame(HEADERS, END_STREAM | END_HEADERS, 5, b"\x02" + lit(b"PURGE") + SCHEME_HTTP + PATH_ROOT)
    req += frame(HEADERS, END_STREAM | END_HEADERS, 7, GET + SCHEME_HTTP + PATH_ROOT)
    resp = frame(SETTINGS, 0, 0)
    resp += frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\x48" + lit(b"201"))
    resp += frame(HEADERS, END_STREAM | END_HEADERS, 3, b"\x48" + huff(HUFFMAN_503))
    resp += frame(HEADERS, END_STREAM | END_HEADERS, 5, b"\x08" + lit(b"302"))
    resp += frame(HEADERS, END_HEADERS, 7, b"\x08" + lit(b"100"))  # informational: not the answer
    resp += frame(HEADERS, END_STREAM | END_HEADERS, 7, S200)
    return Scenario(
        req,
        resp,
        [
            ("GET", "2xx", "http2", ""),
            ("PUT", "5xx", "http2", ""),
            ("other", "3xx", "http2", ""),
            ("GET", "2xx", "http2", ""),
        ],
    )


def grpc() -> Scenario:
    """gRPC as grpc-core writes it: fields inserted into the dynamic table once, then
    referenced; a trailers-only answer; grpc-status by a reference to its name."""
    content_type = b"\x40" + lit(b"content-type") + lit(b"application/grpc")
    req = PREFACE + frame(SETTINGS, 0, 0)
    # Stream 1 inserts :path (#1) and content-type (#2); later streams refer to them: the
    # newest insertion is index 62.
    req += frame(HEADERS, END_HEADERS, 1, POST + SCHEME_HTTP + b"\x44" + lit(b"/pkg.Svc/Call") + content_type)
    req += frame(DATA, END_STREAM, 1, bytes(5))
    for stream in (3, 5):
        req += frame(HEADERS, END_HEADERS, stream, POST + SCHEME_HTTP + b"\xbf\xbe")
        req += frame(DATA, END_STREAM, stream, bytes(5))
    resp = frame(SETTINGS, 0, 0)
    # Stream 1: headers, a message, trailers inserting grpc-status: 0 (#1).
    resp += frame(HEADERS, END_HEADERS, 1, S200) + frame(DATA, 0, 1, bytes(7))
    resp += frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\x40" + lit(b"grpc-status") + lit(b"0"))
    # Stream 3: trailers only; content-type inserted (#2) by its static name, then
    # grpc-status: 5 by a reference to #1's name (index 63 = 15 + 48, a 4-bit prefix).
    trailers = S200 + b"\x5f" + lit(b"application/grpc") + b"\x0f\x30" + lit(b"5")
    resp += frame(HEADERS, END_STREAM | END_HEADERS, 3, trailers)
    # Stream 5: trailers are #1 whole, now index 63.
    resp += frame(HEADERS, END_HEADERS, 5, S200) + frame(DATA, 0, 5, bytes(7))
    resp += frame(HEADERS, END_STREAM | END_HEADERS, 5, b"\xbf")
    return Scenario(
        req,
        resp,
        [("POST", "2xx", "grpc", "0"), ("POST", "2xx", "grpc", "5"), ("POST", "2xx", "grpc", "0")],
    )


def reset() -> Scenario:
    """A request the client gives up on (RST_STREAM) still counts, with no status."""
    req = PREFACE + frame(SETTINGS, 0, 0)
    req += frame(HEADERS, END_STREAM | END_HEADERS, 1, GET + SCHEME_HTTP + PATH_ROOT)
    req += frame(HEADERS, END_STREAM | END_HEADERS, 3, GET + SCHEME_HTTP + PATH_ROOT)
    req += frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big"))
    resp = frame(SETTINGS, 0, 0) + frame(HEADERS, END_STREAM | END_HEADERS, 3, S200)
    return Scenario(req, resp, [("GET", "", "http2", ""), ("GET", "2xx", "http2", "")])


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "basic": basic,
    "shapes": shapes,
    "grpc": grpc,
    "reset": reset,
}


def pieces(data: bytes) -> Iterator[bytes]:
    i, size = 0, 1
    while i < len(data):
        yield data[i : i + size]
        i += size
        size = size % 3 + 1


def write(sock: socket.socket, data: bytes, how: str) -> None:
    # HTTP/2 is recognised by the preface arriving in one piece (as every client sends it);
    # what follows is cut up.
    if data.startswith(PREFACE):
        sock.sendall(PREFACE)
        data = data[len(PREFACE) :]
    if how == "whole":
        sock.sendall(data)
    elif how == "iovecs":
        parts = list(pieces(data))
        while parts:  # IOV_MAX is 1024
            batch, parts = parts[:1000], parts[1000:]
            sent = sock.sendmsg(batch)
            assert sent == sum(map(len, batch))
    else:
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])


def read(sock: socket.socket, n: int, how: str, preface: bool = False) -> bytes:
    got = bytearray()
    while preface and len(got) < len(PREFACE):
        got += sock.recv(len(PREFACE) - len(got))
    while len(got) < n:
        if how == "whole":
            chunk = sock.recv(n - len(got))
        elif how == "iovecs":
            bufs = [bytearray(len(p)) for p in pieces(bytes(min(n - len(got), 64)))]
            k = sock.recvmsg_into(bufs)[0]
            chunk = b"".join(bufs)[:k]
        else:
            chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"peer closed after {len(got)} of {n} bytes")
        got += chunk
    return bytes(got)


def many(sc: Scenario, port: int, n: int) -> None:
    """n connections at once, in two rounds: every request of a round is sent before any
    response, so every connection's parser state is needed at the same time, and again."""
    listener = socket.create_server(("127.0.0.1", port), backlog=n)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    servers = [listener.accept()[0] for _ in range(n)]
    again = Scenario(
        frame(HEADERS, END_STREAM | END_HEADERS, 7, GET + SCHEME_HTTP + PATH_ROOT),
        frame(HEADERS, END_STREAM | END_HEADERS, 7, S200),
        [("GET", "2xx", "http2", "")],
    )
    for i, round_ in enumerate((sc, again)):
        for c in clients:
            write(c, round_.request, "whole")
        for s in servers:
            assert read(s, len(round_.request), "whole", preface=i == 0) == round_.request
        for s in servers:
            write(s, round_.response, "whole")
        for c in clients:
            assert read(c, len(round_.response), "whole") == round_.response
    for sock in clients + servers + [listener]:
        sock.close()


def main() -> int:
    name, how_write, how_read, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    sc = SCENARIOS[name]()
    if len(sys.argv) > 5:
        n = int(sys.argv[5])
        many(sc, port, n)
        print(json.dumps(sc.streams * n))
        return 0
    listener = socket.create_server(("127.0.0.1", port))
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                assert read(conn, len(sc.request), how_read, preface=True) == sc.request
                write(conn, sc.response, how_write)
                conn.recv(1)  # the client closes first
        except BaseException as e:  # reported by the main thread
            failure.append(e)

    t = threading.Thread(target=serve)
    t.start()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        write(c, sc.request, how_write)
        assert read(c, len(sc.response), how_read) == sc.response
    t.join(30)
    if failure:
        raise failure[0]
    print(json.dumps(sc.streams))
    return 0


if __name__ == "__main__":
    sys.exit(main())
