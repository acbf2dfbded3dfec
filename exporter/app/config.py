"""Settings for podnet-exporter from flags, environment variables and a YAML config file.

Each ``run`` setting comes from, in order of precedence: its flag, its ``PODNET_<FLAG>`` variable, its
key in the config file, then the default. The standard ``OTEL_*`` variables fill OTLP settings that
podnet's own sources leave unset. All validation happens here, so the rest of the exporter can trust a
:class:`Config` and every bad input is reported the same way: one :class:`ConfigError` line naming the
flag, variable or file key at fault and how to fix it.

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
from typing import Final, NoReturn, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml

from exporter import __version__
from exporter.export.otlp_config import OtlpConfig
from exporter.kernel.programs import REQUEST_MODES, RequestMode
from exporter.pods.kube import KubeConfig

__all__ = ["Config", "ConfigError", "KubeConfig", "OtlpConfig", "build_parser", "parse_args", "resolve"]

_T = TypeVar("_T")

_PROG: Final = "podnet-exporter"

_DEFAULT_LISTEN: Final = "0.0.0.0:9436"
_DEFAULT_LISTEN_HOST: Final = "0.0.0.0"
_DEFAULT_LISTEN_PORT: Final = 9436
_DEFAULT_POLL_INTERVAL: Final = 5.0
_MAX_POLL_INTERVAL: Final = 3600.0
_DEFAULT_LOG_LEVEL: Final = "info"
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_DEFAULT_MAX_SERIES: Final = 10000
_DEFAULT_MAP_ENTRIES: Final = 65536
_MIN_MAP_ENTRIES: Final = 1024
_MAX_MAP_ENTRIES: Final = 4194304
_DEFAULT_HISTOGRAM_SCALE: Final = 0
_MAX_HISTOGRAM_SCALE: Final = 2

_OTLP_PROTOCOLS: Final = ("grpc", "http/protobuf")
_DEFAULT_OTLP_PROTOCOL: Final = "grpc"
_DEFAULT_OTLP_INTERVAL: Final = 60.0
_DEFAULT_OTLP_TIMEOUT: Final = 10.0
_OTLP_HISTOGRAMS: Final = ("exponential", "explicit")
_DEFAULT_OTLP_HISTOGRAM: Final = "exponential"
_OTLP_TEMPORALITIES: Final = ("cumulative", "delta")
# The spec's "lowmemory" is accepted from OTEL_* only and kept verbatim: it means delta for counters
# but cumulative for up-down counters, which only the OTLP exporter can apply.
_OTEL_TEMPORALITIES: Final = ("cumulative", "delta", "lowmemory")
_DEFAULT_OTLP_TEMPORALITY: Final = "cumulative"
_OTEL_COMPRESSIONS: Final = ("gzip", "none")

# Config file keys. Each names a flag ("--" + key with "_" -> "-"; keys under otlp get "--otlp-"), except
# the otlp section itself.
_TOP_KEYS: Final = (
    "listen",
    "poll_interval",
    "pods_file",
    "node_name",
    "cgroup_root",
    "kernel_headers",
    "log_level",
    "max_series",
    "map_entries",
    "histogram_scale",
    "requests",
    "cluster_name",
    "kube_api",
    "kube_token_file",
    "kube_ca_file",
    "kube_insecure_skip_tls_verify",
    "otlp",
)
_OTLP_KEYS: Final = (
    "endpoint",
    "protocol",
    "interval",
    "headers",
    "timeout",
    "insecure",
    "histogram",
    "temporality",
)

_PODS_FILE_FIX: Final = "pass an existing file, e.g. kubectl get pods -o json > pods.json"
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
        prog=_PROG,
        description="eBPF network metrics exporter for Kubernetes pods.",
        allow_abbrev=False,
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
    _add(
        run, "--listen", "HOST:PORT", f"address for /metrics, [v6]:PORT for IPv6 (default {_DEFAULT_LISTEN})"
    )
    _add(
        run,
        "--poll-interval",
        "SECONDS",
        f"how often to read the BPF maps (default {_DEFAULT_POLL_INTERVAL:g})",
    )
    _add(run, "--pods-file", "PATH", "read pods from this `kubectl get pods -o json` output, not the API")
    _add(
        run,
        "--kube-api",
        "URL",
        "Kubernetes API server to watch this node's pods from (default: in a pod, the cluster's own)",
    )
    _add(run, "--kube-token-file", "PATH", "bearer token for the API (default: the service-account token)")
    _add(run, "--kube-ca-file", "PATH", "CA certificate of the API (default: the service-account ca.crt)")
    run.add_argument(
        "--kube-insecure-skip-tls-verify",
        action="store_true",
        default=None,
        help="do not verify the API server's certificate (tests, development) "
        "[env PODNET_KUBE_INSECURE_SKIP_TLS_VERIFY=true]",
    )
    _add(run, "--node-name", "NAME", "this node's name (default: $NODE_NAME, else the hostname)")
    _add_shared(run)
    _add(run, "--log-level", "LEVEL", f"one of {', '.join(_LOG_LEVELS)} (default {_DEFAULT_LOG_LEVEL})")
    _add(run, "--max-series", "N", f"cap on exported series (default {_DEFAULT_MAX_SERIES})")
    _add(
        run,
        "--map-entries",
        "N",
        f"BPF map size, {_MIN_MAP_ENTRIES}-{_MAX_MAP_ENTRIES} (default {_DEFAULT_MAP_ENTRIES})",
    )
    _add(
        run,
        "--histogram-scale",
        "{0,1,2}",
        f"latency histogram resolution (default {_DEFAULT_HISTOGRAM_SCALE})",
    )
    _add(
        run,
        "--requests",
        "http|turns|off",
        "request tracking: http (counted, HTTP/1.x recognised), turns (counted, payload never "
        "read), off (the cheapest data path) (default http)",
    )
    _add(run, "--cluster-name", "NAME", "cluster name to attach to metrics (default: none)")
    _add(run, "--otlp-endpoint", "URL", "push metrics over OTLP to this URL (default: OTLP off)")
    _add(run, "--otlp-protocol", "grpc|http/protobuf", f"OTLP transport (default {_DEFAULT_OTLP_PROTOCOL})")
    _add(run, "--otlp-interval", "SECONDS", f"OTLP push interval (default {_DEFAULT_OTLP_INTERVAL:g})")
    _add(run, "--otlp-headers", "K=V,...", "OTLP request headers; write ',' in a value as %2C")
    _add(run, "--otlp-timeout", "SECONDS", f"OTLP request timeout (default {_DEFAULT_OTLP_TIMEOUT:g})")
    run.add_argument(
        "--otlp-insecure",
        action="store_true",
        default=None,
        help="gRPC without TLS [env PODNET_OTLP_INSECURE=true]",
    )
    _add(
        run,
        "--otlp-histogram",
        "exponential|explicit",
        f"OTLP histogram type (default {_DEFAULT_OTLP_HISTOGRAM})",
    )
    _add(
        run,
        "--otlp-temporality",
        "cumulative|delta",
        f"OTLP aggregation temporality (default {_DEFAULT_OTLP_TEMPORALITY})",
    )

    doctor = commands.add_parser(
        "doctor",
        help="check that this host can run the exporter",
        description="Check kernel, BPF, cgroup and configuration prerequisites and explain any problem.",
        allow_abbrev=False,
    )
    _add_shared(doctor)

    bpf_source = commands.add_parser(
        "bpf-source",
        help="print the eBPF C source and resolved offsets",
        description="Print the eBPF C program and the kernel struct offsets resolved for this host.",
        allow_abbrev=False,
    )
    bpf_source.add_argument("--preprocessed", action="store_true", help="print it after the C preprocessor")
    return parser


def _add(parser: argparse.ArgumentParser, flag: str, metavar: str, help_text: str) -> None:
    env = _env_name(flag[2:].replace("-", "_"))
    # argparse %-formats help strings.
    parser.add_argument(
        flag, metavar=metavar, default=None, help=f"{help_text} [env {env}]".replace("%", "%%")
    )


def _add_shared(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--config", "FILE", "YAML config file")
    _add(parser, "--cgroup-root", "PATH", "cgroup v2 mount point (default: auto-detect)")
    _add(
        parser,
        "--kernel-headers",
        "DIR",
        "kernel headers tree for BCC (default: $BCC_KERNEL_SOURCE, podnet's own tree "
        "/var/lib/podnet/kernel-headers, /lib/modules/$(uname -r)/build)",
    )


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


def _env_name(key: str) -> str:
    return "PODNET_" + key.upper()


def _from_env(environ: Mapping[str, str], *names: str) -> _Given | None:
    for name in names:
        value = environ.get(name)
        if value:
            return _Given(value, name, name + "={value}")
    return None


@dataclass(frozen=True)
class _Sources:
    namespace: argparse.Namespace
    environ: Mapping[str, str]
    file: Mapping[str, _Given]  # keyed like namespace attributes: "listen", "otlp_endpoint", ...

    def get(self, key: str) -> _Given | None:
        """The highest-precedence value of a podnet setting: flag, then PODNET_* variable, then file."""
        flag_value: object = getattr(self.namespace, key, None)
        if flag_value is not None:
            flag = "--" + key.replace("_", "-")
            return _Given(flag_value, flag, flag + " {value}")
        return _from_env(self.environ, _env_name(key)) or self.file.get(key)


def _parsed(given: _Given | None, parse: Callable[[_Given], _T], default: _T) -> _T:
    return default if given is None else parse(given)


# --- value parsers --------------------------------------------------------------------------------------


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


def _integer(given: _Given, problem: str, low: int, high: int | None = None) -> int:
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


def _string(given: _Given, what: str) -> str:
    if not isinstance(given.value, str):
        # YAML turns unquoted yes/no/123/1.5 into bool/int/float; quoting is the usual fix.
        raise given.error(f"must be {what} (a string; quote it in YAML)")
    return given.value


def _choice(given: _Given, choices: Sequence[str]) -> str:
    problem = "must be one of " + ", ".join(choices)
    if not isinstance(given.value, str):
        raise given.error(problem)
    text = given.value.strip().lower()
    if text not in choices:
        raise given.error(problem)
    return text


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
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
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


def _existing_file(given: _Given, fix: str) -> str:
    path = _string(given, "a file path")
    problem = _file_problem(path)
    if problem is not None:
        raise given.error(f"{problem}; {fix}")
    return path


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
        raise given.error(str(exc), _DEFAULT_LISTEN) from None


def _poll_interval(given: _Given) -> float:
    problem = f"must be a number of seconds > 0 and <= {_MAX_POLL_INTERVAL:g}"
    seconds = _number(given, problem)
    if not 0 < seconds <= _MAX_POLL_INTERVAL:
        raise given.error(problem)
    return seconds


def _seconds(given: _Given) -> float:
    seconds = _number(given, "must be a number of seconds > 0")
    if seconds <= 0:
        raise given.error("must be a number of seconds > 0")
    return seconds


def _milliseconds(given: _Given) -> float:
    """OTEL_* durations are milliseconds; the result is seconds."""
    millis = _number(given, "must be a number of milliseconds > 0")
    if millis <= 0:
        raise given.error("must be a number of milliseconds > 0")
    return millis / 1000


def _node_name(given: _Given) -> str:
    text = _string(given, "a node name")
    if not text or any(char.isspace() or not char.isprintable() for char in text):
        raise given.error("must be a non-empty node name without spaces")
    return text


def _cluster_name(given: _Given) -> str:
    text = _string(given, "a cluster name")
    if not text.isprintable():
        raise given.error("must not contain control characters or line breaks")
    return text


def _cgroup_root(given: _Given) -> str:
    # Existence is left to the exporter and doctor, which can explain a missing cgroup2 mount better.
    path = _string(given, "a directory path")
    if not path:
        raise given.error("must be a directory path, e.g. /sys/fs/cgroup")
    return path


def _kernel_headers(given: _Given) -> str:
    # Whether the tree is usable is left to kernel_headers.find_tree, which doctor and run report
    # with the missing files and the fix.
    path = _string(given, "a directory path")
    if not path.strip():
        raise given.error("must be a directory path, e.g. /var/lib/podnet/kernel-headers")
    return path


def _endpoint(given: _Given, protocol: str) -> str:
    grpc = protocol == "grpc"
    example = "http://otel-collector:4317" if grpc else "http://otel-collector:4318/v1/metrics"
    what = "a URL or HOST:PORT" if grpc else "a URL"
    text = _string(given, what).strip()
    if any(char.isspace() or not char.isprintable() for char in text):
        # urlsplit() would silently drop some of these and hand back a different URL.
        raise given.error("must not contain spaces or control characters", example)
    if "://" not in text:
        if not grpc:
            raise given.error("must be a URL with scheme http or https", example)
        try:
            _host_port(text, "[::1]:4317")
        except ValueError as exc:
            raise given.error(f"not a URL, and as HOST:PORT: {exc}", example) from None
        return "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise given.error(f"not a valid URL ({exc})", example) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise given.error("URL scheme must be http or https", example)
    host = parts.hostname or ""
    if not (_is_ip(host, 4) or _is_ip(host, 6) or _is_hostname(host)):
        raise given.error("URL needs a valid host name or IP address", example)
    if port == 0:
        raise given.error("port must be a number 1-65535", example)
    return text


def _with_metrics_path(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/v1/metrics"))


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


def _resource_attributes(given: _Given) -> tuple[tuple[str, str], ...]:
    return tuple(dict(_pairs(given, "attributes")).items())


# --- config file ----------------------------------------------------------------------------------------


def _load_file(given: _Given) -> tuple[str, dict[str, _Given]]:
    """Read the YAML config file; returns its path and its settings keyed like namespace attributes."""
    path = _existing_file(given, "pass an existing YAML file, or leave it unset")
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


def resolve(ns: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Merge flags (``ns`` from :func:`parse_args`), ``environ`` and the config file into a validated
    Config; raise ConfigError on the first bad value. Works for any subcommand's namespace: settings
    without a flag there still come from the environment, the file or the default."""
    config_given = _Sources(ns, environ, {}).get("config")
    config_file, file_settings = _load_file(config_given) if config_given else (None, {})
    sources = _Sources(ns, environ, file_settings)

    listen_host, listen_port = _parsed(
        sources.get("listen"), _listen, (_DEFAULT_LISTEN_HOST, _DEFAULT_LISTEN_PORT)
    )
    node_name_given = sources.get("node_name") or _from_env(environ, "NODE_NAME")
    return Config(
        listen_host=listen_host,
        listen_port=listen_port,
        poll_interval=_parsed(sources.get("poll_interval"), _poll_interval, _DEFAULT_POLL_INTERVAL),
        pods_file=_parsed(sources.get("pods_file"), lambda g: _existing_file(g, _PODS_FILE_FIX), None),
        node_name=_parsed(node_name_given, _node_name, None) or socket.gethostname(),
        cgroup_root=_parsed(sources.get("cgroup_root"), _cgroup_root, None),
        log_level=_parsed(sources.get("log_level"), lambda g: _choice(g, _LOG_LEVELS), _DEFAULT_LOG_LEVEL),
        max_series=_parsed(
            sources.get("max_series"),
            lambda g: _integer(g, "must be a whole number >= 1", 1),
            _DEFAULT_MAX_SERIES,
        ),
        map_entries=_parsed(
            sources.get("map_entries"),
            lambda g: _integer(
                g,
                f"must be a whole number from {_MIN_MAP_ENTRIES} to {_MAX_MAP_ENTRIES}",
                _MIN_MAP_ENTRIES,
                _MAX_MAP_ENTRIES,
            ),
            _DEFAULT_MAP_ENTRIES,
        ),
        histogram_scale=_parsed(
            sources.get("histogram_scale"),
            lambda g: _integer(g, "must be 0, 1 or 2", 0, _MAX_HISTOGRAM_SCALE),
            _DEFAULT_HISTOGRAM_SCALE,
        ),
        cluster_name=_parsed(sources.get("cluster_name"), _cluster_name, ""),
        otlp=_otlp(sources, environ),
        config_file=config_file,
        kube=_kube(sources, environ),
        requests=_parsed(sources.get("requests"), _request_mode, "http"),
        kernel_headers=_parsed(sources.get("kernel_headers"), _kernel_headers, None),
    )


def _kube(sources: _Sources, environ: Mapping[str, str]) -> KubeConfig | None:
    """The API source: --kube-api, else in a pod (service-account token and KUBERNETES_SERVICE_HOST/PORT)
    the cluster's own API unless --pods-file is given. The pods file and --kube-api exclude each other."""
    api = sources.get("kube_api")
    pods_file = sources.get("pods_file")
    if api is not None and pods_file is not None:
        raise ConfigError(
            f"{pods_file.source} and {api.source} are alternative pod metadata sources; set only one"
        )
    token_file = _parsed(
        sources.get("kube_token_file"),
        lambda g: _existing_file(g, "pass the file holding the API bearer token"),
        None,
    )
    ca_file = _parsed(
        sources.get("kube_ca_file"),
        lambda g: _existing_file(g, "pass the PEM file of the CA that signed the API server's certificate"),
        None,
    )
    insecure = _parsed(sources.get("kube_insecure_skip_tls_verify"), _boolean, False)
    sa_token = os.path.join(SERVICE_ACCOUNT_DIR, "token")
    sa_ca = os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt")
    in_cluster = False
    if api is not None:
        url = _kube_url(api)
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
                why = "no --kube-api and not in a pod"
                if pods_file is not None:
                    why = f"{pods_file.source} is set"
                raise ConfigError(f"{unused[0]} is set but the Kubernetes API is not used ({why})")
            return None
        url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        in_cluster = True
    return KubeConfig(
        url=url,
        token_file=token_file or (sa_token if os.path.isfile(sa_token) else None),
        ca_file=ca_file or (sa_ca if os.path.isfile(sa_ca) and url.startswith("https:") else None),
        insecure_skip_tls_verify=insecure,
        in_cluster=in_cluster,
    )


def _kube_url(given: _Given) -> str:
    example = "https://kubernetes.default.svc:443"
    text = _string(given, "a URL").strip()
    if any(char.isspace() or not char.isprintable() for char in text):
        raise given.error("must not contain spaces or control characters", example)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise given.error(f"not a valid URL ({exc})", example) from None
    if parts.scheme.lower() not in ("http", "https") or "://" not in text:
        raise given.error("must be a URL with scheme http or https", example)
    host = parts.hostname or ""
    if not (_is_ip(host, 4) or _is_ip(host, 6) or _is_hostname(host)):
        raise given.error("URL needs a valid host name or IP address", example)
    if port == 0:
        raise given.error("port must be a number 1-65535", example)
    if parts.query or parts.fragment:
        raise given.error("must not have a query or fragment", example)
    # A lowercase scheme, so that later checks for "https:" hold for "HTTPS://" too.
    return parts.scheme.lower() + text[len(parts.scheme) :].rstrip("/")


def _otlp(sources: _Sources, environ: Mapping[str, str]) -> OtlpConfig | None:
    """OTLP settings, or None when no source names an endpoint.

    podnet's own OTLP settings are validated even while OTLP is off, so a typo does not go unnoticed;
    OTEL_* variables are only read once OTLP is on, because in a shared pod environment they may be
    meant for another process.
    """
    protocol = _parsed(sources.get("otlp_protocol"), lambda g: _choice(g, _OTLP_PROTOCOLS), None)
    interval = _parsed(sources.get("otlp_interval"), _seconds, None)
    timeout = _parsed(sources.get("otlp_timeout"), _seconds, None)
    headers = _parsed(sources.get("otlp_headers"), _headers, None)
    insecure = _parsed(sources.get("otlp_insecure"), _boolean, False)
    histogram = _parsed(sources.get("otlp_histogram"), lambda g: _choice(g, _OTLP_HISTOGRAMS), None)
    temporality = _parsed(sources.get("otlp_temporality"), lambda g: _choice(g, _OTLP_TEMPORALITIES), None)

    # Only the generic variable is a base URL that needs the signal's path; the others are used as-is.
    endpoint_given = sources.get("otlp_endpoint") or _from_env(environ, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    is_base_url = False
    if endpoint_given is None:
        endpoint_given = _from_env(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint_given is None:
            return None
        is_base_url = True

    # Below, each OTEL_EXPORTER_OTLP_METRICS_* variable is listed before its generic twin because the
    # OpenTelemetry spec gives the signal-specific one precedence.
    if protocol is None:
        protocol = _parsed(
            _from_env(environ, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
            lambda g: _choice(g, _OTLP_PROTOCOLS),
            _DEFAULT_OTLP_PROTOCOL,
        )
    endpoint = _endpoint(endpoint_given, protocol)
    if is_base_url and protocol == "http/protobuf":
        endpoint = _with_metrics_path(endpoint)

    compression = _parsed(
        _from_env(environ, "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"),
        lambda g: _choice(g, _OTEL_COMPRESSIONS),
        None,
    )
    return OtlpConfig(
        endpoint=endpoint,
        protocol=protocol,
        interval=(
            interval
            if interval is not None
            else _parsed(
                _from_env(environ, "OTEL_METRIC_EXPORT_INTERVAL"), _milliseconds, _DEFAULT_OTLP_INTERVAL
            )
        ),
        timeout=(
            timeout
            if timeout is not None
            else _parsed(
                _from_env(environ, "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"),
                _milliseconds,
                _DEFAULT_OTLP_TIMEOUT,
            )
        ),
        headers=(
            headers
            if headers is not None
            else _parsed(
                _from_env(environ, "OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
                _headers,
                (),
            )
        ),
        insecure=insecure,
        compression=None if compression == "none" else compression,
        certificate=_parsed(
            _from_env(environ, "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"),
            lambda g: _existing_file(g, "pass the path of a PEM CA certificate file"),
            None,
        ),
        histogram=histogram or _DEFAULT_OTLP_HISTOGRAM,
        temporality=temporality
        or _parsed(
            _from_env(environ, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"),
            lambda g: _choice(g, _OTEL_TEMPORALITIES),
            _DEFAULT_OTLP_TEMPORALITY,
        ),
        resource_attributes=_parsed(_from_env(environ, "OTEL_RESOURCE_ATTRIBUTES"), _resource_attributes, ()),
    )
