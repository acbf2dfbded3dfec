"""The values of podnet-exporter's settings: one parser per kind of value (numbers, choices,
files, addresses, URLs, headers), each validating and, on a bad value, raising one
ConfigError line that names the flag, variable or file key it came from (_Given) and an
example. Internal to exporter.app: settings.py builds the settings table from these.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar
from urllib.parse import unquote, urlsplit

from exporter.export.otlp_config import redact_urls
from exporter.kernel.programs import REQUEST_MODES, TLS_MODES, RequestMode, TlsMode

_T = TypeVar("_T")

_PROG: Final = "podnet-exporter"
_MAX_POLL_INTERVAL: Final = 3600.0
_MIN_MAP_ENTRIES: Final = 1024
_MAX_MAP_ENTRIES: Final = 4194304
_OTLP_PROTOCOLS: Final = ("grpc", "http/protobuf")
# The spec's "lowmemory" is accepted from OTEL_* only and kept verbatim: it means delta for counters
# but cumulative for up-down counters, which only the OTLP exporter can apply.
_OTEL_TEMPORALITIES: Final = ("cumulative", "delta", "lowmemory")

# Where Kubernetes mounts a pod's service-account credentials; a module variable so tests can move it.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_HOST_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", re.ASCII)
_DIGITS: Final = re.compile(r"[0-9]+", re.ASCII)
# RFC 9110 token: what an HTTP header name (and a gRPC metadata key, once lowercased) may contain.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)
_TRUE: Final = ("true", "1", "yes", "on")
_FALSE: Final = ("false", "0", "no", "off")
_SHOW_MAX: Final = 80


class ConfigError(Exception):
    """One line naming the problem and the fix, e.g.
    "--listen 'nonsense:port': port must be a number 1-65535 (example: --listen 0.0.0.0:9436)"."""

    def __init__(self, message: str) -> None:
        # The message is logged as a single line, but text embedded from argparse, YAML or file paths
        # may carry line breaks.
        super().__init__(" ".join(part.strip() for part in message.splitlines() if part.strip()))


@dataclass(frozen=True)
class _Given:
    """A raw setting and its origin, so that any problem with it can name the flag, variable or key."""

    value: object
    source: str  # "--listen", "PODNET_LISTEN" or "config file F: key listen"
    example_format: str  # how to write a value at this source; "{value}" marks the value

    def error(self, problem: str, example: str | None = None) -> ConfigError:
        hint = f" (example: {self.example_format.replace('{value}', example)})" if example else ""
        return ConfigError(f"{self.source} {_show(self.value)}: {problem}{hint}")


@dataclass(frozen=True)
class _Secret(_Given):
    """A value that is never shown in an error."""

    def error(self, problem: str, example: str | None = None) -> ConfigError:
        hint = f" (example: {self.example_format.replace('{value}', example)})" if example else ""
        return ConfigError(f"{self.source} (value not shown): {problem}{hint}")


def _show(value: object) -> str:
    # repr() quotes strings and escapes line breaks and control characters, which keeps the message on
    # one line; the cut keeps a pasted blob from flooding the log.
    text = redact_urls(repr(value))
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


def _from_env(environ: Mapping[str, str], *names: str) -> _Given | None:
    for name in names:
        value = environ.get(name)
        if value:
            return _Given(value, name, name + "={value}")
    return None


def _parsed(given: _Given | None, parse: Callable[[_Given], _T], default: _T) -> _T:
    return default if given is None else parse(given)


# --- value parsers: each turns a _Given into a value or raises given.error(...) --------------------------


def _number(given: _Given, problem: str) -> float:
    """A finite number from a string (flag, env) or a YAML int/float; anything else fails with problem."""
    value = given.value
    # bool is an int subclass, but "poll_interval: yes" is a mistake, not 1 second.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise given.error(problem)
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: a YAML int too large for a float
        raise given.error(problem) from None
    if not math.isfinite(number):
        raise given.error(problem)
    return number


def _positive(unit: str, high: float | None = None, per_second: int = 1) -> Callable[[_Given], float]:
    """Seconds > 0 (and <= high); OTEL_* durations are milliseconds (per_second=1000)."""
    problem = f"must be a number of {unit} > 0" + (f" and <= {high:g}" if high is not None else "")

    def parse(given: _Given) -> float:
        number = _number(given, problem)
        if number <= 0 or (high is not None and number > high):
            raise given.error(problem)
        return number / per_second

    return parse


def _integer(problem: str, low: int, high: int | None = None) -> Callable[[_Given], int]:
    def parse(given: _Given) -> int:
        value = given.value
        number: int
        if isinstance(value, str):
            text = value.strip()
            if not _DIGITS.fullmatch(text):
                raise given.error(problem)
            try:
                number = int(text)
            except ValueError:  # more digits than int() will convert
                raise given.error(problem) from None
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise given.error(problem)
        if number < low or (high is not None and number > high):
            raise given.error(problem)
        return number

    return parse


def _string(given: _Given, what: str) -> str:
    if not isinstance(given.value, str):
        # YAML turns unquoted yes/no/123/1.5 into bool/int/float; quoting is the usual fix.
        raise given.error(f"must be {what} (a string; quote it in YAML)")
    return given.value


def _clean(text: str) -> bool:
    return not any(char.isspace() or not char.isprintable() for char in text)


def _text(what: str, ok: Callable[[str], bool], problem: str) -> Callable[[_Given], str]:
    def parse(given: _Given) -> str:
        text = _string(given, what)
        if not ok(text):
            raise given.error(problem)
        return text

    return parse


def _choice(choices: Sequence[str]) -> Callable[[_Given], str]:
    problem = "must be one of " + ", ".join(choices)

    def parse(given: _Given) -> str:
        text = given.value.strip().lower() if isinstance(given.value, str) else ""
        if text not in choices:
            raise given.error(problem)
        return text

    return parse


def _mode_or_boolean(given: _Given, modes: tuple[str, ...], on: str, off: str) -> str:
    """One of `modes`; a boolean (YAML true/false, env true/false) reads as `on` / `off`."""
    value = given.value
    if isinstance(value, str):
        value = value.strip().lower()
        if value in modes:
            return value
        value = True if value in _TRUE else False if value in _FALSE else value
    if isinstance(value, bool):
        return on if value else off
    raise ValueError


def _request_mode(given: _Given) -> RequestMode:
    try:
        return _mode_or_boolean(given, REQUEST_MODES, "http", "off")  # type: ignore[return-value]
    except ValueError:
        raise given.error("must be " + ", ".join(REQUEST_MODES[:-1]) + " or " + REQUEST_MODES[-1]) from None


def _tls_mode(given: _Given) -> TlsMode:
    try:
        return _mode_or_boolean(given, TLS_MODES, "openssl", "off")  # type: ignore[return-value]
    except ValueError:
        raise given.error("must be " + " or ".join(TLS_MODES), "openssl") from None


def _boolean(given: _Given) -> bool:
    value = given.value
    if isinstance(value, str):
        text = value.strip().lower()
        value = True if text in _TRUE else False if text in _FALSE else value
    if isinstance(value, bool):
        return value
    raise given.error("must be true or false")


def _file_problem(path: str) -> str | None:
    """Why ``path`` is not a readable regular file, or None if it is."""
    if not os.path.exists(path):
        return "no such file"
    # Checked before open() because opening a FIFO would block and a directory fails obscurely.
    if not os.path.isfile(path):
        return "not a regular file"
    try:
        with open(path, "rb"):
            pass
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"cannot read it ({reason})"
    return None


def _file(fix: str) -> Callable[[_Given], str]:
    def parse(given: _Given) -> str:
        path = _string(given, "a file path")
        problem = _file_problem(path)
        if problem is not None:
            raise given.error(f"{problem}; {fix}")
        return path

    return parse


def _is_hostname(name: str) -> bool:
    labels = (name[:-1] if name.endswith(".") else name).split(".")
    # An all-numeric last label means a mistyped IPv4 address (999.1.1.1), never a hostname.
    return (
        len(name) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _is_ip(host: str, version: int) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == version


def _host_port(text: str, ipv6_example: str) -> tuple[str, int]:
    """Split HOST:PORT or [IPv6]:PORT; ValueError says what is wrong."""
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError("expected [IPv6]:PORT")
        port_text = port_text[1:]
        # A bracketed IPv4 address is accepted too: a template can write [$(HOST_IP)]:PORT
        # whatever the node's address family.
        if not (_is_ip(host, 6) or _is_ip(host, 4)):
            raise ValueError(f"{host!r} in brackets is not an IP address")
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError("expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"put IPv6 addresses in brackets, e.g. {ipv6_example}")
        if not host:
            raise ValueError("host is empty; use 0.0.0.0 for all interfaces")
        if not (_is_ip(host, 4) or _is_hostname(host)):
            raise ValueError(f"host {host!r} is not a valid IP address or hostname")
    if not _DIGITS.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError("port must be a number 1-65535")
    return host, int(port_text)


def _listen(given: _Given) -> tuple[str, int]:
    text = _string(given, "HOST:PORT").strip()
    try:
        return _host_port(text, "[::]:9436")
    except ValueError as exc:
        raise given.error(str(exc), "0.0.0.0:9436") from None


def _url(given: _Given, example: str, host_port: str | None = None, base: bool = False) -> str:
    """An http(s) URL. With ``host_port`` (an IPv6 example) a bare HOST:PORT is accepted as http://;
    ``base`` URLs (the Kubernetes API) may have no query or fragment and are normalised."""
    text = _string(given, "a URL or HOST:PORT" if host_port else "a URL").strip()
    if not _clean(text):
        # urlsplit() would silently drop some of these and hand back a different URL.
        raise given.error("must not contain spaces or control characters", example)
    if "://" not in text:
        if host_port is None:
            raise given.error("must be a URL with scheme http or https", example)
        try:
            _host_port(text, host_port)
        except ValueError as exc:
            raise given.error(f"not a URL, and as HOST:PORT: {exc}", example) from None
        return "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise given.error(f"not a valid URL ({exc})", example) from None
    if parts.scheme.lower() not in ("http", "https"):
        scheme = "must be a URL with scheme" if base else "URL scheme must be"
        raise given.error(f"{scheme} http or https", example)
    host = parts.hostname or ""
    if not (_is_ip(host, 4) or _is_ip(host, 6) or _is_hostname(host)):
        raise given.error("URL needs a valid host name or IP address", example)
    if port == 0:
        raise given.error("port must be a number 1-65535", example)
    if not base:
        return text
    if parts.query or parts.fragment:
        raise given.error("must not have a query or fragment", example)
    # A lowercase scheme, so that later checks for "https:" hold for "HTTPS://" too.
    return parts.scheme.lower() + text[len(parts.scheme) :].rstrip("/")


def _pairs(given: _Given, what: str, secret: bool = False) -> list[tuple[str, str]]:
    """Parse the W3C-baggage-like "k=v,k=v" format the OTEL_* variables use, percent-decoding both
    sides so that values may carry ',' or '=' (as %2C, %3D). `secret`: errors never show the text."""
    text = _string(given, f"comma-separated {what}")
    pairs = []
    for n, item in enumerate(text.split(","), 1):
        if not item.strip():
            continue
        key, equals, value = item.partition("=")
        key = unquote(key.strip())
        if not equals or not key:
            got = f"item {n} has no '='" if secret else f"got {item.strip()!r}"
            raise given.error(f"expected comma-separated key=value {what}, {got}")
        pairs.append((key, unquote(value.strip())))
    return pairs


def _headers(raw: _Given) -> tuple[tuple[str, str], ...]:
    """Headers carry tokens: no error shows the value (nor a key, which a mistyped line may hold)."""
    given = _Secret(raw.value, raw.source, raw.example_format)
    if isinstance(given.value, Mapping):
        # The mapping form is taken literally: it needs no escaping, so nothing is percent-decoded.
        pairs = []
        for key, value in given.value.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise given.error("header names and values must be strings (quote them in YAML)")
            pairs.append((key.strip(), value.strip()))
    elif isinstance(given.value, str):
        pairs = _pairs(given, "headers", secret=True)
    else:
        raise given.error("must be a mapping of header names to values, or a 'k=v,k=v' string")
    headers: dict[str, str] = {}
    for n, (key, value) in enumerate(pairs, 1):
        if not _HEADER_NAME.fullmatch(key):
            raise given.error(f"header {n}: the name is not a valid HTTP header name")
        if not value.isprintable():
            raise given.error(
                f"header {n} ({key}): the value must not contain control characters or line breaks"
            )
        headers[key.lower()] = value
    return tuple(headers.items())


def _directory(example: str) -> Callable[[_Given], str]:
    # Existence and usability are left to the exporter, doctor and kernel_headers.find_tree, which can
    # explain a missing cgroup2 mount or headers tree better.
    problem = f"must be a directory path, e.g. {example}"
    return _text("a directory path", lambda path: bool(path.strip()), problem)


def _pin_dir(given: _Given) -> str:
    """A bpffs directory for pinned maps, or "" for "none" (pinning off)."""
    text = _string(given, "a directory path or none").strip()
    if text.lower() in ("none", "off", ""):
        return ""
    if not text.startswith("/"):
        raise given.error("must be an absolute path under a bpf filesystem, e.g. /sys/fs/bpf/podnet, or none")
    return text.rstrip("/") or "/"
