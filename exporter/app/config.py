"""Settings for podnet-exporter from flags, environment variables and a YAML config file.

Every setting is declared once, in :data:`exporter.app.settings.SETTINGS` (its values parsed by
exporter.app.values): its flag, ``PODNET_<FLAG>`` variable, config file
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
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml

from exporter.app.settings import (
    _OTLP_KEYS,
    _SETTING,
    _TOP_KEYS,
    SETTINGS,
    Setting,
    build_parser,
    parse_args,
    readme_rows,
)
from exporter.app.values import (
    _OTEL_TEMPORALITIES,
    _OTLP_PROTOCOLS,
    SERVICE_ACCOUNT_DIR,
    ConfigError,
    _choice,
    _file,
    _from_env,
    _Given,
    _headers,
    _pairs,
    _parsed,
    _positive,
    _show,
    _url,
)
from exporter.export.otlp_config import OtlpConfig
from exporter.kernel.programs import RequestMode, TlsMode
from exporter.pods.kube import KubeConfig

_T = TypeVar("_T")


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
    """Request tracking: "http" counts requests and recognises HTTP/1.x from their first
    bytes and HTTP/2 and gRPC streams from the connection preface on; "http1" recognises
    HTTP/1.x only (HTTP/2 connections count as turns, protocol "other"); "turns" counts
    them without reading any payload (protocol "other"); "off" builds the hot path without
    request tracking (no clock read per send/recv, no podnet_request* metrics)."""
    tls: TlsMode = "off"
    """TLS plaintext capture: "openssl" puts uprobes on OpenSSL's SSL_read/SSL_write
    (libssl.so.3, libssl.so.1.1) of every process, so requests inside TLS are recognised
    like plaintext ones; needs requests "http" or "http1". "off": TLS connections count as
    turns (protocol "other")."""
    kernel_headers: str | None = None
    """The kernel headers tree BCC compiles against; None means the first usable of
    $BCC_KERNEL_SOURCE, podnet's own tree and /lib/modules/<release>/build
    (exporter.kernel.headers.find_tree)."""
    pin_dir: str = "/sys/fs/bpf/podnet"
    """bpffs directory of the pinned maps and programs; "" when pinning is off."""
    state_dir: str = "/run/podnet"
    """Directory of the totals saved after each poll."""
    fresh: bool = False
    """Discard a previous run's pinned state and saved totals at start-up."""
    ready_stale_polls: int = 3
    """/readyz fails once the last successful poll is older than this many intervals."""
    web_config_file: str | None = None
    """The exporter-toolkit web config file (TLS, basic auth); None: plain HTTP, no auth."""
    web_max_requests: int = 40
    """Scrapes of /metrics answered at once (node_exporter's --web.max-requests); 0: no limit."""


# --- where a value came from ----------------------------------------------------------------------------


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
    _check_tls(values, sources)
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


def _check_tls(values: Mapping[str, Any], sources: _Sources) -> None:
    """--tls openssl hands decrypted payloads to HTTP recognition: with --requests turns or off
    nothing would read them, so the uprobes would cost without counting anything."""
    tls, requests = sources.get("tls"), sources.get("requests")
    if values["tls"] == "openssl" and values["requests"] not in ("http", "http1") and tls and requests:
        raise ConfigError(
            f"--tls openssl needs --requests http or http1 (the decrypted payloads are read only to "
            f"recognise HTTP), but {requests.source} is {values['requests']!r} and {tls.source} is "
            f"'openssl'; set requests to http, or tls to off"
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
