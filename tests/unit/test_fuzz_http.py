"""Fuzz and property tests for the HTTP server of /metrics (exporter.export.http_app): content
negotiation from arbitrary Accept and Accept-Encoding headers, odd methods and paths, and
malformed requests sent over a raw socket. One real aiohttp server (AppRunner and TCPSite on
127.0.0.1, as the exporter serves) runs for the whole module on a loop of its own; every check
ends with the server still answering a normal scrape."""

from __future__ import annotations

import gzip
import http.client
import io
import math
import random
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.export.http_app import (
    SNAPSHOTS,
    SnapshotStore,
    _accepted,
    _accepts_gzip,
    _accepts_openmetrics,
    add_routes,
)
from exporter.export.prometheus import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, Exposition
from exporter.metrics import model as m

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from background_app import HOST, BackgroundApp  # lives in tests/

OM = "application/openmetrics-text"
ROUTES = ("/metrics", "/healthz", "/readyz", "/")
WEB = ("shop", "web-7c9f8d6b5-x2x4q", "nginx", "web", "Deployment")
NET = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PURE = settings(max_examples=200, deadline=None)


# ---- the server ------------------------------------------------------------------------------------


@dataclass
class Server:
    port: int
    store: SnapshotStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    port = _free_port()
    bg = BackgroundApp("fuzz-http", port)
    exposition = Exposition(m.BucketLayout(0))
    snapshot = m.Snapshot.build(
        1.0,
        {m.TCP_SENT.name: (m.Sample(WEB, 1234.0),), m.POLLS.name: (m.Sample((), 3.0),)},
        {m.TCP_RTT.name: (m.HistSample(WEB, ((100, 2),), 2, 0.01),)},
    )

    async def start() -> SnapshotStore:
        store = SnapshotStore(exposition)  # on the server's loop (asyncio.Event)
        store.current = exposition.render(snapshot)
        app = web.Application()
        app[SNAPSHOTS] = store
        add_routes(app)
        await bg.serve(app, handle_signals=False)  # as exporter.app.service serves it
        return store

    try:
        yield Server(port, bg.call(start()))
    finally:
        bg.close()


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes


class _KeepOpen(io.BufferedReader):
    def close(self) -> None:
        pass  # HTTPResponse closes its file after each reply; the next reply is read from it


class _Connection:
    """What HTTPResponse needs of a socket: a file to read from, here the same for every reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = _KeepOpen(socket.SocketIO(sock, "rb"))

    def makefile(self, mode: str) -> io.BufferedReader:
        return self.file


def send(server: Server, raw: bytes, *, methods: tuple[str, ...] = ("GET",)) -> list[Reply]:
    """Send `raw` (one or more requests) on a new connection and read one reply per method
    given (a HEAD reply has no body), or fewer if the server closes the connection."""
    replies = []
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(raw)
        shared = _Connection(sock)  # one read buffer for all replies
        for method in methods:
            resp = http.client.HTTPResponse(shared, method=method)  # type: ignore[arg-type]
            try:
                resp.begin()
            except (http.client.RemoteDisconnected, ConnectionResetError):
                break
            replies.append(Reply(resp.status, resp.msg, resp.read()))
            if resp.will_close:
                break
    return replies


def request(method: str, path: str, headers: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + headers + b"\r\n"


def scrape(server: Server, headers: bytes = b"") -> Reply:
    (reply,) = send(server, request("GET", "/metrics", headers + b"Connection: close\r\n"))
    return reply


def assert_metrics(server: Server, reply: Reply, accept: str = "", accept_encoding: str = "") -> None:
    """A good /metrics answer, negotiated as _accepts_openmetrics and _accepts_gzip say."""
    assert reply.status == 200
    current = server.store.current
    om = _accepts_openmetrics(accept)
    assert reply.headers["Content-Type"] == (OPENMETRICS_CONTENT_TYPE if om else TEXT_CONTENT_TYPE)
    body = reply.body
    if _accepts_gzip(accept_encoding):
        assert reply.headers["Content-Encoding"] == "gzip"
        body = gzip.decompress(body)
    else:
        assert "Content-Encoding" not in reply.headers
    assert body == (current.openmetrics if om else current.text)
    body.decode("utf-8")


def assert_still_serving(server: Server) -> None:
    assert_metrics(server, scrape(server, b"Accept-Encoding: identity\r\n"), accept_encoding="identity")


# ---- _accepted as a pure function ---------------------------------------------------------------------

OWS = st.sampled_from(["", " ", "\t", "  "])
NOT_POSITIVE = (
    "0",
    "0.0",
    "0.000",
    "-0",
    "-1",
    "-0.5",
    "nan",
    "NaN",
    "-inf",
    "1e-400",
    "",
    "x",
    "0.5x",
    '"1"',
)
POSITIVE = ("1", "1.0", "0.5", "0.001", "1.000", ".5", "1e0", "inf", "1e400")
OTHER_TOKENS = ("deflate", "br", "identity", "*", "text/plain", "*/*", "application/json", "x-gzip", "gzipx")


def _case(draw: st.DrawFn, token: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(token), max_size=len(token)))
    return "".join(c.upper() if f else c for c, f in zip(token, flips, strict=True))


@st.composite
def listed(draw: st.DrawFn, token: str, qvalues: tuple[str, ...] | None) -> str:
    """`token` in any case, with parameters in any order, among them q=<one of qvalues>
    (spelled q or Q, spaces around =) or none when qvalues is None."""
    params = draw(st.lists(st.sampled_from(["version=1.0.0", "charset=utf-8", "level=1", "escaping=values"])))
    if qvalues is not None:
        q = draw(st.sampled_from(qvalues))
        key = draw(st.sampled_from(["q", "Q"]))
        params.insert(draw(st.integers(0, len(params))), f"{key}{draw(OWS)}={draw(OWS)}{q}")
    return draw(OWS) + _case(draw, token) + "".join(f"{draw(OWS)};{draw(OWS)}{p}" for p in params) + draw(OWS)


@st.composite
def others(draw: st.DrawFn) -> list[str]:
    """Parts of a header that name other tokens (or nothing): any q, any case."""
    tokens = st.sampled_from((*OTHER_TOKENS, OM[:-1], "gzi", ""))
    qs = st.sampled_from(POSITIVE + NOT_POSITIVE + ("",))
    parts = draw(st.lists(st.tuples(tokens, qs), max_size=5))
    return [t if not q else f"{t};q={q}" for t, q in parts]


def header(data: st.DataObject, parts: list[str]) -> str:
    return ",".join(data.draw(st.permutations(parts)))


@PURE
@given(st.sampled_from(["gzip", OM]), st.data())
def test_a_token_with_a_positive_or_no_q_is_accepted(token: str, data: st.DataObject) -> None:
    qvalues = data.draw(st.sampled_from([None, POSITIVE]))
    parts = [data.draw(listed(token, qvalues)), *data.draw(others())]
    # ...also when it is listed again with q=0 (one positive listing is enough).
    if data.draw(st.booleans()):
        parts.append(data.draw(listed(token, NOT_POSITIVE)))
    value = header(data, parts)
    assert _accepted(value, token), value


@PURE
@given(st.sampled_from(["gzip", OM]), st.data())
def test_q_zero_negative_nan_or_unparsable_never_selects(token: str, data: st.DataObject) -> None:
    parts = [data.draw(listed(token, NOT_POSITIVE)) for _ in range(data.draw(st.integers(0, 3)))]
    value = header(data, parts + data.draw(others()))
    assert not _accepted(value, token), value


Q01 = ("0", "0.1", "0.3", "0.5", "0.500", "1", "1.0", "nan", "-1", "x")


@PURE
@given(
    st.dictionaries(st.sampled_from([OM, "text/plain", "text/*", "*/*"]), st.sampled_from((*Q01, ""))),
    st.lists(
        st.sampled_from(("deflate", "application/json", "application/*", "text/html", "gzip")), max_size=3
    ),
    st.randoms(use_true_random=False),
)
def test_openmetrics_only_when_not_less_preferred_than_text(
    listed_q: dict[str, str], noise: list[str], rng: random.Random
) -> None:
    """OpenMetrics when listed by name with a q above 0 and not below the q of the most
    specific range that covers text/plain (text/plain, then text/*, then */*)."""

    def q(text: str) -> float:
        try:
            value = float(text) if text else 1.0
        except ValueError:
            return 0.0
        return value if value > 0 else 0.0

    om = q(listed_q[OM]) if OM in listed_q else 0.0
    text = next((q(listed_q[r]) for r in ("text/plain", "text/*", "*/*") if r in listed_q), 0.0)
    parts = [f"{name};version=1.0.0;q={v}" if v else name for name, v in listed_q.items()]
    parts += noise
    rng.shuffle(parts)
    assert _accepts_openmetrics(",".join(parts)) is (om > 0 and om >= text)


@PURE
@given(st.text(max_size=60), st.text(max_size=60))
def test_accepted_never_raises_on_any_text(accept: str, accept_encoding: str) -> None:
    for value in (accept, accept_encoding, accept + ";q=" + accept_encoding):
        assert isinstance(_accepts_openmetrics(value), bool)
        assert isinstance(_accepts_gzip(value), bool)


@pytest.mark.parametrize(
    ("value", "gz"),
    [
        ("gzip;q=nan", False),
        ("gzip;q=NaN, deflate", False),
        ("gzip;q=-1", False),
        ("gzip;q=-inf", False),
        ("gzip;q=1e-400", False),  # underflows to 0
        ("gzip;q=", False),
        ("gzip;q", False),
        ("gzip;q=0;level=1", False),
        ("gzip;level=1;q=0", False),
        ("gzip;q=inf", True),
        ("gzip;q=1e400", True),
        ("gzip;;,,;", True),
        (",,,gzip,,,", True),
        ("\tGzIp\t;\tQ = 0.5", True),
        ("gzip" + ",x" * 10_000, True),
        ("x," * 10_000 + "gzip;q=0", False),
    ],
)
def test_accept_encoding_edge_cases(value: str, gz: bool) -> None:
    assert _accepts_gzip(value) is gz


def test_q_parsing_is_consistent_with_float() -> None:
    # What the edge cases rely on: float() accepts these spellings.
    assert math.isnan(float("nan")) and float("1e400") == math.inf and float("1e-400") == 0.0


# ---- negotiation through the real server -------------------------------------------------------------

# What an HTTP field value may hold (RFC 9110: visible ASCII, SP, HTAB, and obs-text). Leading
# and trailing whitespace is not part of the value.
FIELD_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)
    | st.sampled_from(["\t", "é", "💥", "\u00a0"]),
    max_size=80,
)
QS = ("0", "0.5", "1", "nan", "inf", "-1", "1e400", "", "=", ";")
SHAPED = st.builds(
    lambda parts: ",".join(parts),
    st.lists(
        st.builds(
            lambda t, q: f"{t};q={q}" if q else t,
            st.sampled_from(("gzip", "GZIP", OM, OM.upper(), "*", "*/*", "", " ", "identity")),
            st.sampled_from(QS),
        ),
        max_size=6,
    ),
)


def field_value(text: str) -> bytes:
    return text.encode("utf-8")


@NET
@given(st.one_of(FIELD_TEXT, SHAPED), st.one_of(FIELD_TEXT, SHAPED))
def test_any_accept_and_accept_encoding_get_200_and_a_body_that_decodes(
    server: Server, accept: str, accept_encoding: str
) -> None:
    headers = (
        b"Accept: " + field_value(accept) + b"\r\nAccept-Encoding: " + field_value(accept_encoding) + b"\r\n"
    )
    reply = scrape(server, headers)
    assert_metrics(server, reply, accept.strip(" \t"), accept_encoding.strip(" \t"))


@NET
@given(st.binary(max_size=60).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F)))
def test_non_utf8_header_bytes_get_200_and_a_body_that_decodes(server: Server, raw: bytes) -> None:
    # aiohttp hands such bytes over as lone surrogates (surrogateescape).
    reply = scrape(server, b"Accept: " + raw + b"\r\nAccept-Encoding: " + raw + b"\r\n")
    value = raw.decode("utf-8", "surrogateescape").strip(" \t")
    assert_metrics(server, reply, value, value)


# What Prometheus sends (scrape/scrape.go acceptHeader): the formats of scrape_protocols in order,
# with falling q-values, then */*.
PROMETHEUS_2 = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROMETHEUS_3 = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
PROMETHEUS_PROTO_FIRST = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.6,"
    "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.3"
)
PROMETHEUS_TEXT_FIRST = (
    "text/plain;version=0.0.4;q=0.6,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.4"
)


@pytest.mark.parametrize(
    ("accept", "om"),
    [
        (PROMETHEUS_2, True),
        (PROMETHEUS_3, True),
        (PROMETHEUS_PROTO_FIRST, True),
        # scrape_protocols: [PrometheusText0.0.4, OpenMetricsText1.0.0] used to get OpenMetrics.
        (PROMETHEUS_TEXT_FIRST, False),
        ("application/openmetrics-text;q=0.5,text/*;q=0.9", False),
        ("application/openmetrics-text;q=0.5,*/*", False),
        ("application/openmetrics-text;q=0.5,text/plain;q=0,*/*", True),  # the most specific range counts
        ("text/plain,application/openmetrics-text", True),  # a tie: OpenMetrics
        ("*/*", False),
    ],
)
def test_the_order_of_preference_prometheus_sends_is_followed(server: Server, accept: str, om: bool) -> None:
    assert _accepts_openmetrics(accept) is om
    reply = scrape(server, b"Accept: " + accept.encode() + b"\r\nAccept-Encoding: gzip\r\n")
    assert reply.headers["Content-Type"] == (OPENMETRICS_CONTENT_TYPE if om else TEXT_CONTENT_TYPE)
    assert_metrics(server, reply, accept, "gzip")


# ---- methods -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"])
def test_other_methods_are_405_and_the_connection_serves_on(server: Server, method: str, path: str) -> None:
    raw = request(method, path, b"Content-Length: 0\r\n") + request(
        "GET", "/metrics", b"Connection: close\r\n"
    )
    first, second = send(server, raw, methods=(method, "GET"))
    assert first.status == 405
    assert set(first.headers["Allow"].split(",")) == {"GET", "HEAD"}
    assert_metrics(server, second)


@pytest.mark.parametrize("method", ["FOO", "get", "Get", "GET\x00", "G ET", "CONNECT"])
def test_unknown_or_misspelled_methods_are_400_or_405(server: Server, method: str) -> None:
    replies = send(server, request(method, "/metrics", b"Connection: close\r\n"), methods=(method,))
    assert [r.status for r in replies] in ([400], [404], [405], [])
    assert_still_serving(server)


@pytest.mark.parametrize("path", ROUTES)
def test_head_gives_the_headers_of_get_and_no_body(server: Server, path: str) -> None:
    # A GET pipelined behind the HEAD is read right after the HEAD's headers: had the HEAD
    # reply carried a body, the second reply would not parse.
    raw = request("HEAD", path) + request("GET", path, b"Connection: close\r\n")
    head, get = send(server, raw, methods=("HEAD", "GET"))
    assert head.status == get.status  # /readyz: 503 before the first poll
    assert head.body == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    assert int(head.headers["Content-Length"]) == len(get.body) > 0


# ---- malformed requests ----------------------------------------------------------------------------------

MALFORMED = {
    "request line over 8190 bytes": request("GET", "/metrics?" + "a" * 9000),
    "path over 8190 bytes": request("GET", "/" + "m" * 9000),
    "header over 8190 bytes": request("GET", "/metrics", b"X-Long: " + b"a" * 9000 + b"\r\n"),
    "accept over 8190 bytes": request("GET", "/metrics", b"Accept: " + b"gzip," * 2000 + b"\r\n"),
    "thousands of headers": request("GET", "/metrics", b"".join(b"X-%d: v\r\n" % i for i in range(3000))),
    "header without a colon": request("GET", "/metrics", b"NoColonHere\r\n"),
    "space before the colon": request("GET", "/metrics", b"Accept : gzip\r\n"),
    "empty header name": request("GET", "/metrics", b": gzip\r\n"),
    "NUL in a header value": request("GET", "/metrics", b"Accept-Encoding: gz\x00ip\r\n"),
    "control character in a header value": request("GET", "/metrics", b"Accept: a\x01b\r\n"),
    "obsolete line folding": request("GET", "/metrics", b"Accept: text/plain,\r\n " + OM.encode() + b"\r\n"),
    "unknown HTTP version": b"GET /metrics HTTP/9.9\r\nHost: x\r\n\r\n",
    "bare LF line ends": b"GET /metrics HTTP/1.1\nHost: x\n\n",
    "non-ASCII in the path": request("GET", "/m\xe9trics"),
    "TLS handshake on the plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    "Content-Length and chunked": request(
        "GET", "/metrics", b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"
    ),
    "bad Content-Length": request("GET", "/metrics", b"Content-Length: abc\r\n"),
    "two Content-Lengths": request("GET", "/metrics", b"Content-Length: 0\r\nContent-Length: 5\r\n"),
    "no Host in HTTP/1.1": b"GET /metrics HTTP/1.1\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_requests_are_4xx_and_the_server_serves_on(server: Server, raw: bytes) -> None:
    replies = send(server, raw)
    assert len(replies) == 1, "answered, not dropped"
    assert 400 <= replies[0].status < 500, replies[0]
    assert_still_serving(server)


@pytest.mark.parametrize(
    "headers",
    [
        b"Accept: \xff\xfe caf\xc3\xa9\r\n",
        b"Accept-Encoding: gzip\xff\r\n",
        "Accept: application/openmetrics-text; x=\u00e9\r\n".encode(),
        b"X-Anything: \x80\x81\x82\r\n",
    ],
)
def test_non_ascii_header_values_are_served(server: Server, headers: bytes) -> None:
    reply = scrape(server, headers)
    accept = reply_value(headers, b"Accept")
    accept_encoding = reply_value(headers, b"Accept-Encoding")
    assert_metrics(server, reply, accept, accept_encoding)


def reply_value(headers: bytes, name: bytes) -> str:
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key == name:
            return value.decode("utf-8", "surrogateescape").strip(" \t")
    return ""


@NET
@given(st.binary(min_size=1, max_size=300))
def test_arbitrary_bytes_never_get_a_5xx(server: Server, raw: bytes) -> None:
    # The server may wait for the rest of a request: ending the stream tells it there is none.
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if answer:
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), status_line
        assert int(status_line.split()[1]) < 500, status_line


def test_server_still_serves_after_the_fuzzing(server: Server) -> None:
    assert_still_serving(server)


# ---- paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/metrics?x=1", 200),
        ("/metrics?", 200),
        ("/metrics?%ff=%00&&&=", 200),
        ("/metrics#frag", 200),
        ("/%6Detrics", 200),  # percent-decoded before routing
        ("/metrics%3Fx=1", 404),
        ("//metrics", 404),
        ("/metrics/", 404),
        ("/metrics/../metrics", 404),
        ("/./metrics", 404),
        ("/metrics%00", 404),
        ("/metrics%2F", 404),
        ("/%ff", 404),
        ("/%", 404),
        ("/%%%", 404),
        ("/" + "m" * 8000, 404),
        ("/metrics?" + "q" * 8000, 200),
        ("http://127.0.0.1/metrics", 200),  # absolute form
        ("*", 400),
        ("metrics", 400),
    ],
)
def test_odd_paths(server: Server, path: str, status: int) -> None:
    (reply,) = send(server, request("GET", path, b"Connection: close\r\n"))
    assert reply.status == status
    if status == 200:
        assert_metrics(server, reply)
    assert_still_serving(server)


@NET
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=100))
def test_any_visible_ascii_path_is_200_400_or_404(server: Server, tail: str) -> None:
    (reply,) = send(server, request("GET", "/" + tail, b"Connection: close\r\n"))
    assert reply.status in (200, 400, 404), (tail, reply.status, reply.body[:200])
