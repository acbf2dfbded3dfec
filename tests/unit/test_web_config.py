"""exporter.export.web_config: the exporter-toolkit web configuration file, its TLS contexts
(real handshakes on 127.0.0.1) and basic auth."""

from __future__ import annotations

import asyncio
import base64
import itertools
import ssl
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.export import web_config
from exporter.export.web_config import (
    BasicAuth,
    TlsServerConfig,
    WebConfig,
    WebConfigError,
    files_stamp,
    load_web_config,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from certs import Pair, encrypt_key, make_ca, make_leaf  # lives in tests/, shared with the kernel tests

PASSWORD = b"correct horse"
HASH = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4)).decode()
HASH_2Y = "$2y$" + HASH[4:]
HASH_2A = "$2a$" + HASH[4:]
PLAINTEXT = "secretpassword"
CLIENT_SANS = (
    "DNS:scraper.example",
    "URI:spiffe://cluster/ns/monitoring/sa/prometheus",
    "email:prom@example.com",
    "IP:::1",
)


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Pair
    ca2: Pair
    server: Pair
    server2: Pair
    client: Pair
    client_other_ca: Pair
    client_other_name: Pair
    encrypted_key: Path
    garbage: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "ca")
    ca2 = make_ca(d, "ca2")
    server = make_leaf(d, "server", ca, ["DNS:localhost", "IP:127.0.0.1"])
    garbage = d / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    return Pki(
        dir=d,
        ca=ca,
        ca2=ca2,
        server=server,
        server2=make_leaf(d, "server2", ca, ["DNS:localhost", "IP:127.0.0.1"]),
        client=make_leaf(d, "client", ca, CLIENT_SANS, usage="clientAuth"),
        client_other_ca=make_leaf(d, "client-other-ca", ca2, CLIENT_SANS, usage="clientAuth"),
        client_other_name=make_leaf(d, "client-other-name", ca, ["DNS:other.example"], usage="clientAuth"),
        encrypted_key=encrypt_key(server, d / "server-encrypted.key", "hunter2"),
        garbage=garbage,
    )


_names = itertools.count()


def write(pki: Pki, text: str | bytes, subdir: str = "") -> str:
    """A new config file in the PKI directory (so relative certificate names resolve)."""
    directory = pki.dir / subdir if subdir else pki.dir
    directory.mkdir(exist_ok=True)
    path = directory / f"web-{next(_names)}.yml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def assert_one_clean_line(message: str, *secrets: str) -> None:
    assert "\n" not in message and "\r" not in message
    assert len(message.splitlines()) == 1
    for secret in (HASH, HASH_2Y, HASH_2A, HASH[7:], PLAINTEXT, PASSWORD.decode(), *secrets):
        assert secret not in message


# --- valid files --------------------------------------------------------------------------------

TLS_MIN = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
MTLS = TLS_MIN + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"


def _check_empty(c: WebConfig, p: Pki) -> None:
    assert c.tls is None and not c.basic_auth_users and not c.headers and c.http2
    assert c.files() == (c.path,)


def _check_blank_headers(c: WebConfig, p: Pki) -> None:
    assert not c.headers and c.http2


VALID: list[tuple[str, str, Callable[[WebConfig, Pki], None]]] = [
    ("empty", "", _check_empty),
    ("comment only", "# nothing\n", _check_empty),
    ("empty mapping", "{}\n", _check_empty),
    ("null sections", "tls_server_config:\nhttp_server_config:\nbasic_auth_users:\n", _check_empty),
    (
        "empty sections",
        "tls_server_config: {}\nhttp_server_config: {headers: {}}\nbasic_auth_users: {}\n",
        _check_empty,
    ),
]


def _check_tls_min(c: WebConfig, p: Pki) -> None:
    assert c.tls == TlsServerConfig(str(p.server.cert), str(p.server.key))
    assert c.tls.min_version is ssl.TLSVersion.TLSv1_2 and c.tls.max_version is None
    assert c.tls.client_auth_type == "NoClientCert" and c.tls.prefer_server_cipher_suites
    assert c.files() == (c.path, str(p.server.cert), str(p.server.key))


def _check_full_tls(c: WebConfig, p: Pki) -> None:
    assert c.tls == TlsServerConfig(
        cert_file=str(p.server.cert),
        key_file=str(p.server.key),
        client_auth_type="RequireAndVerifyClientCert",
        client_ca_file=str(p.ca.cert),
        client_allowed_sans=("scraper.example", "::1"),
        min_version=ssl.TLSVersion.TLSv1_2,
        max_version=ssl.TLSVersion.TLSv1_3,
        cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"),
        prefer_server_cipher_suites=False,
    )
    assert c.files() == (c.path, str(p.server.cert), str(p.server.key), str(p.ca.cert))


def _check_headers(c: WebConfig, p: Pki) -> None:
    assert dict(c.headers) == {
        "Content-Security-Policy": "default-src 'self'",
        "X-Frame-Options": "deny",
        "X-Content-Type-Options": "nosniff",
        "X-XSS-Protection": "0",
        "Strict-Transport-Security": "max-age=31536000",
    }
    assert c.http2 is False and c.tls is None and not c.basic_auth_users


def _check_users(c: WebConfig, p: Pki) -> None:
    assert dict(c.basic_auth_users) == {"alice": HASH, "bob": HASH_2Y, "carol": HASH_2A, "1234": HASH}
    assert c.files() == (c.path,)


VALID += [
    ("tls relative names", TLS_MIN, _check_tls_min),
    (
        "tls explicit defaults",
        TLS_MIN + "  client_auth_type: NoClientCert\n  min_version: TLS12\n",
        _check_tls_min,
    ),
    (
        "tls everything",
        MTLS
        + "  client_allowed_sans: [scraper.example, '::1']\n  min_version: TLS12\n  max_version: TLS13\n"
        + "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]\n"
        + "  prefer_server_cipher_suites: false\n",
        _check_full_tls,
    ),
    (
        "headers",
        "http_server_config:\n  http2: false\n  headers:\n"
        "    Content-Security-Policy: \"default-src 'self'\"\n    X-Frame-Options: deny\n"
        "    X-Content-Type-Options: nosniff\n    X-XSS-Protection: '0'\n"
        "    Strict-Transport-Security: max-age=31536000\n",
        _check_headers,
    ),
    (
        "blank headers are unset",
        "http_server_config:\n  headers:\n    X-Frame-Options: ''\n    Content-Security-Policy:\n",
        _check_blank_headers,
    ),
    (
        "users",
        f"basic_auth_users:\n  alice: {HASH}\n  bob: '{HASH_2Y}'\n  carol: {HASH_2A}\n  '1234': {HASH}\n",
        _check_users,
    ),
]


@pytest.mark.parametrize(("text", "check"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid(pki: Pki, text: str, check: Callable[[WebConfig, Pki], None]) -> None:
    config = load_web_config(write(pki, text))
    context = config.ssl_context()
    assert (context is None) == (config.tls is None)
    check(config, pki)


def test_relative_names_resolve_against_the_config_directory(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(pki, "tls_server_config:\n  cert_file: ../server.crt\n  key_file: ../server.key\n", "sub")
    monkeypatch.chdir("/")
    config = load_web_config(str(Path(path).relative_to("/")))  # a relative config path, too
    assert config.path == path
    assert config.tls is not None and config.tls.cert_file == str(pki.server.cert)


# --- invalid files ------------------------------------------------------------------------------

INVALID: list[tuple[str, str, str]] = [
    ("yaml syntax", "tls_server_config: [\n", "invalid YAML at line"),
    ("two documents", "basic_auth_users: {}\n---\nbasic_auth_users: {}\n", "invalid YAML"),
    ("deep nesting", "[" * 20000 + "]" * 20000, "invalid YAML (RecursionError)"),
    ("unclosed nesting", "[" * 20000, "invalid YAML"),
    ("bad date", "basic_auth_users: 2001-13-45\n", "invalid YAML (ValueError)"),
    ("top list", "- a\n- b\n", "expected a mapping, got a list"),
    ("top string", "hello\n", "expected a mapping, got a string"),
    (
        "unknown top key",
        "foo: 1\n",
        "foo: unknown key; valid keys here are tls_server_config, http_server_config",
    ),
    (
        "rate_limit",
        "rate_limit: {interval: 1s, burst: 2}\n",
        "rate_limit: is not supported by podnet; remove it",
    ),
    ("non-string key", "1: x\n", "keys must be strings, got an integer key 1"),
    ("duplicate key", "basic_auth_users: {}\nbasic_auth_users: {}\n", "duplicate key 'basic_auth_users'"),
    ("duplicate user", f"basic_auth_users:\n  alice: {HASH}\n  alice: {HASH}\n", "duplicate key 'alice'"),
    ("tls list", "tls_server_config: [a]\n", "tls_server_config: expected a mapping, got a list"),
    ("no cert_file", "tls_server_config:\n  key_file: server.key\n", "tls_server_config.cert_file: missing"),
    ("no key_file", "tls_server_config:\n  cert_file: server.crt\n", "tls_server_config.key_file: missing"),
    ("only min_version", "tls_server_config:\n  min_version: TLS13\n", "cert_file: missing"),
    (
        "cert_file number",
        "tls_server_config:\n  cert_file: 5\n  key_file: k\n",
        "cert_file: expected a string, got an integer",
    ),
    (
        "inline cert",
        TLS_MIN + "  cert: PEM\n",
        "tls_server_config.cert: inline certificates are not supported",
    ),
    (
        "inline key",
        TLS_MIN + "  key: PEM\n",
        "tls_server_config.key: inline keys are not supported; put the PEM",
    ),
    (
        "inline ca",
        TLS_MIN + "  client_ca: PEM\n",
        "tls_server_config.client_ca: an inline client CA is not supported",
    ),
    (
        "curves",
        TLS_MIN + "  curve_preferences: [X25519]\n",
        "curve_preferences: is not supported (Python's ssl",
    ),
    (
        "unknown tls key",
        TLS_MIN + "  ca_file: ca.crt\n",
        "tls_server_config.ca_file: unknown key; valid keys here are cert_file",
    ),
    (
        "RequestClientCert",
        TLS_MIN + "  client_auth_type: RequestClientCert\n  client_ca_file: ca.crt\n",
        "RequestClientCert is not supported (podnet never accepts a client certificate without "
        "verifying it); use VerifyClientCertIfGiven or RequireAndVerifyClientCert",
    ),
    (
        "RequireAnyClientCert",
        TLS_MIN + "  client_auth_type: RequireAnyClientCert\n",
        "RequireAnyClientCert is not supported",
    ),
    (
        "RequireClientCert",
        TLS_MIN + "  client_auth_type: RequireClientCert\n",
        "RequireClientCert is not supported",
    ),
    (
        "client auth typo",
        TLS_MIN + "  client_auth_type: RequireAndVerify\n",
        "unknown value 'RequireAndVerify'; use one of",
    ),
    (
        "client auth list",
        TLS_MIN + "  client_auth_type: [x]\n",
        "client_auth_type: expected a string, got a list",
    ),
    (
        "verify without CA",
        TLS_MIN + "  client_auth_type: RequireAndVerifyClientCert\n",
        "client_ca_file: missing, Requir",
    ),
    (
        "optional without CA",
        TLS_MIN + "  client_auth_type: VerifyClientCertIfGiven\n",
        "client_ca_file: missing, Verify",
    ),
    (
        "CA without auth",
        TLS_MIN + "  client_ca_file: ca.crt\n",
        "a client CA is configured but client_auth_type is NoClient",
    ),
    (
        "sans without auth",
        TLS_MIN + "  client_allowed_sans: [a]\n",
        "client names can only be checked on verified",
    ),
    ("sans empty", MTLS + "  client_allowed_sans: []\n", "client_allowed_sans: the list is empty"),
    (
        "sans string",
        MTLS + "  client_allowed_sans: a\n",
        "client_allowed_sans: expected a list of strings, got a string",
    ),
    (
        "sans number",
        MTLS + "  client_allowed_sans: [1]\n",
        "client_allowed_sans[0]: expected a string, got an integer",
    ),
    (
        "min_version unknown",
        TLS_MIN + "  min_version: TLS14\n",
        "min_version: unknown TLS version 'TLS14'; use one of TLS10",
    ),
    (
        "min_version float",
        TLS_MIN + "  min_version: 1.2\n",
        "min_version: expected a string, got a number (quote it)",
    ),
    (
        "max below min",
        TLS_MIN + "  min_version: TLS13\n  max_version: TLS12\n",
        "max_version: lower than min_version",
    ),
    (
        "insecure cipher",
        TLS_MIN + "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
        "cipher_suites[0]: unknown or insecure",
    ),
    (
        "openssl cipher name",
        TLS_MIN + "  cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256]\n",
        "unknown or insecure cipher",
    ),
    (
        "prefer string",
        TLS_MIN + "  prefer_server_cipher_suites: 'yes please'\n",
        "expected true or false, got a string",
    ),
    (
        "missing cert",
        "tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n",
        "cert_file: cannot read",
    ),
    (
        "missing key",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: nope.key\n",
        "key_file: cannot read",
    ),
    (
        "missing CA",
        TLS_MIN + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: no.crt\n",
        "client_ca_file: cannot read",
    ),
    (
        "cert garbage",
        "tls_server_config:\n  cert_file: garbage.pem\n  key_file: server.key\n",
        "garbage.pem holds no PEM certificate",
    ),
    (
        "cert is a key",
        "tls_server_config:\n  cert_file: server.key\n  key_file: server.key\n",
        "holds no PEM certificate",
    ),
    (
        "key garbage",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: garbage.pem\n",
        "garbage.pem holds no usable PEM private",
    ),
    (
        "key mismatch",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: client.key\n",
        "client.key is not the key of",
    ),
    (
        "key encrypted",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server-encrypted.key\n",
        "server-encrypted.key is encrypted; give an unencrypted PEM private key",
    ),
    (
        "CA garbage",
        TLS_MIN + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: garbage.pem\n",
        "client_ca_file: ",
    ),
    ("http list", "http_server_config: []\n", "http_server_config: expected a mapping, got a list"),
    (
        "http unknown key",
        "http_server_config:\n  http3: true\n",
        "http_server_config.http3: unknown key; valid keys here are http2",
    ),
    ("http2 string", "http_server_config:\n  http2: 'no'\n", "http2: expected true or false, got a string"),
    ("headers list", "http_server_config:\n  headers: [a]\n", "headers: expected a mapping, got a list"),
    (
        "header not allowed",
        "http_server_config:\n  headers:\n    Server: x\n",
        "headers.Server: this header cannot be configured",
    ),
    (
        "header case",
        "http_server_config:\n  headers:\n    x-frame-options: deny\n",
        "write it as X-Frame-Options",
    ),
    (
        "frame options",
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        "invalid value 'allow'; use one of deny",
    ),
    (
        "nosniff case",
        "http_server_config:\n  headers:\n    X-Content-Type-Options: NoSniff\n",
        "use one of nosniff",
    ),
    (
        "header number",
        "http_server_config:\n  headers:\n    X-XSS-Protection: 0\n",
        "got an integer (quote it)",
    ),
    (
        "header newline",
        'http_server_config:\n  headers:\n    Content-Security-Policy: "a\\nb"\n',
        "control characters",
    ),
    ("users list", "basic_auth_users: [alice]\n", "basic_auth_users: expected a mapping, got a list"),
    (
        "users plaintext",
        f"basic_auth_users:\n  alice: {PLAINTEXT}\n",
        "basic_auth_users.alice: the password hash is not a bcrypt",
    ),
    (
        "users cost 3",
        "basic_auth_users:\n  alice: '$2b$03$" + HASH[7:] + "'\n",
        "alice: the password hash is not a bcrypt",
    ),
    (
        "users 2x",
        "basic_auth_users:\n  alice: '$2x$" + HASH[4:] + "'\n",
        "alice: the password hash is not a bcrypt hash",
    ),
    (
        "users short hash",
        "basic_auth_users:\n  alice: '" + HASH[:-1] + "'\n",
        "alice: the password hash is not a bcrypt",
    ),
    (
        "users number",
        "basic_auth_users:\n  alice: 12\n",
        "alice: the password hash must be a string, got an integer",
    ),
    (
        "users null hash",
        "basic_auth_users:\n  alice:\n",
        "alice: the password hash must be a string, got null",
    ),
    (
        "users colon",
        f"basic_auth_users:\n  'a:b': {HASH}\n",
        "basic_auth_users.a:b: user names cannot contain ':'",
    ),
    ("users empty name", f"basic_auth_users:\n  '': {HASH}\n", "basic_auth_users: a user name is empty"),
    ("users swapped", f"basic_auth_users:\n  '{HASH}': alice\n", "a user name looks like a bcrypt hash"),
    (
        "users int key",
        f"basic_auth_users:\n  1234: {HASH}\n",
        "basic_auth_users: keys must be strings, got an integer key 1234",
    ),
]


@pytest.mark.parametrize(("text", "fragment"), [v[1:] for v in INVALID], ids=[v[0] for v in INVALID])
def test_invalid(pki: Pki, text: str, fragment: str) -> None:
    path = write(pki, text)
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    message = str(info.value)
    assert fragment in message
    assert message.startswith(f"web config file {path}")
    assert_one_clean_line(message, "hunter2")


def test_invalid_files(pki: Pki) -> None:
    for path, fragment in [
        (write(pki, b"basic_auth_users: {}\n\xff\xfe\n"), "not UTF-8 text (byte 21); save the file as UTF-8"),
        (str(pki.dir / "absent.yml"), "absent.yml: cannot read it (No such file or directory)"),
        (str(pki.dir), "cannot read it (Is a directory)"),
    ]:
        with pytest.raises(WebConfigError, match=r"^web config file .*") as info:
            load_web_config(path)
        assert fragment in str(info.value)
        assert_one_clean_line(str(info.value))


def test_message_is_one_line_even_for_a_file_name_with_line_breaks(pki: Pki) -> None:
    path = pki.dir / "bad\nname\u2028.yml"
    path.write_text("nope: 1\n")
    with pytest.raises(WebConfigError) as info:
        load_web_config(str(path))
    assert_one_clean_line(str(info.value))
    assert "bad\\nname\\u2028.yml: nope: unknown key" in str(info.value)


def test_bad_certificate_is_reported_by_ssl_context_after_load(pki: Pki) -> None:
    """A certificate replaced by junk after loading: ssl_context() (the reload path) reports it."""
    (pki.dir / "rotating.crt").write_bytes(pki.server.cert.read_bytes())
    config = load_web_config(
        write(pki, "tls_server_config:\n  cert_file: rotating.crt\n  key_file: server.key\n")
    )
    (pki.dir / "rotating.crt").write_text("junk")
    with pytest.raises(WebConfigError, match=r"rotating\.crt holds no PEM certificate"):
        config.ssl_context()


def test_files_stamp(pki: Pki) -> None:
    target = pki.dir / "stamped.txt"
    target.write_text("one")
    absent = str(pki.dir / "never-there")
    before = files_stamp([str(target), absent])
    assert before[1] is None and before[0] is not None
    assert files_stamp([str(target), absent]) == before
    target.write_text("three")
    assert files_stamp([str(target), absent]) != before
    replacement = pki.dir / "stamped.new"
    replacement.write_text("three")
    stamp = files_stamp([str(target)])
    replacement.replace(target)  # same size, maybe same mtime: the inode still differs
    assert files_stamp([str(target)]) != stamp


def test_unswappable_changes() -> None:
    base = TlsServerConfig("/c", "/k")
    assert base.unswappable_changes(TlsServerConfig("/c2", "/k2")) == ()
    assert base.unswappable_changes(
        TlsServerConfig("/c", "/k", "RequireAndVerifyClientCert", "/ca", ("a",), ssl.TLSVersion.TLSv1_3)
    ) == ("client_auth_type", "min_version")
    assert (
        base.unswappable_changes(
            TlsServerConfig("/c", "/k", client_ca_file="/ca", client_allowed_sans=("a",))
        )
        == ()
    )
    assert base.unswappable_changes(
        TlsServerConfig(
            "/c",
            "/k",
            max_version=ssl.TLSVersion.TLSv1_2,
            cipher_suites=("x",),
            prefer_server_cipher_suites=False,
        )
    ) == ("max_version", "cipher_suites", "prefer_server_cipher_suites")


# --- handshakes ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    accepted: bool
    """The server ran its handler: the handshake succeeded on both sides."""
    server_cn: str | None = None
    version: str | None = None
    cipher: str | None = None
    peercert: dict[str, Any] | None = None
    error: str = ""


def client_context(
    pki: Pki,
    cert: Pair | None = None,
    max_version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    if max_version is not None:
        ctx.maximum_version = max_version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> Outcome:
    return asyncio.run(asyncio.wait_for(_handshake(server, client), 20))


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> Outcome:
    # Refused handshakes are logged by asyncio as errors; they are the point here.
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
    seen: list[dict[str, Any] | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peercert"))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    outcome = Outcome(accepted=False)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
        )
        sslobj = writer.get_extra_info("ssl_object")
        subject = dict(item[0] for item in sslobj.getpeercert()["subject"])
        outcome.server_cn = subject["commonName"]
        outcome.version = sslobj.version()
        outcome.cipher = sslobj.cipher()[0]
        try:
            # With TLS 1.3 the client finishes first; a server refusing its certificate
            # shows up here, as an alert or an end of stream.
            data = await reader.read()
        except (ssl.SSLError, ConnectionError) as e:
            data, outcome.error = b"", repr(e)
        writer.close()
        outcome.accepted = data == b"ok" and len(seen) == 1
        outcome.peercert = seen[0] if seen else None
    except (ssl.SSLError, ConnectionError) as e:
        outcome.error = repr(e)
    finally:
        srv.close()
        await srv.wait_closed()
    return outcome


def context_of(pki: Pki, extra: str = "", base: str = TLS_MIN) -> tuple[WebConfig, ssl.SSLContext]:
    config = load_web_config(write(pki, base + extra))
    ctx = config.ssl_context()
    assert ctx is not None
    return config, ctx


def test_tls_presents_the_configured_certificate(pki: Pki) -> None:
    _, server = context_of(pki)
    outcome = handshake(server, client_context(pki))
    assert outcome.accepted and outcome.server_cn == "server" and outcome.version == "TLSv1.3"
    assert outcome.peercert is None  # NoClientCert: none asked for

    _, server2 = context_of(
        pki, base="tls_server_config:\n  cert_file: server2.crt\n  key_file: server2.key\n"
    )
    assert handshake(server2, client_context(pki)).server_cn == "server2"


def test_client_from_another_ca_does_not_trust_the_server(pki: Pki) -> None:
    _, server = context_of(pki)
    stranger = ssl.create_default_context(cafile=str(pki.ca2.cert))
    outcome = handshake(server, stranger)
    assert not outcome.accepted and "CERTIFICATE_VERIFY_FAILED" in outcome.error


def test_min_version_tls13_refuses_a_tls12_client(pki: Pki) -> None:
    _, server = context_of(pki, "  min_version: TLS13\n")
    assert not handshake(server, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)).accepted
    assert handshake(server, client_context(pki)).accepted

    _, default_min = context_of(pki)
    outcome = handshake(default_min, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2))
    assert outcome.accepted and outcome.version == "TLSv1.2"


def test_old_min_version_is_accepted_without_a_warning(pki: Pki) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, server = context_of(pki, "  min_version: TLS10\n  max_version: TLS12\n")
    assert config.tls is not None and config.tls.min_version is ssl.TLSVersion.TLSv1
    assert server.minimum_version is ssl.TLSVersion.TLSv1 and server.maximum_version is ssl.TLSVersion.TLSv1_2


def test_max_version(pki: Pki) -> None:
    _, server = context_of(pki, "  max_version: TLS12\n")
    outcome = handshake(server, client_context(pki))
    assert outcome.accepted and outcome.version == "TLSv1.2"


def test_require_and_verify_client_cert(pki: Pki) -> None:
    _, server = context_of(pki, base=MTLS)
    assert not handshake(server, client_context(pki)).accepted
    assert not handshake(server, client_context(pki, cert=pki.client_other_ca)).accepted
    outcome = handshake(server, client_context(pki, cert=pki.client))
    assert outcome.accepted
    assert (
        outcome.peercert is not None
        and dict(x[0] for x in outcome.peercert["subject"])["commonName"] == "client"
    )
    # Also over TLS 1.2, where the server refuses during the handshake itself.
    assert not handshake(server, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)).accepted
    assert handshake(
        server, client_context(pki, cert=pki.client, max_version=ssl.TLSVersion.TLSv1_2)
    ).accepted


def test_verify_client_cert_if_given(pki: Pki) -> None:
    _, server = context_of(pki, "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.crt\n")
    outcome = handshake(server, client_context(pki))
    assert outcome.accepted and not outcome.peercert
    assert not handshake(server, client_context(pki, cert=pki.client_other_ca)).accepted
    outcome = handshake(server, client_context(pki, cert=pki.client))
    assert outcome.accepted and outcome.peercert


@pytest.mark.parametrize(
    "allowed",
    [
        "scraper.example",
        "spiffe://cluster/ns/monitoring/sa/prometheus",
        "prom@example.com",
        "::1",
        "0:0:0:0:0:0:0:1",
    ],
)
def test_client_allowed_sans(pki: Pki, allowed: str) -> None:
    config, server = context_of(pki, f"  client_allowed_sans: ['{allowed}', nobody.example]\n", base=MTLS)
    right = handshake(server, client_context(pki, cert=pki.client))
    assert right.accepted and config.client_allowed(right.peercert)
    other = handshake(server, client_context(pki, cert=pki.client_other_name))
    assert other.accepted and other.peercert  # verified, but its name is not in the list
    assert not config.client_allowed(other.peercert)


def test_client_allowed_edge_cases(pki: Pki) -> None:
    config, _ = context_of(pki, "  client_allowed_sans: [a.example, 10.0.0.1]\n", base=MTLS)
    assert not config.client_allowed(None)
    assert not config.client_allowed({})
    assert not config.client_allowed({"subjectAltName": "a.example"})
    assert not config.client_allowed(
        {"subjectAltName": (("DNS", "b.example"), ("othername", "<unsupported>"))}
    )
    assert not config.client_allowed({"subjectAltName": (("IP Address", "a.example"), ("DNS", "10.0.0.1x"))})
    assert config.client_allowed({"subjectAltName": (("DNS", "b.example"), ("DNS", "a.example"))})
    assert config.client_allowed({"subjectAltName": (("IP Address", "10.0.0.1"),)})
    assert not config.client_allowed({"subjectAltName": (("DNS", "A.example"),)})  # exact, as in Go
    plain = load_web_config(write(pki, TLS_MIN))
    assert plain.client_allowed(None) and plain.client_allowed({})
    assert WebConfig("/x").client_allowed(None)


def test_cipher_suites_restrict_tls12(pki: Pki) -> None:
    _, server = context_of(
        pki, "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_AES_128_GCM_SHA256]\n"
    )
    tls12 = ssl.TLSVersion.TLSv1_2
    outcome = handshake(server, client_context(pki, max_version=tls12))
    assert outcome.accepted and outcome.cipher == "ECDHE-ECDSA-AES256-GCM-SHA384"
    refused = handshake(
        server, client_context(pki, max_version=tls12, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    )
    assert not refused.accepted
    assert handshake(server, client_context(pki)).version == "TLSv1.3"  # TLS 1.3 suites are not restricted


@pytest.mark.parametrize(
    ("prefer", "chosen"),
    [("true", "ECDHE-ECDSA-AES256-GCM-SHA384"), ("false", "ECDHE-ECDSA-AES128-GCM-SHA256")],
)
def test_prefer_server_cipher_suites(pki: Pki, prefer: str, chosen: str) -> None:
    _, server = context_of(
        pki,
        "  cipher_suites:\n"
        "    [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n"
        f"  prefer_server_cipher_suites: {prefer}\n",
    )
    client = client_context(
        pki,
        max_version=ssl.TLSVersion.TLSv1_2,
        ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384",
    )
    assert handshake(server, client).cipher == chosen


def test_sni_callback_swap_applies_certificate_and_ca_but_not_the_verify_mode(pki: Pki) -> None:
    """What a running listener gets from swapping a reloaded context in from its sni_callback
    (the premise of TlsServerConfig.unswappable_changes)."""
    _, listening = context_of(pki)
    new_config, reloaded = context_of(
        pki, base="tls_server_config:\n  cert_file: server2.crt\n  key_file: server2.key\n"
    )
    listening.sni_callback = lambda sslobj, name, ctx: setattr(sslobj, "context", reloaded)
    assert handshake(listening, client_context(pki)).server_cn == "server2"  # no SNI for an IP: still called

    _, strict = context_of(pki, "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n")
    listening.sni_callback = lambda sslobj, name, ctx: setattr(sslobj, "context", strict)
    assert handshake(listening, client_context(pki)).accepted  # NOT refused: the verify mode stayed
    assert (
        load_web_config(write(pki, TLS_MIN)).tls.unswappable_changes(  # type: ignore[union-attr]
            new_config.tls  # type: ignore[arg-type]
        )
        == ()
    )

    _, mtls_ca2 = context_of(
        pki, "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca2.crt\n"
    )
    _, mtls_ca = context_of(pki, base=MTLS)
    mtls_ca2.sni_callback = lambda sslobj, name, ctx: setattr(sslobj, "context", mtls_ca)
    assert handshake(mtls_ca2, client_context(pki, cert=pki.client)).accepted  # the CA store did swap
    assert not handshake(mtls_ca2, client_context(pki, cert=pki.client_other_ca)).accepted


# --- basic auth ---------------------------------------------------------------------------------


def basic(user: str | bytes, password: str | bytes) -> str:
    u = user.encode() if isinstance(user, str) else user
    p = password.encode() if isinstance(password, str) else password
    return "Basic " + base64.b64encode(u + b":" + p).decode()


@pytest.fixture
def auth() -> BasicAuth:
    return BasicAuth({"alice": HASH, "bob": HASH_2Y, "carol": HASH_2A})


def test_basic_auth_verdicts(auth: BasicAuth) -> None:
    assert auth.check(basic("alice", PASSWORD))
    assert auth.check(basic("bob", PASSWORD))  # $2y$, as htpasswd writes
    assert auth.check(basic("carol", PASSWORD))
    assert auth.check("basic " + basic("alice", PASSWORD)[6:])  # the scheme is case-insensitive
    assert not auth.check(basic("alice", "wrong"))
    assert not auth.check(basic("alice", PASSWORD + b"x"))
    assert not auth.check(basic("mallory", PASSWORD))
    assert not auth.check(basic("Alice", PASSWORD))
    assert not auth.check(basic(b"\xff\xfe", PASSWORD))
    assert not auth.check(basic("alice", b"p\0w"))


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Basic ",
        "Bearer abc",
        "Basic !!!!",
        "Basic " + base64.b64encode(b"no colon").decode(),
        "Basic " + base64.b64encode(b"alice:" + PASSWORD).decode().rstrip("="),
        "Basic  " + base64.b64encode(b"alice:" + PASSWORD).decode(),
        "Basic ÿÿÿÿ",
        "Digest username=alice",
    ],
)
def test_basic_auth_malformed(auth: BasicAuth, header: str | None) -> None:
    assert auth.cached(header) is False
    assert auth.check(header) is False
    assert len(auth._cache) == 0  # no bcrypt, nothing cached


def test_basic_auth_cache(auth: BasicAuth, monkeypatch: pytest.MonkeyPatch) -> None:
    right, wrong = basic("alice", PASSWORD), basic("alice", "wrong")
    assert auth.cached(right) is None and auth.cached(wrong) is None
    assert auth.check(right) and not auth.check(wrong)
    assert auth.cached(right) is True and auth.cached(wrong) is False

    def no_bcrypt(password: bytes, hashed: bytes) -> bool:
        raise AssertionError("bcrypt ran for a cached header")

    monkeypatch.setattr(bcrypt, "checkpw", no_bcrypt)
    assert auth.check(right) and not auth.check(wrong)


def test_basic_auth_cache_is_a_bounded_lru() -> None:
    auth = BasicAuth({"alice": HASH}, cache_size=3)
    headers = [basic("alice", f"guess-{i}") for i in range(10)]
    for header in headers:
        auth.check(header)
        assert len(auth._cache) <= 3
    assert len(auth._cache) == 3
    assert [auth.cached(h) for h in headers[-3:]] == [False, False, False]
    assert auth.cached(headers[0]) is None

    a, b, c = headers[:3]
    auth = BasicAuth({"alice": HASH}, cache_size=2)
    auth.check(a)
    auth.check(b)
    assert auth.cached(a) is False  # a is now the most recently used
    auth.check(c)
    assert auth.cached(a) is False and auth.cached(b) is None

    with pytest.raises(ValueError):
        BasicAuth({}, cache_size=0)


def test_basic_auth_cache_never_holds_the_password(auth: BasicAuth) -> None:
    header = basic("alice", PASSWORD)
    assert auth.check(header)
    assert not auth.check(basic("alice", PLAINTEXT))
    for key, verdict in auth._cache.items():
        assert isinstance(verdict, bool) and len(key) == 32
        for secret in (PASSWORD, PLAINTEXT.encode(), header.encode(), base64.b64encode(PASSWORD)):
            assert secret not in key
    state = repr(vars(auth))
    for text in (PASSWORD.decode(), PLAINTEXT, header, header[6:]):
        assert text not in state


def test_unknown_user_costs_one_bcrypt_at_the_highest_configured_cost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cost5 = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=5)).decode()
    auth = BasicAuth({"alice": HASH, "dave": cost5})
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    assert not auth.check(basic("mallory", PASSWORD))
    assert not auth.check(basic(b"\xff", PASSWORD))
    assert len(calls) == 2 and all(h.startswith(b"$2b$05$") for h in calls)
    assert not auth.check(basic("mallory", HASH))  # the dummy never matches, whatever is sent
    assert not auth.check(basic("mallory", ""))


def test_basic_auth_only_the_first_72_bytes_count() -> None:
    long = b"x" * 72
    auth = BasicAuth({"alice": bcrypt.hashpw(long, bcrypt.gensalt(rounds=4)).decode()})
    assert auth.check(basic("alice", long + b"anything"))  # as Go's bcrypt, and bcrypt itself
    assert not auth.check(basic("alice", long[:-1]))


def test_basic_auth_with_an_invalid_hash_refuses() -> None:
    auth = BasicAuth({"alice": "not a hash", "bob": "$2b$04$short", "eve": "ünïcode"})
    assert not auth.check(basic("alice", "not a hash"))
    assert not auth.check(basic("bob", PASSWORD))
    assert not auth.check(basic("eve", "ünïcode"))
    assert not BasicAuth({}).check(basic("alice", PASSWORD))


# --- properties ---------------------------------------------------------------------------------

KNOWN_KEYS = [
    *web_config.TOP_KEYS,
    *web_config.TLS_KEYS,
    *web_config.HTTP_KEYS,
    *web_config.HEADERS,
    "cert",
    "key",
    "curve_preferences",
    "rate_limit",
    "alice",
]
KNOWN_VALUES = [
    "server.crt",
    "server.key",
    "ca.crt",
    "client.key",
    "garbage.pem",
    "TLS12",
    "TLS13",
    "RequireAndVerifyClientCert",
    "VerifyClientCertIfGiven",
    "NoClientCert",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "deny",
    "nosniff",
    HASH,
]
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=10) | st.integers()
yaml_like = st.recursive(
    scalars | st.sampled_from(KNOWN_VALUES),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)
documents = st.dictionaries(st.sampled_from(KNOWN_KEYS), yaml_like, max_size=4) | yaml_like


def _load_or_error(pki: Pki, data: bytes) -> None:
    try:
        config = load_web_config(write(pki, data))
    except WebConfigError as e:
        assert_one_clean_line(str(e))
    else:
        assert isinstance(config, WebConfig)
        config.files()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_any_text_loads_or_raises_web_config_error(pki: Pki, data: str | bytes) -> None:
    _load_or_error(pki, data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_yaml_structure_loads_or_raises_web_config_error(pki: Pki, document: object) -> None:
    _load_or_error(pki, yaml.safe_dump(document, allow_unicode=True).encode("utf-8", "surrogatepass"))


@pytest.fixture(scope="module")
def shared_auth() -> Iterator[BasicAuth]:
    yield BasicAuth({"alice": HASH, "": HASH, "x:y": HASH}, cache_size=16)


headers = (
    st.none()
    | st.text(max_size=60)
    | st.text(max_size=60).map(lambda s: "Basic " + s)
    | st.tuples(st.sampled_from([b"alice", b"bob", b""]) | st.binary(max_size=8), st.binary(max_size=80)).map(
        lambda up: basic(*up)
    )
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers)
def test_any_authorization_header_gives_a_bool(shared_auth: BasicAuth, header: str | None) -> None:
    cached = shared_auth.cached(header)
    assert cached is None or isinstance(cached, bool)
    verdict = shared_auth.check(header)
    assert verdict is False
    assert shared_auth.cached(header) is False
    assert len(shared_auth._cache) <= 16
