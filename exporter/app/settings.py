"""Every setting of podnet-exporter, declared once (SETTINGS): its flag, PODNET_<KEY>
variable, config file key, parser, default and help. The run and doctor argument parsers
and the README's settings table are derived from it; config.resolve reads the sources in
its order.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

from exporter import __version__
from exporter.app.values import (
    _MAX_MAP_ENTRIES,
    _MAX_POLL_INTERVAL,
    _MIN_MAP_ENTRIES,
    _OTLP_PROTOCOLS,
    _PROG,
    ConfigError,
    _boolean,
    _choice,
    _clean,
    _directory,
    _file,
    _Given,
    _headers,
    _integer,
    _listen,
    _pin_dir,
    _positive,
    _request_mode,
    _text,
    _tls_mode,
)


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
    aliases: tuple[str, ...] = ()
    """More spellings of the flag (``--web.config.file``, as node_exporter and its peers spell it)."""

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
       "`0.0.0.0:9436`", "address of `/metrics`, `/healthz`, `/readyz` (`[::]:9436` for IPv6; also "
       "`--web.listen-address`, as node_exporter spells it)", _listen, ("0.0.0.0", 9436),
       aliases=("--web.listen-address",)),
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
    _S("ready_stale_polls", "N", "/readyz fails once the last successful poll is older than N intervals "
       "(default 3)", "`3`", "`/readyz` answers 503 once the last successful poll is older than this many "
       "poll intervals (`/healthz` stays liveness)", _integer("must be a whole number >= 1", 1), 3),
    _S("map_entries", "N", f"BPF map size, {_MIN_MAP_ENTRIES}-{_MAX_MAP_ENTRIES} (default 65536)", "`65536`",
       "size of the per-owner kernel maps (sockets, flows, histograms scale from it)",
       _integer(f"must be a whole number from {_MIN_MAP_ENTRIES} to {_MAX_MAP_ENTRIES}", _MIN_MAP_ENTRIES,
                _MAX_MAP_ENTRIES), 65536),
    _S("histogram_scale", "{0,1,2}", "latency histogram resolution (default 0)", "`0`",
       "Prometheus bucket resolution: 0 = powers of 2, 1 = of sqrt 2, 2 = of 2^(1/4)",
       _integer("must be 0, 1 or 2", 0, 2), 0),
    _S("requests", "http|http1|turns|off", "request tracking: http (counted; HTTP/1.x, HTTP/2 and gRPC "
       "recognised), http1 (HTTP/1.x recognised, HTTP/2 counted as turns), turns (counted, payload never "
       "read), off (the cheapest data path) (default http)", "`http`",
       "request tracking: `http` (counted; HTTP/1.x method and status, HTTP/2 and gRPC streams recognised), "
       "`http1` (HTTP/1.x only: HTTP/2 connections counted as turns, `protocol=\"other\"`), `turns` "
       '(counted as `protocol="other"`, payloads never read), `off` (no request metrics: the cheapest data '
       "path); see Requests below", _request_mode, "http"),
    _S("tls", "off|openssl", "openssl: read TLS plaintext through uprobes on OpenSSL's libssl (libssl.so.3, "
       "libssl.so.1.1) in every process, containers included, for HTTP recognition; needs --requests http "
       "or http1 (default off)", "`off`",
       "`openssl`: requests inside TLS recognised from the plaintext, through uprobes on OpenSSL's "
       "`SSL_read`/`SSL_write` in `libssl.so.3` and `libssl.so.1.1` of every process, containers included "
       "(needs `--requests http` or `http1`, uprobes in the kernel, and in a pod `hostPID` and "
       "`SYS_PTRACE`; costs a uprobe per SSL call); `off`: TLS connections count as turns; see Requests "
       "below",
       _tls_mode, "off", doctor=True),
    _S("pin_dir", "DIR|none", "bpffs directory where maps and programs are pinned, so that counts survive "
       "exporter restarts; none: they end with the process (default /sys/fs/bpf/podnet)",
       "`/sys/fs/bpf/podnet`", "bpffs directory where maps and programs stay pinned between runs, so "
       "counters continue across restarts (see Restarts below); `none`: they end with the process",
       _pin_dir, "/sys/fs/bpf/podnet", doctor=True),
    _S("state_dir", "DIR", "where the totals are saved after each poll (default /run/podnet)",
       "`/run/podnet`", "directory for the totals saved after each poll (with pinned maps)",
       _directory("/run/podnet"), "/run/podnet"),
    _S("web_config_file", "PATH", "exporter-toolkit web config file: TLS, client certificates, basic auth",
       "none", "TLS and basic auth for the HTTP endpoints, in the "
       "[exporter-toolkit web config](docs/WEB.md) format that node_exporter reads (also "
       "`--web.config.file`); re-read when it or its certificates change, and on SIGHUP",
       _file("pass the web config file (node_exporter's --web.config.file format)"), None,
       aliases=("--web.config.file",)),
    _S("web_max_requests", "N", "scrapes of /metrics answered at once, more get 503; 0: none (default 40)",
       "`40`", "scrapes of `/metrics` answered at once; more get 503 and are counted "
       "(`podnet_exporter_http_requests_total{code=\"503\"}`); 0: no limit (also `--web.max-requests`)",
       _integer("must be a whole number >= 0 (0: no limit)", 0), 40, aliases=("--web.max-requests",)),
    _S("fresh", "", "discard the pinned maps and saved totals of a previous run; counters start from zero",
       "false", "start from zero: discard what a previous run left pinned and saved", _boolean, False,
       in_file=False),
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
                command.add_argument(
                    setting.flag, *setting.aliases, metavar=setting.metavar, default=None, help=help_text
                )
            else:
                help_text = f"{setting.help} [env {setting.env}=true]"
                command.add_argument(setting.flag, action="store_true", default=None, help=help_text)
    reset = commands.add_parser(
        "reset",
        help="detach programs left pinned by a previous run and delete its saved totals",
        description="Remove podnet's pinned maps and programs (which detaches them) and its saved totals. "
        "Run it after uninstalling, or to start counting from zero.",
        allow_abbrev=False,
    )
    for setting in SETTINGS:
        if setting.key in ("pin_dir", "state_dir", "config"):
            reset.add_argument(
                setting.flag,
                metavar=setting.metavar,
                default=None,
                help=f"{setting.help} [env {setting.env}]".replace("%", "%%"),
            )
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
