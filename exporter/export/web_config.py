"""The Prometheus exporter-toolkit web configuration file (``--web.config.file``).

The format is the one node_exporter and the other exporter-toolkit users read
(https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md):
``tls_server_config``, ``http_server_config`` and ``basic_auth_users``. Validation is as strict
as exporter-toolkit's (unknown keys are errors), and every problem is a :class:`WebConfigError`
whose text is one line naming the file, the key, the problem and the fix, never a secret.

Where Python's ssl module cannot do what Go's crypto/tls does, the file is refused rather than
half-applied:

* ``client_auth_type`` RequestClientCert and RequireAnyClientCert (and the old alias
  RequireClientCert) accept client certificates without verifying them; OpenSSL through Python
  only ever accepts verified ones, so they are errors. VerifyClientCertIfGiven and
  RequireAndVerifyClientCert work as in Go.
* ``curve_preferences`` cannot be set (Python's ssl has no curve-list API): an error.
* Inline ``cert``, ``key`` and ``client_ca`` (newer toolkits) are errors: use the ``*_file`` keys,
  which is also what lets a reload notice a renewed certificate.
* ``rate_limit`` (newer toolkits) is not implemented: an error.
* ``client_allowed_sans`` needs a verifying ``client_auth_type`` (Go silently ignores it without
  one) and must not be an empty list (Go would then refuse every client).
* Values where the format wants a string must be YAML strings: ``X-XSS-Protection: 0`` must be
  written ``X-XSS-Protection: "0"`` (Go's YAML library converts the number; a converted number
  would not always be what was written, e.g. ``0o17``).

Other notes:

* ``http_server_config.http2`` is accepted and validated, but podnet serves HTTP/1.1 only.
* ``cipher_suites`` takes the Go (IANA) names of the suites Go's ``tls.CipherSuites()`` lists and
  restricts TLS 1.2 and older; TLS 1.3 suites are accepted and ignored, as in Go (they are not
  configurable). ``min_version`` TLS10/TLS11 are accepted, but OpenSSL 3 at its default security
  level refuses those protocol versions anyway.
* Relative file names are resolved against the directory of the configuration file, as
  exporter-toolkit does. A ``tls_server_config`` that is absent, null or empty means plain HTTP.
* Header values that are empty or null are not sent ("unset if blank" in the toolkit's docs).
* Basic auth passwords are checked like Go's bcrypt does: only the first 72 bytes count.
* The server's TLS settings live in an :class:`ssl.SSLContext` built by
  :meth:`WebConfig.ssl_context`; the toolkit rereads the file on each request, podnet reloads
  when :func:`files_stamp` of :meth:`WebConfig.files` changes.

Everything that reads files or runs bcrypt is blocking; run it off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import ssl
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import bcrypt
import yaml

__all__ = [
    "BasicAuth",
    "TlsServerConfig",
    "WebConfig",
    "WebConfigError",
    "files_stamp",
    "load_web_config",
    "load_web_config_with_context",
]


class WebConfigError(Exception):
    """A web configuration file that cannot be used. ``str()`` is always a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


def _one_line(text: str) -> str:
    # File names and YAML snippets can hold line breaks (also the Unicode ones splitlines() honours).
    return "".join(
        c if c.isprintable() or c == " " else c.encode("unicode_escape", "backslashreplace").decode("ascii")
        for c in text
    )


TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users")
TLS_KEYS = (
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
)
HTTP_KEYS = ("http2", "headers")

_TOP_UNSUPPORTED = {
    "rate_limit": "is not supported by podnet; remove it (rate-limit in a proxy in front of the exporter)",
}
_TLS_UNSUPPORTED = {
    "cert": "inline certificates are not supported; put the PEM in a file and name it with cert_file",
    "key": "inline keys are not supported; put the PEM in a file and name it with key_file",
    "client_ca": "an inline client CA is not supported; put the PEM in a file, name it with client_ca_file",
    "curve_preferences": "is not supported (Python's ssl cannot set a curve list); remove it",
}

CLIENT_AUTH_TYPES: Mapping[str, ssl.VerifyMode] = MappingProxyType(
    {
        "NoClientCert": ssl.CERT_NONE,
        "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
        "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
    }
)
_UNVERIFIED_CLIENT_AUTH = frozenset({"RequestClientCert", "RequireAnyClientCert", "RequireClientCert"})

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = MappingProxyType(
    {
        "TLS10": ssl.TLSVersion.TLSv1,
        "TLS11": ssl.TLSVersion.TLSv1_1,
        "TLS12": ssl.TLSVersion.TLSv1_2,
        "TLS13": ssl.TLSVersion.TLSv1_3,
    }
)

CIPHER_SUITES: Mapping[str, str] = MappingProxyType(
    {
        # Go's tls.CipherSuites() for TLS 1.0-1.2 -> OpenSSL names (`openssl ciphers -stdname`).
        "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
        "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
        "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
        "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
        "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    }
)
TLS13_CIPHER_SUITES = frozenset(
    {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
)
"""Accepted in cipher_suites and ignored: TLS 1.3 suites are not configurable (as in Go)."""

HEADERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # exporter-toolkit's extraHTTPHeaders: name -> allowed values (empty: any value).
        "Content-Security-Policy": (),
        "X-Frame-Options": ("deny", "sameorigin"),
        "X-Content-Type-Options": ("nosniff",),
        "X-XSS-Protection": (),
        "Strict-Transport-Security": (),
    }
)

BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_MAX_PASSWORD = 72
"""bcrypt only ever uses the first 72 bytes (Go's too); the Python package refuses longer ones."""


@dataclass(frozen=True)
class TlsServerConfig:
    """``tls_server_config``, validated; file names are absolute."""

    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    client_allowed_sans: tuple[str, ...] = ()
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion | None = None
    """None: the highest the OpenSSL build supports."""
    cipher_suites: tuple[str, ...] = ()
    """Go (IANA) names as written; empty: OpenSSL's defaults as Python configures them."""
    prefer_server_cipher_suites: bool = True

    def unswappable_changes(self, new: TlsServerConfig) -> tuple[str, ...]:
        """The keys that differ in `new` and that swapping `new`'s context into a running listener
        (``SSLObject.context = ...`` in its ``sni_callback``) would not apply.

        OpenSSL takes the certificate, the key and the client CA store from the swapped-in context,
        but the verify mode, protocol versions, ciphers and options stay those of the listener's own
        context. Non-empty: restart the listener, or refuse the reload; applying the rest would
        silently run with the old client_auth_type.
        """
        fixed = (
            "client_auth_type",
            "min_version",
            "max_version",
            "cipher_suites",
            "prefer_server_cipher_suites",
        )
        return tuple(k for k in fixed if getattr(self, k) != getattr(new, k))


def _frozen(mapping: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class WebConfig:
    """A loaded web configuration file. Build it with :func:`load_web_config`."""

    path: str
    tls: TlsServerConfig | None = None
    basic_auth_users: Mapping[str, str] = field(default_factory=_frozen)
    """user -> bcrypt hash; empty: no basic auth."""
    headers: Mapping[str, str] = field(default_factory=_frozen)
    """Response headers to add to every response (http_server_config.headers)."""
    http2: bool = True
    """As written; podnet serves HTTP/1.1 regardless."""

    def files(self) -> tuple[str, ...]:
        """The configuration file and every file it names: reload when one of them changes."""
        if self.tls is None:
            return (self.path,)
        named = (self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file)
        return (self.path, *(f for f in named if f is not None))

    def ssl_context(self) -> ssl.SSLContext | None:
        """A new server context from the files as they are now; None without TLS.

        Blocking (reads the certificate files). Raises WebConfigError when a file is unreadable,
        holds no usable PEM, or the certificate does not match the key.
        """
        if self.tls is None:
            return None
        return _server_context(self.path, self.tls)

    def client_allowed(self, peercert: Mapping[str, Any] | None) -> bool:
        """Whether a client may proceed, given ``getpeercert()`` of its (verified) certificate.

        True when no ``client_allowed_sans`` are configured; otherwise the certificate must have a
        DNS, IP, email or URI subject alternative name equal to one of them (IP addresses are
        compared as addresses, so ``::1`` matches however OpenSSL spells it).
        """
        allowed = self.tls.client_allowed_sans if self.tls is not None else ()
        if not allowed:
            return True
        if not peercert:
            return False
        names = set(allowed)
        ips = {ip for ip in map(_ip, allowed) if ip is not None}
        sans = peercert.get("subjectAltName", ())
        if not isinstance(sans, tuple | list):
            return False
        for entry in sans:
            if not (isinstance(entry, tuple | list) and len(entry) == 2):
                continue
            kind, value = entry
            if not isinstance(value, str):
                continue
            if kind == "IP Address":
                ip = _ip(value.strip())
                if ip is not None and ip in ips:
                    return True
            elif kind in ("DNS", "email", "URI") and value in names:
                return True
        return False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def files_stamp(paths: Iterable[str]) -> tuple[tuple[int, int, int] | None, ...]:
    """(inode, mtime ns, size) per path, None when it cannot be stat'ed; compare two stamps to
    notice a change. stat() follows symlinks, so a Kubernetes Secret's ..data swap counts."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            stamps.append(None)
        else:
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


# --- loading ------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, as Go's yaml.UnmarshalStrict does."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_short(key)}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def load_web_config(path: str) -> WebConfig:
    """Read and validate the file at `path`, including its certificates (blocking)."""
    return load_web_config_with_context(path)[0]


def load_web_config_with_context(path: str) -> tuple[WebConfig, ssl.SSLContext | None]:
    """As load_web_config, and the TLS context the validation built (None without TLS), so
    that serving does not read and parse the certificates a second time."""
    return _Loader(path).load()


class _Loader:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.base = os.path.dirname(self.path)

    def error(self, key: str, problem: str, fix: str) -> WebConfigError:
        where = f"{self.path}: {key}" if key else self.path
        return WebConfigError(f"web config file {where}: {problem}; {fix}")

    def load(self) -> tuple[WebConfig, ssl.SSLContext | None]:
        data = self.read()
        top = self.mapping(
            data, "", "write a YAML mapping with tls_server_config, http_server_config or basic_auth_users"
        )
        self.known_keys(top, "", TOP_KEYS, _TOP_UNSUPPORTED)
        tls = self.tls(top.get("tls_server_config"))
        http2, headers = self.http(top.get("http_server_config"))
        users = self.users(top.get("basic_auth_users"))
        config = WebConfig(self.path, tls, _frozen(users), _frozen(headers), http2)
        # Built now, so that an unusable certificate fails here, not at the first connection.
        return config, config.ssl_context()

    def read(self) -> object:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise self.error(
                "", f"cannot read it ({e.strerror or type(e).__name__})", "check the path and permissions"
            ) from None
        except ValueError as e:  # e.g. an embedded NUL in the path
            raise self.error("", f"invalid path ({e})", "pass a valid file name") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise self.error("", f"not UTF-8 text (byte {e.start})", "save the file as UTF-8") from None
        try:
            return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            at = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
            problem = e.problem or e.context or "invalid YAML"
            raise self.error("", f"invalid YAML at {at}{problem}"[:300], "fix the YAML syntax") from None
        except Exception as e:
            # Hostile input reaches PyYAML errors that are not YAMLError: deep nesting
            # (RecursionError), impossible timestamps (ValueError), ...
            raise self.error("", f"invalid YAML ({type(e).__name__})", "fix the YAML syntax") from None

    # - shapes -

    def mapping(self, value: object, key: str, fix: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {_kind(value)}", fix)
        for k in value:
            if not isinstance(k, str):
                raise self.error(
                    key, f"keys must be strings, got {_kind(k)} key {_short(k)}", "quote the key"
                )
        return value

    def known_keys(
        self, section: Mapping[str, Any], key: str, valid: tuple[str, ...], unsupported: Mapping[str, str]
    ) -> None:
        for k in section:
            name = f"{key}.{k}" if key else k
            if k in unsupported:
                problem, _, fix = unsupported[k].partition("; ")
                raise self.error(name, problem, fix)
            if k not in valid:
                raise self.error(name, "unknown key", "valid keys here are " + ", ".join(valid))

    def string(self, value: object, key: str, fix: str) -> str:
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, int | float) else ""
            raise self.error(key, f"expected a string, got {_kind(value)}{hint}", fix)
        return value

    def boolean(self, value: object, key: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_kind(value)}", "write true or false")
        return value

    def strings(self, value: object, key: str, fix: str) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings, got {_kind(value)}", fix)
        return tuple(self.string(item, f"{key}[{i}]", fix) for i, item in enumerate(value))

    def file(self, value: object, key: str, required: bool) -> str | None:
        if value is None or value == "":
            if required:
                raise self.error(
                    key, "missing", "name the PEM file (relative names are relative to this file)"
                )
            return None
        name = self.string(value, key, "write the file name as a string")
        if "\0" in name:
            raise self.error(key, "the file name contains a NUL character", "fix the file name")
        return os.path.normpath(os.path.join(self.base, name))

    # - sections -

    def tls(self, value: object) -> TlsServerConfig | None:
        key = "tls_server_config"
        section = self.mapping(value, key, "write a mapping with cert_file and key_file")
        if not section:
            return None
        self.known_keys(section, key, TLS_KEYS, _TLS_UNSUPPORTED)
        cert_file = self.file(section.get("cert_file"), f"{key}.cert_file", required=True)
        key_file = self.file(section.get("key_file"), f"{key}.key_file", required=True)
        assert cert_file is not None and key_file is not None  # required=True
        ca_file = self.file(section.get("client_ca_file"), f"{key}.client_ca_file", required=False)

        auth_key = f"{key}.client_auth_type"
        auth_value = section.get("client_auth_type")
        auth = (
            "NoClientCert"
            if auth_value in (None, "")
            else self.string(auth_value, auth_key, "write one of " + ", ".join(CLIENT_AUTH_TYPES))
        )
        if auth in _UNVERIFIED_CLIENT_AUTH:
            raise self.error(
                auth_key,
                f"{auth} is not supported (podnet never accepts a client certificate without verifying it)",
                "use VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file",
            )
        if auth not in CLIENT_AUTH_TYPES:
            raise self.error(
                auth_key, f"unknown value {_short(auth)}", "use one of " + ", ".join(CLIENT_AUTH_TYPES)
            )
        if auth == "NoClientCert":
            if ca_file is not None:
                raise self.error(
                    f"{key}.client_ca_file",
                    "a client CA is configured but client_auth_type is NoClientCert",
                    "set client_auth_type to RequireAndVerifyClientCert or VerifyClientCertIfGiven,"
                    " or remove client_ca_file",
                )
        elif ca_file is None:
            raise self.error(
                f"{key}.client_ca_file",
                f"missing, {auth} needs it",
                "name the PEM file of the CA that signs client certificates",
            )

        sans_key = f"{key}.client_allowed_sans"
        sans = self.strings(
            section.get("client_allowed_sans"),
            sans_key,
            "list the allowed DNS, IP, email or URI names as strings",
        )
        if sans is not None:
            if not sans:
                raise self.error(
                    sans_key,
                    "the list is empty (it would refuse every client)",
                    "list allowed names or remove the key",
                )
            if auth == "NoClientCert":
                raise self.error(
                    sans_key,
                    "client names can only be checked on verified client certificates",
                    "set client_auth_type to RequireAndVerifyClientCert",
                )

        min_version = self.version(section.get("min_version"), f"{key}.min_version") or ssl.TLSVersion.TLSv1_2
        max_version = self.version(section.get("max_version"), f"{key}.max_version")
        if max_version is not None and max_version < min_version:
            raise self.error(
                f"{key}.max_version", "lower than min_version", "raise max_version or lower min_version"
            )

        suites_key = f"{key}.cipher_suites"
        suites = (
            self.strings(section.get("cipher_suites"), suites_key, "list Go cipher suite names as strings")
            or ()
        )
        for i, name in enumerate(suites):
            if name not in CIPHER_SUITES and name not in TLS13_CIPHER_SUITES:
                raise self.error(
                    f"{suites_key}[{i}]",
                    f"unknown or insecure cipher suite {_short(name)}",
                    "use names from Go's tls.CipherSuites(), e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                )
        prefer = self.boolean(
            section.get("prefer_server_cipher_suites"), f"{key}.prefer_server_cipher_suites", True
        )
        return TlsServerConfig(
            cert_file=cert_file,
            key_file=key_file,
            client_auth_type=auth,
            client_ca_file=ca_file,
            client_allowed_sans=sans or (),
            min_version=min_version,
            max_version=max_version,
            cipher_suites=suites,
            prefer_server_cipher_suites=prefer,
        )

    def version(self, value: object, key: str) -> ssl.TLSVersion | None:
        if value is None:
            return None
        fix = "use one of " + ", ".join(TLS_VERSIONS)
        name = self.string(value, key, fix)
        if name not in TLS_VERSIONS:
            raise self.error(key, f"unknown TLS version {_short(name)}", fix)
        return TLS_VERSIONS[name]

    def http(self, value: object) -> tuple[bool, dict[str, str]]:
        key = "http_server_config"
        section = self.mapping(value, key, "write a mapping with http2 and/or headers")
        self.known_keys(section, key, HTTP_KEYS, {})
        http2 = self.boolean(section.get("http2"), f"{key}.http2", True)
        headers_key = f"{key}.headers"
        configured = self.mapping(
            section.get("headers"), headers_key, "write a mapping of header name to value"
        )
        headers: dict[str, str] = {}
        for name, raw in configured.items():
            hkey = f"{headers_key}.{name}"
            if name not in HEADERS:
                same = [h for h in HEADERS if h.lower() == name.lower()]
                fix = f"write it as {same[0]}" if same else "configurable headers are " + ", ".join(HEADERS)
                raise self.error(hkey, "this header cannot be configured", fix)
            if raw is None or raw == "":
                continue
            text = self.string(raw, hkey, "write the header value as a string")
            allowed = HEADERS[name]
            if allowed and text not in allowed:
                raise self.error(hkey, f"invalid value {_short(text)}", "use one of " + ", ".join(allowed))
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
                raise self.error(
                    hkey, "the value contains control characters", "remove line breaks and control characters"
                )
            headers[name] = text
        return http2, headers

    def users(self, value: object) -> dict[str, str]:
        key = "basic_auth_users"
        section = self.mapping(value, key, "write a mapping of user name to bcrypt hash")
        users: dict[str, str] = {}
        for user, hashed in section.items():
            if BCRYPT_HASH.fullmatch(user):
                raise self.error(
                    key, "a user name looks like a bcrypt hash", "write each entry as `user: hash`"
                )
            ukey = f"{key}.{user}"
            if not user:
                raise self.error(key, "a user name is empty", "give every user a name")
            if ":" in user:
                raise self.error(
                    ukey, "user names cannot contain ':' (basic auth splits on it)", "rename the user"
                )
            fix = "hash the password with bcrypt (e.g. htpasswd -nBC 10 USER) and give the $2y$... part"
            if not isinstance(hashed, str):
                raise self.error(ukey, f"the password hash must be a string, got {_kind(hashed)}", fix)
            if not BCRYPT_HASH.fullmatch(hashed):
                raise self.error(
                    ukey, "the password hash is not a bcrypt hash ($2a$, $2b$ or $2y$, cost 4-31)", fix
                )
            users[user] = hashed
        return users


# --- TLS ----------------------------------------------------------------------------------------


def _server_context(path: str, tls: TlsServerConfig) -> ssl.SSLContext:
    def error(key: str, problem: str, fix: str) -> WebConfigError:
        return WebConfigError(f"web config file {path}: tls_server_config.{key}: {problem}; {fix}")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        if tls.min_version < ssl.TLSVersion.TLSv1_2:
            # Python warns that TLS 1.0/1.1 are deprecated; the file asked for them knowingly.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = tls.min_version
        else:
            ctx.minimum_version = tls.min_version
    except (ValueError, ssl.SSLError) as e:
        raise error("min_version", f"not supported by this OpenSSL ({e})", "raise min_version") from None
    if tls.max_version is not None:
        try:
            ctx.maximum_version = tls.max_version
        except (ValueError, ssl.SSLError) as e:
            raise error("max_version", f"not supported by this OpenSSL ({e})", "change max_version") from None
    openssl_names = [CIPHER_SUITES[s] for s in tls.cipher_suites if s in CIPHER_SUITES]
    if openssl_names:
        try:
            ctx.set_ciphers(":".join(openssl_names))
        except ssl.SSLError:
            raise error(
                "cipher_suites", "OpenSSL supports none of them", "list other cipher suites"
            ) from None
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE

    _readable(tls.cert_file, "cert_file", error)
    _readable(tls.key_file, "key_file", error)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # Loading the certificate alone first tells a bad cert_file from a bad key_file.
        probe.load_verify_locations(cafile=tls.cert_file)
    except (ssl.SSLError, OSError, ValueError):
        raise error(
            "cert_file", f"{tls.cert_file} holds no PEM certificate", "point it at the PEM server certificate"
        ) from None

    encrypted = False

    def no_password() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
        nonlocal encrypted
        encrypted = True
        return b""

    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=no_password)
    except (ssl.SSLError, OSError, ValueError) as e:
        if getattr(e, "reason", None) == "KEY_VALUES_MISMATCH":
            raise error(
                "key_file",
                f"{tls.key_file} is not the key of {tls.cert_file}",
                "give the key that matches the certificate",
            ) from None
        if encrypted:
            raise error(
                "key_file", f"{tls.key_file} is encrypted", "give an unencrypted PEM private key"
            ) from None
        raise error(
            "key_file",
            f"{tls.key_file} holds no usable PEM private key",
            "give the certificate's unencrypted PEM key",
        ) from None

    if tls.client_ca_file is not None:
        _readable(tls.client_ca_file, "client_ca_file", error)
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        except (ssl.SSLError, OSError, ValueError):
            raise error(
                "client_ca_file",
                f"{tls.client_ca_file} holds no PEM certificate",
                "point it at the PEM CA certificate(s)",
            ) from None
    ctx.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    return ctx


def _readable(file: str, key: str, error: Callable[[str, str, str], WebConfigError]) -> None:
    try:
        with open(file, "rb"):
            pass
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise error(key, f"cannot read {file} ({reason})", "check the path and permissions") from None


# --- basic auth ---------------------------------------------------------------------------------


def _parse_basic(authorization: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) of a ``Basic`` Authorization header value; None when absent or malformed."""
    if authorization is None or len(authorization) < 6 or authorization[:6].lower() != "basic ":
        return None
    try:
        token = authorization[6:].encode("ascii")
        decoded = base64.b64decode(token, validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return user, password


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against bcrypt hashes, with a verdict cache.

    Thread-safe: :meth:`check` is meant to run in worker threads while :meth:`cached` runs on the
    event loop. bcrypt runs one at a time, as in exporter-toolkit, so that a flood of guesses uses
    one core. The cache is keyed by a keyed SHA-256 of the whole header value: it never holds a
    password, and its keys cannot be matched against a table of precomputed hashes.
    """

    def __init__(self, users: Mapping[str, str], cache_size: int = 256) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._users = {user: hashed.encode("ascii", "replace") for user, hashed in users.items()}
        costs = [int(h[4:6]) for h in users.values() if BCRYPT_HASH.fullmatch(h)]
        # An unknown user costs as much as the costliest real one, so timing does not tell them
        # apart. A syntactically valid hash with an arbitrary digest: checking it takes the full
        # time and never matches; making it costs nothing.
        self._dummy = bcrypt.gensalt(rounds=max(costs, default=10), prefix=b"2b") + b"." * 31
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()

    def _cache_key(self, authorization: str) -> bytes:
        return hmac.new(self._key, authorization.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def _get(self, key: bytes) -> bool | None:
        with self._cache_lock:
            verdict = self._cache.get(key)
            if verdict is not None:
                self._cache.move_to_end(key)
            return verdict

    def _put(self, key: bytes, verdict: bool) -> None:
        with self._cache_lock:
            self._cache[key] = verdict
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def cached(self, authorization: str | None) -> bool | None:
        """The verdict when it is known without bcrypt (cached, or a missing/malformed header);
        None when :meth:`check` must run."""
        if _parse_basic(authorization) is None:
            return False
        assert authorization is not None
        return self._get(self._cache_key(authorization))

    def check(self, authorization: str | None) -> bool:
        """Whether the header carries a configured user and its password. Blocking (bcrypt)."""
        parsed = _parse_basic(authorization)
        if parsed is None:
            return False
        assert authorization is not None
        key = self._cache_key(authorization)
        verdict = self._get(key)
        if verdict is not None:
            return verdict
        with self._bcrypt_lock:
            verdict = self._get(key)  # another thread may have checked the same header meanwhile
            if verdict is None:
                verdict = self._verify(*parsed)
                self._put(key, verdict)
        return verdict

    def _verify(self, user: bytes, password: bytes) -> bool:
        try:
            stored = self._users.get(user.decode("utf-8"))
        except UnicodeDecodeError:
            stored = None
        try:
            ok = bcrypt.checkpw(password[:_MAX_PASSWORD], stored if stored is not None else self._dummy)
        except ValueError:  # a hash that was never validated (BasicAuth built by hand)
            ok = False
        return ok and stored is not None
