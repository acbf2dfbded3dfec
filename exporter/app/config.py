"""Settings for podnet-exporter from flags, environment variables and a YAML config file.

Every setting is declared once, in :data:`SETTINGS`: its flag, ``PODNET_<FLAG>`` variable, config file
key, parser (which validates), default and help; the argparse parser, the env and file readers and the
README's settings table are all derived from it. Each ``run`` setting comes from, in order of
precedence: its flag, its variable, its key in the config file, then the default. The standard
``OTEL_*`` variables fill OTLP settings that podnet's own sources leave unset. All validation happens
here, so the rest of the exporter can trust a :class:`Config` and every bad input is reported the same
way: one :class:`ConfigError` line naming the flag, variable or file key at fault and how to fix it.

Config file values of the wrong YAML type fail (``listen: 9436``), but strings are parsed the same way as
flag and environment values, so templating tools that quote everything (``max_series: "5000"``) work.
Empty environment variables count as unset, as the OpenTelemetry spec asks and because Kubernetes
manifests and Helm charts often render ``value: ""`` for settings left alone. Likewise a config file key
whose value is null (``pods_file:``) counts as unset.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml

from exporter import __version__
from exporter.export.otlp_config import OtlpConfig
from exporter.kernel.programs import REQUEST_MODES, RequestMode
from exporter.pods.kube import KubeConfig

__all__ = [
    "SETTINGS",
    "Config",
    "ConfigError",
    "KubeConfig",
    "OtlpConfig",
    "Setting",
    "build_parser",
    "parse_args",
    "readme_rows",
    "resolve",
]

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
class Config:
    """Validated settings. ``listen_host`` holds IPv6 addresses without brackets; ``cgroup_root`` None
    means auto-detect; ``cluster_name`` "" means not set; ``config_file`` is the file that was read."""

    listen_host: str
    listen_port: int
    poll_interval: float
    pods_file: str | None
    node_name: str
    cgroup_root: str | None
    log_level: str
    max_series: int
    map_entries: int
    histogram_scale: int
    cluster_name: str
    otlp: OtlpConfig | None
    config_file: str | None
    kube: KubeConfig | None = None
    """The Kubernetes API pod metadata source; None when pods come from --pods-file or nowhere."""
    requests: RequestMode = "http"
    """Request tracking: "http" counts requests and recognises HTTP/1.x
    from their first bytes; "turns" counts them without reading any payload (protocol
    "other"); "off" builds the hot path without request tracking (no clock read per
    send/recv, no podnet_request* metrics)."""
    kernel_headers: str | None = None
    """The kernel headers tree BCC compiles against; None means the first usable of
    $BCC_KERNEL_SOURCE, podnet's own tree and /lib/modules/<release>/build
    (exporter.kernel.headers.find_tree)."""


# --- where a value came from ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Given:
    """A raw setting and its origin, so that any problem with it can name the flag, variable or key."""

    value: object
    source: str  # "--listen", "PODNET_LISTEN" or "config file F: key listen"
    example_format: str  # how to write a value at this source; "{value}" marks the value

    def error(self, problem: str, example: str | None = None) -> ConfigError:
        hint = f" (example: {self.example_format.replace('{value}', example)})" if example else ""
        return ConfigError(f"{self.source} {_show(self.value)}: {problem}{hint}")


def _show(value: object) -> str:
    # repr() quotes strings and escapes line breaks and control characters, which keeps the message on
    # one line; the cut keeps a pasted blob from flooding the log.
    text = repr(value)
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


def _request_mode(given: _Given) -> RequestMode:
    # A boolean (YAML true/false, PODNET_REQUESTS=false) reads as http / off.
    value = given.value
    if isinstance(value, str):
        value = value.strip().lower()
        for mode in REQUEST_MODES:
            if value == mode:
                return mode
        value = True if value in _TRUE else False if value in _FALSE else value
    if isinstance(value, bool):
        return "http" if value else "off"
    raise given.error("must be " + ", ".join(REQUEST_MODES[:-1]) + " or " + REQUEST_MODES[-1])


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
        if not _is_ip(host, 6):
            raise ValueError(f"{host!r} in brackets is not an IPv6 address")
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


def _pairs(given: _Given, what: str) -> list[tuple[str, str]]:
    """Parse the W3C-baggage-like "k=v,k=v" format the OTEL_* variables use, percent-decoding both
    sides so that values may carry ',' or '=' (as %2C, %3D)."""
    text = _string(given, f"comma-separated {what}")
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, equals, value = item.partition("=")
        key = unquote(key.strip())
        if not equals or not key:
            raise given.error(f"expected comma-separated key=value {what}, got {item.strip()!r}")
        pairs.append((key, unquote(value.strip())))
    return pairs


def _headers(given: _Given) -> tuple[tuple[str, str], ...]:
    if isinstance(given.value, Mapping):
        # The mapping form is taken literally: it needs no escaping, so nothing is percent-decoded.
        pairs = []
        for key, value in given.value.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise given.error(f"header {key!r}: names and values must be strings (quote them in YAML)")
            pairs.append((key.strip(), value.strip()))
    elif isinstance(given.value, str):
        pairs = _pairs(given, "headers")
    else:
        raise given.error("must be a mapping of header names to values, or a 'k=v,k=v' string")
    headers: dict[str, str] = {}
    for key, value in pairs:
        if not _HEADER_NAME.fullmatch(key):
            raise given.error(f"header name {key!r} is not a valid HTTP header name")
        if not value.isprintable():
            raise given.error(f"header {key!r}: value must not contain control characters or line breaks")
        headers[key.lower()] = value
    return tuple(headers.items())


def _directory(example: str) -> Callable[[_Given], str]:
    # Existence and usability are left to the exporter, doctor and kernel_headers.find_tree, which can
    # explain a missing cgroup2 mount or headers tree better.
    problem = f"must be a directory path, e.g. {example}"
    return _text("a directory path", lambda path: bool(path.strip()), problem)


# --- the settings table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting: flag ``--<key with ->``, variable ``PODNET_<KEY>``, config file key ``key`` (keys
    ``otlp_X`` live under ``otlp:`` as ``X``). ``parse`` validates a given value; None means the value
    is checked together with others (the config file itself, the OTLP endpoint, the Kubernetes API).
    ``value`` is the Config value when nothing sets it; ``default`` and ``doc`` are the README's."""

    key: str
    metavar: str  # "" for an on/off switch
    help: str
    default: str
    doc: str
    parse: Callable[[_Given], object] | None
    value: object = None
    doctor: bool = False  # also a doctor option
    in_file: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return "PODNET_" + self.key.upper()


_S = Setting
# fmt: off
_HEADERS_AUTO = ("$BCC_KERNEL_SOURCE, podnet's own tree /var/lib/podnet/kernel-headers, "
                 "/lib/modules/$(uname -r)/build")
SETTINGS: Final[tuple[Setting, ...]] = (
    _S("listen", "HOST:PORT", "address for /metrics, [v6]:PORT for IPv6 (default 0.0.0.0:9436)",
       "`0.0.0.0:9436`", "address of `/metrics`, `/healthz`, `/readyz` (`[::]:9436` for IPv6)", _listen,
       ("0.0.0.0", 9436)),
    _S("poll_interval", "SECONDS", "how often to read the BPF maps (default 5)", "`5`",
       "seconds between reads of the kernel maps", _positive("seconds", _MAX_POLL_INTERVAL), 5.0),
    _S("pods_file", "PATH", "read pods from this `kubectl get pods -o json` output, not the API", "none",
       "pod metadata from `kubectl get pods -o json`; reloaded when it changes",
       _file("pass an existing file, e.g. kubectl get pods -o json > pods.json")),
    _S("node_name", "NAME", "this node's name (default: $NODE_NAME, else the hostname)",
       "`$NODE_NAME` or hostname", "this node's name",
       _text("a node name", lambda t: bool(t) and _clean(t), "must be a non-empty node name without spaces"),
       None),
    _S("config", "FILE", "YAML config file", "none",
       "YAML file with the same settings in snake_case (`poll_interval: 5`)", None, doctor=True,
       in_file=False),
    _S("cgroup_root", "PATH", "cgroup v2 mount point (default: auto-detect)", "auto", "the cgroup v2 mount",
       _directory("/sys/fs/cgroup"), doctor=True),
    _S("kernel_headers", "DIR", f"kernel headers tree for BCC (default: {_HEADERS_AUTO})", "auto",
       "kernel headers tree BCC compiles against (also a `doctor` flag); auto: `$BCC_KERNEL_SOURCE`, "
       "`/var/lib/podnet/kernel-headers` (built by `make setup`), `/lib/modules/$(uname -r)/build`, the "
       "first that is complete", _directory("/var/lib/podnet/kernel-headers"), doctor=True),
    _S("log_level", "LEVEL", "one of debug, info, warning, error (default info)", "`info`",
       "debug, info, warning, error", _choice(("debug", "info", "warning", "error")), "info"),
    _S("max_series", "N", "cap on exported series (default 10000)", "`10000`",
       "cap on series per metric family; beyond it new label sets are dropped and counted",
       _integer("must be a whole number >= 1", 1), 10000),
    _S("map_entries", "N", f"BPF map size, {_MIN_MAP_ENTRIES}-{_MAX_MAP_ENTRIES} (default 65536)", "`65536`",
       "size of the per-owner kernel maps (sockets, flows, histograms scale from it)",
       _integer(f"must be a whole number from {_MIN_MAP_ENTRIES} to {_MAX_MAP_ENTRIES}", _MIN_MAP_ENTRIES,
                _MAX_MAP_ENTRIES), 65536),
    _S("histogram_scale", "{0,1,2}", "latency histogram resolution (default 0)", "`0`",
       "Prometheus bucket resolution: 0 = powers of 2, 1 = of sqrt 2, 2 = of 2^(1/4)",
       _integer("must be 0, 1 or 2", 0, 2), 0),
    _S("requests", "http|turns|off", "request tracking: http (counted, HTTP/1.x recognised), turns (counted, "
       "payload never read), off (the cheapest data path) (default http)", "`http`",
       "request tracking: `http` (counted, HTTP/1.x method and status recognised), `turns` (counted as "
       '`protocol="other"`, payloads never read), `off` (no request metrics: the cheapest data path); see '
       "Requests below", _request_mode, "http"),
    _S("cluster_name", "NAME", "cluster name to attach to metrics (default: none)", "none",
       "cluster name for OTLP resources",
       _text("a cluster name", str.isprintable, "must not contain control characters or line breaks"), ""),
    _S("kube_api", "URL", "Kubernetes API server to watch this node's pods from (default: in a pod, the "
       "cluster's own)", "in a pod: the cluster's API",
       "Kubernetes API to watch this node's pods from (alternative to `--pods-file`)", None),
    _S("kube_token_file", "PATH", "bearer token for the API (default: the service-account token)",
       "the service-account token", "bearer token, re-read for every request",
       _file("pass the file holding the API bearer token")),
    _S("kube_ca_file", "PATH", "CA certificate of the API (default: the service-account ca.crt)",
       "the service-account `ca.crt`", "CA of the API server's certificate",
       _file("pass the PEM file of the CA that signed the API server's certificate")),
    _S("kube_insecure_skip_tls_verify", "", "do not verify the API server's certificate (tests, development)",
       "false", "no certificate check (tests, development)", _boolean, False),
    _S("otlp_endpoint", "URL", "push metrics over OTLP to this URL (default: OTLP off)", "none (OTLP off)",
       "OTLP collector to push metrics to (gRPC also takes `HOST:PORT`); else "
       "`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`", None),
    _S("otlp_protocol", "grpc|http/protobuf", "OTLP transport (default grpc)", "`grpc`",
       "OTLP transport, `grpc` or `http/protobuf`", _choice(_OTLP_PROTOCOLS)),
    _S("otlp_interval", "SECONDS", "OTLP push interval (default 60)", "`60`", "seconds between OTLP pushes",
       _positive("seconds")),
    _S("otlp_headers", "K=V,...", "OTLP request headers; write ',' in a value as %2C", "none",
       "OTLP request headers, `k=v,k=v` (`,` in a value as `%2C`) or a mapping in the file", _headers),
    _S("otlp_timeout", "SECONDS", "OTLP request timeout (default 10)", "`10`", "seconds before a push fails",
       _positive("seconds")),
    _S("otlp_insecure", "", "gRPC without TLS", "false", "gRPC without TLS", _boolean, False),
    _S("otlp_histogram", "exponential|explicit", "OTLP histogram type (default exponential)", "`exponential`",
       "OTLP histogram type, `exponential` or `explicit`", _choice(("exponential", "explicit"))),
    _S("otlp_temporality", "cumulative|delta", "OTLP aggregation temporality (default cumulative)",
       "`cumulative`", "OTLP aggregation temporality, `cumulative` or `delta`",
       _choice(("cumulative", "delta"))),
)
# fmt: on
_SETTING: Final = {setting.key: setting for setting in SETTINGS}
# Config file keys; those of otlp_* settings live under "otlp".
_OTLP_KEYS: Final = tuple(s.key[5:] for s in SETTINGS if s.key.startswith("otlp_"))
_TOP_KEYS: Final = (*(s.key for s in SETTINGS if s.in_file and not s.key.startswith("otlp_")), "otlp")


def readme_rows() -> list[str]:
    """The README's settings table rows, one per setting."""
    return [f"| `{s.flag}` | `{s.env}` | {s.default} | {s.doc} |" for s in SETTINGS]


# --- command line -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Raises ConfigError instead of printing usage and exiting 2, so every bad input, wherever it came
    from, is reported the same way by the caller."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}; see {_PROG} --help")


def build_parser() -> argparse.ArgumentParser:
    """The ``podnet-exporter`` parser with subcommands run, doctor and bpf-source.

    Options default to None so that :func:`resolve` can tell "not given" from "given", which the
    flag > env > file > default precedence needs.
    """
    parser = _Parser(
        prog=_PROG, description="eBPF network metrics exporter for Kubernetes pods.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    run = commands.add_parser(
        "run",
        help="export metrics (the normal mode)",
        description="Export per-pod network metrics. Every option can also be set with the environment "
        "variable shown, or in the --config file under the option's name in snake_case; "
        "precedence is option > environment > config file > default.",
        allow_abbrev=False,
    )
    doctor = commands.add_parser(
        "doctor",
        help="check that this host can run the exporter",
        description="Check kernel, BPF, cgroup and configuration prerequisites and explain any problem.",
        allow_abbrev=False,
    )
    for setting in SETTINGS:
        for command in (run, doctor) if setting.doctor else (run,):
            # argparse %-formats help strings.
            if setting.metavar:
                help_text = f"{setting.help} [env {setting.env}]".replace("%", "%%")
                command.add_argument(setting.flag, metavar=setting.metavar, default=None, help=help_text)
            else:
                help_text = f"{setting.help} [env {setting.env}=true]"
                command.add_argument(setting.flag, action="store_true", default=None, help=help_text)
    bpf_source = commands.add_parser(
        "bpf-source",
        help="print the eBPF C source and resolved offsets",
        description="Print the eBPF C program and the kernel struct offsets resolved for this host.",
        allow_abbrev=False,
    )
    bpf_source.add_argument("--preprocessed", action="store_true", help="print it after the C preprocessor")
    return parser


def parse_args(argv: Sequence[str]) -> tuple[str, argparse.Namespace]:
    """Parse ``argv`` (without the program name) into (command, namespace); raise ConfigError on bad
    usage. ``--help`` and ``--version`` print and raise SystemExit(0) as usual."""
    try:
        namespace = build_parser().parse_args(list(argv))
    except ConfigError:
        # Forgetting the command ("podnet-exporter --listen X") would otherwise read as
        # "invalid choice: 'X'", which points at the wrong word.
        option = argv[0].partition("=")[0] if argv else ""
        if option.startswith("-"):
            raise ConfigError(
                f"{option}: options go after the command, e.g. '{_PROG} run {option} ...'; see {_PROG} --help"
            ) from None
        raise
    command: str | None = namespace.command
    if command is None:
        raise ConfigError(f"no command given; use '{_PROG} run' (or doctor, bpf-source)")
    return command, namespace


# --- config file ----------------------------------------------------------------------------------------


def _load_file(given: _Given) -> tuple[str, dict[str, _Given]]:
    """Read the YAML config file; returns its path and its settings keyed like namespace attributes."""
    path = _file("pass an existing YAML file, or leave it unset")(given)
    where = f"config file {path}"
    try:
        with open(path, encoding="utf-8") as stream:
            data: object = yaml.safe_load(stream)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text; is it really the YAML config?") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML: {exc.problem or exc.context}{at}") from None
    except (yaml.YAMLError, ValueError) as exc:
        # ValueError: PyYAML builds dates eagerly, so "2024-13-01" fails while constructing.
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None

    if data is None:  # an empty file (e.g. a ConfigMap with nothing set) means "all defaults"
        return path, {}
    top = _mapping(data, where, "top level", "listen: 0.0.0.0:9436")
    _check_keys(top, where, _TOP_KEYS, "")
    settings: dict[str, _Given] = {}
    for key, value in top.items():
        if value is None:
            continue
        if key == "otlp":
            otlp = _mapping(value, where, "key otlp", "otlp: {endpoint: http://otel-collector:4317}")
            _check_keys(otlp, where, _OTLP_KEYS, " under otlp")
            for otlp_key, otlp_value in otlp.items():
                if otlp_value is not None:
                    settings[f"otlp_{otlp_key}"] = _Given(
                        otlp_value, f"{where}: key otlp.{otlp_key}", f"otlp: {{{otlp_key}: {{value}}}}"
                    )
        else:
            settings[str(key)] = _Given(value, f"{where}: key {key}", f"{key}: {{value}}")
    return path, settings


def _mapping(data: object, where: str, what: str, example: str) -> Mapping[object, object]:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}: {what} must be a mapping of settings, not {type(data).__name__} (example: {example})"
        )
    return data


def _check_keys(data: Mapping[object, object], where: str, valid: Sequence[str], section: str) -> None:
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(
                f"{where}: unknown key {_show(key)}{section}; {hint}valid keys: {', '.join(valid)}"
            )


# --- resolution -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sources:
    namespace: argparse.Namespace
    environ: Mapping[str, str]
    file: Mapping[str, _Given]  # keyed like namespace attributes: "listen", "otlp_endpoint", ...

    def get(self, key: str) -> _Given | None:
        """The highest-precedence value of a podnet setting: flag, then PODNET_* variable, then file."""
        flag_value: object = getattr(self.namespace, key, None)
        setting = _SETTING[key]
        if flag_value is not None:
            return _Given(flag_value, setting.flag, setting.flag + " {value}")
        return _from_env(self.environ, setting.env) or self.file.get(key)


def resolve(ns: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Merge flags (``ns`` from :func:`parse_args`), ``environ`` and the config file into a validated
    Config; raise ConfigError on the first bad value. Works for any subcommand's namespace: settings
    without a flag there still come from the environment, the file or the default."""
    config_given = _Sources(ns, environ, {}).get("config")
    config_file, file_settings = _load_file(config_given) if config_given else (None, {})
    sources = _Sources(ns, environ, file_settings)
    if (api := sources.get("kube_api")) is not None and (pods_file := sources.get("pods_file")) is not None:
        raise ConfigError(
            f"{pods_file.source} and {api.source} are alternative pod metadata sources; set only one"
        )
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        given = sources.get(setting.key)
        if setting.key == "node_name":
            given = given or _from_env(environ, "NODE_NAME")
        if setting.parse is not None:
            values[setting.key] = _parsed(given, setting.parse, setting.value)
    otlp, kube = _otlp(values, sources, environ), _kube(values, sources, environ)
    listen_host, listen_port = values.pop("listen")
    values["node_name"] = values["node_name"] or socket.gethostname()
    fields = {name: values[name] for name in Config.__dataclass_fields__ if name in values}
    return Config(
        listen_host=listen_host,
        listen_port=listen_port,
        otlp=otlp,
        config_file=config_file,
        kube=kube,
        **fields,
    )


def _kube(values: Mapping[str, Any], sources: _Sources, environ: Mapping[str, str]) -> KubeConfig | None:
    """The API source: --kube-api, else in a pod (service-account token and KUBERNETES_SERVICE_HOST/PORT)
    the cluster's own API unless --pods-file is given. The pods file and --kube-api exclude each other."""
    api = sources.get("kube_api")
    pods_file = sources.get("pods_file")
    sa_token = os.path.join(SERVICE_ACCOUNT_DIR, "token")
    sa_ca = os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt")
    in_cluster = False
    if api is not None:
        url = _url(api, "https://kubernetes.default.svc:443", base=True)
    else:
        host = environ.get("KUBERNETES_SERVICE_HOST", "").strip()
        port = environ.get("KUBERNETES_SERVICE_PORT", "").strip()
        if pods_file is not None or not (host and port and os.path.isfile(sa_token)):
            unused = [
                given.source
                for key in ("kube_token_file", "kube_ca_file", "kube_insecure_skip_tls_verify")
                if (given := sources.get(key)) is not None
            ]
            if unused:
                why = "no --kube-api and not in a pod" if pods_file is None else f"{pods_file.source} is set"
                raise ConfigError(f"{unused[0]} is set but the Kubernetes API is not used ({why})")
            return None
        url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        in_cluster = True
    return KubeConfig(
        url=url,
        token_file=values["kube_token_file"] or (sa_token if os.path.isfile(sa_token) else None),
        ca_file=values["kube_ca_file"]
        or (sa_ca if os.path.isfile(sa_ca) and url.startswith("https:") else None),
        insecure_skip_tls_verify=values["kube_insecure_skip_tls_verify"],
        in_cluster=in_cluster,
    )


def _otlp(values: Mapping[str, Any], sources: _Sources, environ: Mapping[str, str]) -> OtlpConfig | None:
    """OTLP settings, or None when no source names an endpoint.

    podnet's own OTLP settings are validated even while OTLP is off, so a typo does not go unnoticed;
    OTEL_* variables are only read once OTLP is on, because in a shared pod environment they may be
    meant for another process. Each OTEL_EXPORTER_OTLP_METRICS_* variable is listed before its generic
    twin because the OpenTelemetry spec gives the signal-specific one precedence.
    """

    def otel(key: str, names: Sequence[str], parse: Callable[[_Given], _T], default: _T) -> _T:
        value = values[key]
        return value if value is not None else _parsed(_from_env(environ, *names), parse, default)

    def metrics_env(suffix: str) -> tuple[str, str]:
        return f"OTEL_EXPORTER_OTLP_METRICS_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"

    # Only the generic variable is a base URL that needs the signal's path; the others are used as-is.
    endpoint_given = sources.get("otlp_endpoint") or _from_env(environ, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    is_base_url = False
    if endpoint_given is None:
        endpoint_given = _from_env(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint_given is None:
            return None
        is_base_url = True
    protocol = otel("otlp_protocol", metrics_env("PROTOCOL"), _choice(_OTLP_PROTOCOLS), "grpc")
    if protocol == "grpc":
        endpoint = _url(endpoint_given, "http://otel-collector:4317", host_port="[::1]:4317")
    else:
        endpoint = _url(endpoint_given, "http://otel-collector:4318/v1/metrics")
        if is_base_url:
            parts = urlsplit(endpoint)
            endpoint = urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/v1/metrics"))
    compression = _parsed(_from_env(environ, *metrics_env("COMPRESSION")), _choice(("gzip", "none")), None)
    milliseconds = _positive("milliseconds", per_second=1000)
    return OtlpConfig(
        endpoint=endpoint,
        protocol=protocol,
        interval=otel("otlp_interval", ("OTEL_METRIC_EXPORT_INTERVAL",), milliseconds, 60.0),
        timeout=otel("otlp_timeout", metrics_env("TIMEOUT"), milliseconds, 10.0),
        headers=otel("otlp_headers", metrics_env("HEADERS"), _headers, ()),
        insecure=values["otlp_insecure"],
        compression=None if compression == "none" else compression,
        certificate=_parsed(
            _from_env(environ, *metrics_env("CERTIFICATE")),
            _file("pass the path of a PEM CA certificate file"),
            None,
        ),
        histogram=values["otlp_histogram"] or "exponential",
        temporality=otel(
            "otlp_temporality",
            ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",),
            _choice(_OTEL_TEMPORALITIES),
            "cumulative",
        ),
        resource_attributes=_parsed(
            _from_env(environ, "OTEL_RESOURCE_ATTRIBUTES"),
            lambda g: tuple(dict(_pairs(g, "attributes")).items()),
            (),
        ),
    )
