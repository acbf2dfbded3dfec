"""Tests for exporter.app.config: parsing, precedence, OTEL_* variables, the YAML file and error messages."""

from __future__ import annotations

import errno
import itertools
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter import __version__
from exporter.app import values as values_module
from exporter.app.config import Config, ConfigError, parse_args, resolve
from exporter.export.otlp_config import OtlpConfig

WriteConfig = Callable[[object], Path]


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """Write a config file: a str is written verbatim, anything else is dumped as YAML."""

    def write(content: object) -> Path:
        path = tmp_path / "podnet.yaml"
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content), encoding="utf-8")
        return path

    return write


@pytest.fixture
def pods_file(tmp_path: Path) -> Path:
    path = tmp_path / "pods.json"
    path.write_text('{"items": []}', encoding="utf-8")
    return path


def run(*argv: str, env: Mapping[str, str] | None = None) -> Config:
    command, namespace = parse_args(["run", *argv])
    assert command == "run"
    # An explicit environment keeps the host's PODNET_*/OTEL_* variables out of the tests.
    return resolve(namespace, env or {})


def otlp_of(config: Config) -> OtlpConfig:
    assert config.otlp is not None
    return config.otlp


def assert_one_line(message: str) -> None:
    assert message
    assert message.splitlines() == [message], message
    assert message == message.strip()


def error_of(*argv: str, env: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        run(*argv, env=env)
    message = str(info.value)
    assert_one_line(message)
    return message


# --- defaults -------------------------------------------------------------------------------------------


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "host-from-socket")
    assert run() == Config(
        listen_host="0.0.0.0",
        listen_port=9436,
        poll_interval=5.0,
        pods_file=None,
        node_name="host-from-socket",
        cgroup_root=None,
        log_level="info",
        max_series=10000,
        map_entries=65536,
        histogram_scale=0,
        cluster_name="",
        otlp=None,
        config_file=None,
    )


def test_node_name_defaults_to_node_name_variable() -> None:
    assert run(env={"NODE_NAME": "worker-3"}).node_name == "worker-3"


def test_otlp_defaults_once_an_endpoint_is_set() -> None:
    assert otlp_of(run("--otlp-endpoint", "http://collector:4317")) == OtlpConfig(
        endpoint="http://collector:4317",
        protocol="grpc",
        interval=60.0,
        timeout=10.0,
        headers=(),
        insecure=False,
        compression=None,
        certificate=None,
        histogram="exponential",
        temporality="cumulative",
        resource_attributes=(),
    )


def test_every_flag(pods_file: Path, tmp_path: Path) -> None:
    config = run(
        *("--listen", "127.0.0.1:9000", "--poll-interval", "2.5", "--pods-file", str(pods_file)),
        *("--node-name", "node-a", "--cgroup-root", str(tmp_path), "--log-level", "DEBUG"),
        *("--max-series", "500", "--map-entries", "1024", "--histogram-scale", "2", "--cluster-name", "prod"),
        *("--otlp-endpoint", "https://collector:4318/v1/metrics", "--otlp-protocol", "http/protobuf"),
        *("--otlp-interval", "15", "--otlp-headers", "Authorization=Bearer x==,X-Tenant=a%2Cb"),
        *("--otlp-timeout", "3", "--otlp-insecure", "--otlp-histogram", "explicit"),
        *("--otlp-temporality", "delta", "--requests", "http1", "--tls", "openssl"),
    )
    assert config == Config(
        listen_host="127.0.0.1",
        listen_port=9000,
        poll_interval=2.5,
        pods_file=str(pods_file),
        node_name="node-a",
        cgroup_root=str(tmp_path),
        log_level="debug",
        max_series=500,
        map_entries=1024,
        histogram_scale=2,
        cluster_name="prod",
        otlp=OtlpConfig(
            endpoint="https://collector:4318/v1/metrics",
            protocol="http/protobuf",
            interval=15.0,
            timeout=3.0,
            headers=(("authorization", "Bearer x=="), ("x-tenant", "a,b")),
            insecure=True,
            compression=None,
            certificate=None,
            histogram="explicit",
            temporality="delta",
            resource_attributes=(),
        ),
        config_file=None,
        requests="http1",
        tls="openssl",
    )


def test_every_config_file_key(write_config: WriteConfig, pods_file: Path) -> None:
    path = write_config(
        f"""
listen: "[::1]:9100"
poll_interval: 10
pods_file: {pods_file}
node_name: node-b
cgroup_root: /sys/fs/cgroup
log_level: warning
max_series: 20000
map_entries: 131072
histogram_scale: 1
cluster_name: staging
requests: http1
tls: openssl
otlp:
  endpoint: otel-collector.monitoring:4317
  protocol: grpc
  interval: 30
  headers: {{X-Scope-OrgID: "team a", authorization: "Basic abc%2C"}}
  timeout: 2.5
  insecure: true
  histogram: explicit
  temporality: delta
"""
    )
    config = run("--config", str(path))
    assert config == Config(
        listen_host="::1",
        listen_port=9100,
        poll_interval=10.0,
        pods_file=str(pods_file),
        node_name="node-b",
        cgroup_root="/sys/fs/cgroup",
        log_level="warning",
        max_series=20000,
        map_entries=131072,
        histogram_scale=1,
        cluster_name="staging",
        otlp=OtlpConfig(
            endpoint="http://otel-collector.monitoring:4317",
            protocol="grpc",
            interval=30.0,
            timeout=2.5,
            # The mapping form is literal: no percent-decoding.
            headers=(("x-scope-orgid", "team a"), ("authorization", "Basic abc%2C")),
            insecure=True,
            compression=None,
            certificate=None,
            histogram="explicit",
            temporality="delta",
            resource_attributes=(),
        ),
        config_file=str(path),
        requests="http1",
        tls="openssl",
    )


# --- accepted spellings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("0.0.0.0:9436", "0.0.0.0", 9436),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("localhost:65535", "localhost", 65535),
        ("node-1.example.com.:80", "node-1.example.com.", 80),
        ("[::]:9436", "::", 9436),
        ("[fe80::1%eth0]:9436", "fe80::1%eth0", 9436),
        (" 10.0.0.1:9436\n", "10.0.0.1", 9436),
        ("[10.0.0.1]:9436", "10.0.0.1", 9436),  # the chart's [$(HOST_IP)]:PORT on an IPv4 node
    ],
)
def test_listen_accepts(listen: str, host: str, port: int) -> None:
    config = run(env={"PODNET_LISTEN": listen})
    assert (config.listen_host, config.listen_port) == (host, port)


@pytest.mark.parametrize(("text", "seconds"), [("0.5", 0.5), ("3600", 3600.0), ("1e1", 10.0), (" 7 ", 7.0)])
def test_poll_interval_accepts(text: str, seconds: float) -> None:
    assert run("--poll-interval", text).poll_interval == seconds


@pytest.mark.parametrize(
    ("endpoint", "protocol", "expected"),
    [
        ("collector:4317", "grpc", "http://collector:4317"),
        ("[::1]:4317", "grpc", "http://[::1]:4317"),
        ("10.1.2.3:4317", "grpc", "http://10.1.2.3:4317"),
        ("https://collector.example.com", "grpc", "https://collector.example.com"),
        ("HTTP://Collector:4318/v1/metrics", "http/protobuf", "HTTP://Collector:4318/v1/metrics"),
        (
            "http://[2001:db8::1]:4318/otlp/v1/metrics",
            "http/protobuf",
            "http://[2001:db8::1]:4318/otlp/v1/metrics",
        ),
    ],
)
def test_otlp_endpoint_accepts(endpoint: str, protocol: str, expected: str) -> None:
    otlp = otlp_of(run("--otlp-endpoint", endpoint, "--otlp-protocol", protocol))
    assert otlp.endpoint == expected


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("ON", True), ("1", True), ("no", False), ("0", False)]
)
def test_otlp_insecure_from_env(text: str, value: bool) -> None:
    env = {"PODNET_OTLP_ENDPOINT": "http://c:4317", "PODNET_OTLP_INSECURE": text}
    assert otlp_of(run(env=env)).insecure is value


def test_numbers_may_be_quoted_in_the_config_file(write_config: WriteConfig) -> None:
    # Templating tools (Helm's | quote) often render every value as a string.
    path = write_config(
        {"poll_interval": "2", "max_series": "300", "otlp": {"endpoint": "c:4317", "insecure": "true"}}
    )
    config = run("--config", str(path))
    assert (config.poll_interval, config.max_series, otlp_of(config).insecure) == (2.0, 300, True)


# --- bad values, from every source ----------------------------------------------------------------------

# (setting, bad value, part of the expected problem). Each case runs as a flag, a PODNET_* variable and a
# config file key, and the message must name that source.
BAD_VALUES: list[tuple[str, str, str]] = [
    ("listen", "nonsense:port", "port must be a number 1-65535"),
    ("listen", "0.0.0.0", "expected HOST:PORT"),
    ("listen", "0.0.0.0:0", "port must be a number 1-65535"),
    ("listen", "0.0.0.0:65536", "port must be a number 1-65535"),
    ("listen", "0.0.0.0:-1", "port must be a number 1-65535"),
    ("listen", "0.0.0.0:+80", "port must be a number 1-65535"),
    ("listen", "::1:9436", "brackets"),
    ("listen", "[::1]9436", "expected [IPv6]:PORT"),
    ("listen", "[::1", "expected [IPv6]:PORT"),
    ("listen", "[nonsense]:9436", "in brackets is not an IP address"),
    ("listen", ":9436", "host is empty"),
    ("listen", "bad_host:9436", "not a valid IP address or hostname"),
    ("listen", "999.1.1.1:9436", "not a valid IP address or hostname"),
    ("listen", "-dash.example:9436", "not a valid IP address or hostname"),
    ("listen", "", "expected HOST:PORT"),
    ("poll_interval", "-1", "must be a number of seconds > 0 and <= 3600"),
    ("poll_interval", "0", "must be a number of seconds > 0 and <= 3600"),
    ("poll_interval", "3600.5", "must be a number of seconds > 0 and <= 3600"),
    ("poll_interval", "5s", "must be a number of seconds"),
    ("poll_interval", "nan", "must be a number of seconds"),
    ("poll_interval", "inf", "must be a number of seconds"),
    (
        "pods_file",
        "/nonexistent/pods.json",
        "no such file; pass an existing file, e.g. kubectl get pods -o json",
    ),
    (
        "pods_file",
        "/",
        "not a regular file; pass an existing file, e.g. kubectl get pods -o json > pods.json",
    ),
    ("pods_file", "", "no such file"),
    ("node_name", "", "must be a non-empty node name"),
    ("node_name", "two words", "without spaces"),
    ("cgroup_root", "", "must be a directory path"),
    ("kernel_headers", "", "must be a directory path"),
    ("kernel_headers", "  ", "must be a directory path"),
    ("log_level", "verbose", "must be one of debug, info, warning, error"),
    ("log_level", "warn", "must be one of debug, info, warning, error"),
    ("max_series", "0", "must be a whole number >= 1"),
    ("max_series", "-5", "must be a whole number >= 1"),
    ("max_series", "1.5", "must be a whole number >= 1"),
    ("max_series", "1e4", "must be a whole number >= 1"),
    ("max_series", "9" * 5000, "must be a whole number >= 1"),
    ("map_entries", "1023", "must be a whole number from 1024 to 4194304"),
    ("map_entries", "4194305", "must be a whole number from 1024 to 4194304"),
    ("map_entries", "lots", "must be a whole number from 1024 to 4194304"),
    ("histogram_scale", "3", "must be 0, 1 or 2"),
    ("histogram_scale", "-1", "must be 0, 1 or 2"),
    ("histogram_scale", "1.0", "must be 0, 1 or 2"),
    ("cluster_name", "prod\neu", "control characters"),
    ("otlp_endpoint", "ftp://collector:4317", "scheme must be http or https"),
    ("otlp_endpoint", "collector", "not a URL, and as HOST:PORT: expected HOST:PORT"),
    ("otlp_endpoint", "collector:http", "port must be a number 1-65535"),
    ("otlp_endpoint", "http://", "valid host"),
    ("otlp_endpoint", "http://:4317", "valid host"),
    ("otlp_endpoint", "http://bad_host:4317", "valid host"),
    ("otlp_endpoint", "http://collector:99999", "not a valid URL"),
    ("otlp_endpoint", "http://collector:0", "port must be a number 1-65535"),
    ("otlp_endpoint", "http://[::1:4317", "not a valid URL"),
    ("otlp_endpoint", "http://coll ector:4317", "must not contain spaces"),
    ("otlp_endpoint", "http://collector:4317/\tx", "must not contain spaces"),
    ("otlp_protocol", "http/json", "must be one of grpc, http/protobuf"),
    ("otlp_protocol", "udp", "must be one of grpc, http/protobuf"),
    ("otlp_interval", "0", "must be a number of seconds > 0"),
    ("otlp_interval", "-1", "must be a number of seconds > 0"),
    ("otlp_interval", "soon", "must be a number of seconds > 0"),
    ("otlp_timeout", "0", "must be a number of seconds > 0"),
    ("otlp_timeout", "1e999", "must be a number of seconds > 0"),
    ("otlp_headers", "novalue", "expected comma-separated key=value headers, item 1 has no '='"),
    ("otlp_headers", "a=b,=c", "expected comma-separated key=value headers, item 2 has no '='"),
    ("otlp_headers", "bad key=v", "header 1: the name is not a valid HTTP header name"),
    ("otlp_headers", "k=a%0D%0Ab", "control characters"),
    ("otlp_insecure", "maybe", "must be true or false"),
    ("otlp_histogram", "linear", "must be one of exponential, explicit"),
    ("otlp_temporality", "lowmemory", "must be one of cumulative, delta"),
    ("otlp_temporality", "sometimes", "must be one of cumulative, delta"),
    ("requests", "http2", "must be http, http1, turns or off"),
    ("requests", "peek", "must be http, http1, turns or off"),
    ("tls", "maybe", "must be off or openssl"),
    ("tls", "boringssl", "must be off or openssl"),
    ("tls", "", "must be off or openssl"),
]


SOURCES = ["flag", "env", "file"]


def applies(source: str, key: str, value: str) -> bool:
    # --otlp-insecure takes no value, and an empty variable counts as unset rather than bad.
    return not (source == "flag" and key == "otlp_insecure") and not (source == "env" and not value)


BAD_VALUE_CASES = [
    pytest.param(source, key, value, problem, id=f"{source}:{key}={value[:30]!r}")
    for key, value, problem in BAD_VALUES
    for source in SOURCES
    if applies(source, key, value)
]


def source_inputs(
    source: str, key: str, value: str, write_config: WriteConfig
) -> tuple[list[str], dict[str, str], str]:
    """argv and environment that set ``key`` to ``value`` at ``source``, and how messages name it."""
    if source == "flag":
        flag = "--" + key.replace("_", "-")
        return [f"{flag}={value}"], {}, flag
    if source == "env":
        name = "PODNET_" + key.upper()
        return [], {name: value}, name
    section, _, sub = key.partition("_")
    data: dict[str, Any] = {section: {sub: value}} if section == "otlp" else {key: value}
    path = write_config(data)
    dotted = f"otlp.{sub}" if section == "otlp" else key
    return ["--config", str(path)], {}, f"config file {path}: key {dotted}"


@pytest.mark.parametrize(("source", "key", "value", "problem"), BAD_VALUE_CASES)
def test_bad_value_names_its_source(
    source: str, key: str, value: str, problem: str, write_config: WriteConfig
) -> None:
    argv, env, name = source_inputs(source, key, value, write_config)
    message = error_of(*argv, env=env)
    # Headers carry tokens: their value is never shown.
    shown = "(value not shown)" if key == "otlp_headers" else f"{value!r:.40}"
    assert message.startswith(f"{name} {shown}"), message
    assert problem in message


def test_bad_listen_message_matches_contract() -> None:
    assert error_of("--listen", "nonsense:port") == (
        "--listen 'nonsense:port': port must be a number 1-65535 (example: --listen 0.0.0.0:9436)"
    )


def test_bad_poll_interval_message_matches_contract() -> None:
    assert (
        error_of("--poll-interval", "-1")
        == "--poll-interval '-1': must be a number of seconds > 0 and <= 3600"
    )


def test_examples_are_written_for_the_source(write_config: WriteConfig) -> None:
    assert "(example: PODNET_LISTEN=0.0.0.0:9436)" in error_of(env={"PODNET_LISTEN": "x"})
    path = write_config({"listen": "x"})
    assert "(example: listen: 0.0.0.0:9436)" in error_of("--config", str(path))


def test_pods_file_directory(tmp_path: Path) -> None:
    message = error_of("--pods-file", str(tmp_path))
    assert message.startswith("--pods-file ")
    assert "pass an existing file, e.g. kubectl get pods -o json > pods.json" in message


def test_pods_file_unreadable(pods_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise PermissionError(errno.EACCES, "Permission denied")

    # chmod would not stop root, who runs these tests in CI. Files are checked where values
    # are parsed (exporter.app.values).
    monkeypatch.setattr(values_module, "open", refuse, raising=False)
    message = error_of("--pods-file", str(pods_file))
    assert "cannot read it" in message
    assert "pass an existing file, e.g. kubectl get pods -o json > pods.json" in message


def test_long_values_are_cut_in_messages() -> None:
    message = error_of("--listen", "x" * 10_000)
    assert len(message) < 300


# --- precedence -----------------------------------------------------------------------------------------

Raw = tuple[object, object]  # (what the source says, what Config should then hold)

# (setting, flag, env, file, default, how to read the setting from a Config)
PRECEDENCE: list[tuple[str, Raw, Raw, Raw, object, Callable[[Config], object]]] = [
    (
        "listen",
        ("1.1.1.1:1", ("1.1.1.1", 1)),
        ("2.2.2.2:2", ("2.2.2.2", 2)),
        ("3.3.3.3:3", ("3.3.3.3", 3)),
        ("0.0.0.0", 9436),
        lambda c: (c.listen_host, c.listen_port),
    ),
    ("poll_interval", ("1", 1.0), ("2", 2.0), (3, 3.0), 5.0, lambda c: c.poll_interval),
    ("log_level", ("debug", "debug"), ("warning", "warning"), ("error", "error"), "info",
     lambda c: c.log_level),
    ("max_series", ("11", 11), ("22", 22), (33, 33), 10000, lambda c: c.max_series),
    ("histogram_scale", ("1", 1), ("2", 2), (0, 0), 0, lambda c: c.histogram_scale),
    ("cluster_name", ("flag", "flag"), ("env", "env"), ("file", "file"), "", lambda c: c.cluster_name),
    ("cgroup_root", ("/flag", "/flag"), ("/env", "/env"), ("/file", "/file"), None, lambda c: c.cgroup_root),
    ("kernel_headers", ("/flag", "/flag"), ("/env", "/env"), ("/file", "/file"), None,
     lambda c: c.kernel_headers),
    ("otlp_timeout", ("1", 1.0), ("2", 2.0), (3, 3.0), 10.0, lambda c: otlp_of(c).timeout),
    ("otlp_protocol", ("grpc", "grpc"), ("http/protobuf", "http/protobuf"), ("grpc", "grpc"), "grpc",
     lambda c: otlp_of(c).protocol),
    ("requests", ("http1", "http1"), ("turns", "turns"), (False, "off"), "http", lambda c: c.requests),
    ("tls", ("openssl", "openssl"), ("off", "off"), (True, "openssl"), "off", lambda c: c.tls),
]  # fmt: skip


@pytest.mark.parametrize(
    ("use_flag", "use_env", "use_file"), list(itertools.product([True, False], repeat=3))
)
@pytest.mark.parametrize(
    ("key", "flag", "env", "file", "default", "read"), PRECEDENCE, ids=[p[0] for p in PRECEDENCE]
)
def test_flag_over_env_over_file_over_default(
    use_flag: bool,
    use_env: bool,
    use_file: bool,
    key: str,
    flag: Raw,
    env: Raw,
    file: Raw,
    default: object,
    read: Callable[[Config], object],
    write_config: WriteConfig,
) -> None:
    argv: list[str] = []
    # OTLP settings only exist once an endpoint is set; the OTEL_* one sits below every source under test.
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"} if key.startswith("otlp_") else {}
    data: dict[str, Any] = {}
    if use_flag:
        argv += ["--" + key.replace("_", "-"), str(flag[0])]
    if use_env:
        environ["PODNET_" + key.upper()] = str(env[0])
    if use_file:
        section, _, sub = key.partition("_")
        data = {"otlp": {sub: file[0]}} if section == "otlp" else {key: file[0]}
    argv += ["--config", str(write_config(data))]

    expected = flag[1] if use_flag else env[1] if use_env else file[1] if use_file else default
    assert read(run(*argv, env=environ)) == expected


def test_otlp_timeout_default_sits_below_the_file() -> None:
    assert otlp_of(run(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})).timeout == 10.0


def test_node_name_precedence(write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "from-socket")
    path = str(write_config({"node_name": "from-file"}))
    env = {"NODE_NAME": "from-downward-api", "PODNET_NODE_NAME": "from-podnet-env"}
    assert run("--node-name", "from-flag", "--config", path, env=env).node_name == "from-flag"
    assert run("--config", path, env=env).node_name == "from-podnet-env"
    assert run("--config", path, env={"NODE_NAME": "from-downward-api"}).node_name == "from-file"
    assert run(env={"NODE_NAME": "from-downward-api"}).node_name == "from-downward-api"
    assert run().node_name == "from-socket"


def test_config_flag_over_config_variable(tmp_path: Path) -> None:
    flag_file = tmp_path / "flag.yaml"
    flag_file.write_text("log_level: debug\n", encoding="utf-8")
    env_file = tmp_path / "env.yaml"
    env_file.write_text("log_level: error\n", encoding="utf-8")
    config = run("--config", str(flag_file), env={"PODNET_CONFIG": str(env_file)})
    assert (config.config_file, config.log_level) == (str(flag_file), "debug")
    config = run(env={"PODNET_CONFIG": str(env_file)})
    assert (config.config_file, config.log_level) == (str(env_file), "error")


def test_otlp_insecure_precedence(write_config: WriteConfig) -> None:
    path = str(write_config({"otlp": {"endpoint": "c:4317", "insecure": False}}))
    assert otlp_of(run("--config", path)).insecure is False
    assert otlp_of(run("--config", path, env={"PODNET_OTLP_INSECURE": "true"})).insecure is True
    assert otlp_of(run("--config", path, "--otlp-insecure", env={"PODNET_OTLP_INSECURE": "false"})).insecure


def test_empty_variables_count_as_unset() -> None:
    env = {"PODNET_LISTEN": "", "PODNET_CONFIG": "", "NODE_NAME": "", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
    config = run(env=env)
    assert (config.listen_port, config.config_file, config.otlp) == (9436, None, None)


# --- OpenTelemetry variables ----------------------------------------------------------------------------

OTEL_ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}


def test_otel_endpoint_enables_otlp() -> None:
    assert otlp_of(run(env=OTEL_ENDPOINT)).endpoint == "http://collector:4317"


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://collector:4318", "http://collector:4318/v1/metrics"),
        ("http://collector:4318/", "http://collector:4318/v1/metrics"),
        ("https://gw.example.com/otlp", "https://gw.example.com/otlp/v1/metrics"),
    ],
)
def test_generic_otel_endpoint_is_a_base_url_for_http(base: str, expected: str) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": base, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert otlp_of(run(env=env)).endpoint == expected


def test_metrics_otel_endpoint_is_used_as_is_and_wins() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://metrics:4318/custom",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    assert otlp_of(run(env=env)).endpoint == "http://metrics:4318/custom"


def test_podnet_endpoint_beats_otel_endpoints(write_config: WriteConfig) -> None:
    env = {**OTEL_ENDPOINT, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://metrics:4317"}
    path = str(write_config({"otlp": {"endpoint": "http://file:4317"}}))
    assert otlp_of(run("--config", path, env=env)).endpoint == "http://file:4317"


def test_otel_milliseconds_become_seconds() -> None:
    env = {**OTEL_ENDPOINT, "OTEL_METRIC_EXPORT_INTERVAL": "15000", "OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}
    otlp = otlp_of(run(env=env))
    assert (otlp.interval, otlp.timeout) == (15.0, 2.5)


def test_metrics_timeout_beats_generic_timeout() -> None:
    env = {**OTEL_ENDPOINT, "OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "500"}
    assert otlp_of(run(env=env)).timeout == 0.5


def test_podnet_seconds_beat_otel_milliseconds(write_config: WriteConfig) -> None:
    env = {**OTEL_ENDPOINT, "OTEL_METRIC_EXPORT_INTERVAL": "15000", "OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}
    path = str(write_config({"otlp": {"interval": 90, "timeout": 4}}))
    otlp = otlp_of(run("--config", path, env=env))
    assert (otlp.interval, otlp.timeout) == (90.0, 4.0)


def test_otel_protocol() -> None:
    env = {**OTEL_ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    env["OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"] = "http/protobuf"
    assert otlp_of(run(env=env)).protocol == "http/protobuf"
    assert otlp_of(run("--otlp-protocol", "grpc", env=env)).protocol == "grpc"


def test_otel_headers_are_percent_decoded_and_metrics_ones_win() -> None:
    env = {**OTEL_ENDPOINT, "OTEL_EXPORTER_OTLP_HEADERS": "api-key=generic"}
    assert otlp_of(run(env=env)).headers == (("api-key", "generic"),)
    env["OTEL_EXPORTER_OTLP_METRICS_HEADERS"] = "Api-Key = a%2Cb%3Dc , x=%20y"
    assert otlp_of(run(env=env)).headers == (("api-key", "a,b=c"), ("x", " y"))
    assert otlp_of(run("--otlp-headers", "k=v", env=env)).headers == (("k", "v"),)


def test_otel_temporality_preference_keeps_lowmemory() -> None:
    env = {**OTEL_ENDPOINT, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "LowMemory"}
    assert otlp_of(run(env=env)).temporality == "lowmemory"
    assert otlp_of(run("--otlp-temporality", "cumulative", env=env)).temporality == "cumulative"


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, "gzip"),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "none"}, None),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip", "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "none"}, None),
        ({"OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "GZIP"}, "gzip"),
    ],
)
def test_otel_compression(variables: dict[str, str], expected: str | None) -> None:
    assert otlp_of(run(env={**OTEL_ENDPOINT, **variables})).compression == expected


def test_otel_certificate(tmp_path: Path) -> None:
    generic, metrics = tmp_path / "generic.pem", tmp_path / "metrics.pem"
    generic.write_text("x", encoding="utf-8")
    metrics.write_text("x", encoding="utf-8")
    env = {**OTEL_ENDPOINT, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(generic)}
    assert otlp_of(run(env=env)).certificate == str(generic)
    env["OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE"] = str(metrics)
    assert otlp_of(run(env=env)).certificate == str(metrics)


def test_otel_resource_attributes_are_percent_decoded() -> None:
    env = {**OTEL_ENDPOINT, "OTEL_RESOURCE_ATTRIBUTES": "service.name=podnet,team=net%20ops,,note=a%2Cb"}
    assert otlp_of(run(env=env)).resource_attributes == (
        ("service.name", "podnet"),
        ("team", "net ops"),
        ("note", "a,b"),
    )


def test_cluster_name_variable() -> None:
    assert run(env={"PODNET_CLUSTER_NAME": "eu-1"}).cluster_name == "eu-1"


def test_otel_variables_are_ignored_while_otlp_is_off() -> None:
    # They may be meant for another process in the pod; without an endpoint podnet does not push OTLP.
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json", "OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}
    assert run(env=env).otlp is None


def test_podnet_otlp_settings_are_checked_while_otlp_is_off() -> None:
    assert error_of("--otlp-protocol", "http/json").startswith("--otlp-protocol 'http/json': ")


# (variable, bad value, part of the expected problem); the OTLP endpoint is set so they are read.
BAD_OTEL: list[tuple[str, str, str]] = [
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector", "expected HOST:PORT"),
    ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "ftp://c:1", "scheme must be http or https"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "must be one of grpc, http/protobuf"),
    ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "thrift", "must be one of grpc, http/protobuf"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s", "must be a number of milliseconds > 0"),
    ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "0", "must be a number of milliseconds > 0"),
    ("OTEL_METRIC_EXPORT_INTERVAL", "-60000", "must be a number of milliseconds > 0"),
    ("OTEL_EXPORTER_OTLP_HEADERS", "novalue", "key=value headers"),
    ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "a b=c", "not a valid HTTP header name"),
    ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "often", "cumulative, delta, lowmemory"),
    ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli", "must be one of gzip, none"),
    ("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "zstd", "must be one of gzip, none"),
    ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem", "no such file"),
    ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", "/", "not a regular file"),
    ("OTEL_RESOURCE_ATTRIBUTES", "a=b,oops", "key=value attributes, got 'oops'"),
]


@pytest.mark.parametrize(("name", "value", "problem"), BAD_OTEL, ids=[b[0] for b in BAD_OTEL])
def test_bad_otel_variable_names_it(name: str, value: str, problem: str) -> None:
    message = error_of(env={**OTEL_ENDPOINT, name: value})
    shown = "(value not shown)" if name.endswith("HEADERS") else repr(value)
    assert message.startswith(f"{name} {shown}: "), message
    assert problem in message


# --- config file ----------------------------------------------------------------------------------------


def config_file_error(write_config: WriteConfig, content: object) -> tuple[str, str]:
    path = str(write_config(content))
    return error_of("--config", path), path


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("listen: [unclosed\n", "not valid YAML: "),
        ("a: b: c\n", "not valid YAML: mapping values are not allowed here at line 1 column 5"),
        ("listen: '0.0.0.0:1'\nlisten\n", "not valid YAML"),
        ("cluster_name: 2024-13-45\n", "not valid YAML: month must be in 1..12"),
        ("- listen: 0.0.0.0:9436\n", "top level must be a mapping of settings, not list"),
        ("just a string\n", "top level must be a mapping of settings, not str"),
        (
            "poll-interval: 5\n",
            "unknown key 'poll-interval'; did you mean poll_interval? valid keys: listen, ",
        ),
        ("frobnicate: 1\n", "unknown key 'frobnicate'; valid keys: listen, poll_interval, pods_file"),
        ("config: other.yaml\n", "unknown key 'config'"),
        ("1: x\n", "unknown key 1"),
        (
            "otlp: {endpoint: 'c:4317', endpiont: x}\n",
            "unknown key 'endpiont' under otlp; did you mean endpoint?",
        ),
        (
            "otlp: {compression: gzip}\n",
            "unknown key 'compression' under otlp; valid keys: endpoint, protocol",
        ),
        ("otlp: [endpoint]\n", "key otlp must be a mapping of settings, not list"),
        ("otlp: http://c:4317\n", "key otlp must be a mapping of settings, not str"),
    ],
)
def test_config_file_structure_errors(write_config: WriteConfig, content: str, problem: str) -> None:
    message, path = config_file_error(write_config, content)
    assert message.startswith(f"config file {path}: "), message
    assert problem in message


@pytest.mark.parametrize(
    ("content", "key", "problem"),
    [
        ({"listen": 9436}, "listen", "must be HOST:PORT (a string; quote it in YAML)"),
        ({"listen": ["0.0.0.0:1"]}, "listen", "must be HOST:PORT"),
        ({"poll_interval": [1]}, "poll_interval", "must be a number of seconds"),
        ({"poll_interval": True}, "poll_interval", "must be a number of seconds"),
        ({"poll_interval": {"s": 1}}, "poll_interval", "must be a number of seconds"),
        ({"poll_interval": 10**400}, "poll_interval", "must be a number of seconds"),
        ({"pods_file": 5}, "pods_file", "must be a file path"),
        ({"node_name": 7}, "node_name", "must be a node name (a string"),
        ({"cgroup_root": False}, "cgroup_root", "must be a directory path"),
        ({"kernel_headers": 1}, "kernel_headers", "must be a directory path"),
        ({"log_level": 1}, "log_level", "must be one of debug"),
        ({"max_series": 1.5}, "max_series", "must be a whole number >= 1"),
        ({"max_series": True}, "max_series", "must be a whole number >= 1"),
        ({"map_entries": 100}, "map_entries", "must be a whole number from 1024"),
        ({"histogram_scale": 5}, "histogram_scale", "must be 0, 1 or 2"),
        ({"cluster_name": True}, "cluster_name", "must be a cluster name (a string; quote it in YAML)"),
        ({"otlp": {"endpoint": 4317}}, "otlp.endpoint", "must be a URL or HOST:PORT (a string"),
        ({"otlp": {"insecure": 2}}, "otlp.insecure", "must be true or false"),
        ({"otlp": {"interval": "1m"}}, "otlp.interval", "must be a number of seconds > 0"),
        ({"otlp": {"headers": ["a=b"]}}, "otlp.headers", "must be a mapping of header names to values"),
        ({"otlp": {"headers": {"k": 1}}}, "otlp.headers", "names and values must be strings"),
        ({"otlp": {"headers": {"bad key": "v"}}}, "otlp.headers", "not a valid HTTP header name"),
        ({"otlp": {"protocol": ["grpc"]}}, "otlp.protocol", "must be one of grpc, http/protobuf"),
    ],
)
def test_config_file_wrong_types(write_config: WriteConfig, content: object, key: str, problem: str) -> None:
    message, path = config_file_error(write_config, content)
    assert message.startswith(f"config file {path}: key {key} "), message
    assert problem in message


def test_config_file_missing(tmp_path: Path) -> None:
    message = error_of("--config", str(tmp_path / "nope.yaml"))
    assert message.startswith("--config ")
    assert "no such file" in message


def test_config_file_from_env_missing(tmp_path: Path) -> None:
    message = error_of(env={"PODNET_CONFIG": str(tmp_path)})
    assert message.startswith(f"PODNET_CONFIG {str(tmp_path)!r}: not a regular file")


def test_config_file_not_text(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert "not UTF-8 text" in error_of("--config", str(path))


def test_empty_config_file_means_defaults(write_config: WriteConfig) -> None:
    path = str(write_config(""))
    config = run("--config", path)
    assert (config.config_file, config.listen_port, config.otlp) == (path, 9436, None)


def test_null_values_in_config_file_mean_unset(write_config: WriteConfig) -> None:
    path = str(write_config("listen:\npods_file:\notlp:\n"))
    assert run("--config", path).listen_port == 9436
    path = str(write_config("otlp:\n  endpoint:\n  protocol:\n"))
    assert run("--config", path).otlp is None


def test_otlp_headers_string_form_in_config_file(write_config: WriteConfig) -> None:
    path = str(write_config({"otlp": {"endpoint": "c:4317", "headers": "a=1, b=x%2Cy"}}))
    assert otlp_of(run("--config", path)).headers == (("a", "1"), ("b", "x,y"))


# --- command line ---------------------------------------------------------------------------------------


def test_no_command() -> None:
    with pytest.raises(ConfigError) as info:
        parse_args([])
    assert str(info.value) == "no command given; use 'podnet-exporter run' (or doctor, bpf-source)"


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (
            ["--listen", "0.0.0.0:1"],
            "--listen: options go after the command, e.g. 'podnet-exporter run --listen",
        ),
        (["--listen=0.0.0.0:1", "run"], "--listen: options go after the command"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "--listen"], "argument --listen/--web.listen-address: expected one argument"),
        (["run", "--list", "0.0.0.0:1"], "unrecognized arguments"),  # no abbreviations
        (["run", "extra"], "unrecognized arguments: extra"),
        (["doctor", "--listen", "0.0.0.0:1"], "unrecognized arguments: --listen"),
        (["bpf-source", "--config", "x.yaml"], "unrecognized arguments: --config"),
    ],
)
def test_usage_errors_raise_config_error(argv: list[str], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    message = str(info.value)
    assert_one_line(message)
    assert problem in message
    assert message.endswith("; see podnet-exporter --help")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"podnet-exporter {__version__}"


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["run", "--help"])
    assert info.value.code == 0
    assert "PODNET_POLL_INTERVAL" in capsys.readouterr().out


def test_doctor(tmp_path: Path, write_config: WriteConfig) -> None:
    path = str(write_config({"log_level": "debug"}))
    command, namespace = parse_args(["doctor", "--config", path, "--cgroup-root", str(tmp_path)])
    assert command == "doctor"
    config = resolve(namespace, {"PODNET_LISTEN": "127.0.0.1:1"})
    assert (config.cgroup_root, config.log_level, config.listen_port) == (str(tmp_path), "debug", 1)


def test_doctor_takes_kernel_headers() -> None:
    _, namespace = parse_args(["doctor", "--kernel-headers", "/srv/headers"])
    assert resolve(namespace, {}).kernel_headers == "/srv/headers"
    _, namespace = parse_args(["doctor"])
    assert resolve(namespace, {"PODNET_KERNEL_HEADERS": "/env/headers"}).kernel_headers == "/env/headers"


def test_doctor_reports_bad_environment() -> None:
    _, namespace = parse_args(["doctor"])
    with pytest.raises(ConfigError, match=r"^PODNET_MAP_ENTRIES '12': "):
        resolve(namespace, {"PODNET_MAP_ENTRIES": "12"})


@pytest.mark.parametrize(
    ("argv", "preprocessed"), [(["bpf-source"], False), (["bpf-source", "--preprocessed"], True)]
)
def test_bpf_source(argv: list[str], preprocessed: bool) -> None:
    command, namespace = parse_args(argv)
    assert (command, namespace.preprocessed) == ("bpf-source", preprocessed)


# --- arbitrary input ------------------------------------------------------------------------------------

ENV_NAMES = [
    "PODNET_LISTEN",
    "PODNET_REQUESTS",
    "PODNET_TLS",
    "PODNET_POLL_INTERVAL",
    "PODNET_NODE_NAME",
    "PODNET_LOG_LEVEL",
    "PODNET_MAX_SERIES",
    "PODNET_MAP_ENTRIES",
    "PODNET_HISTOGRAM_SCALE",
    "PODNET_CLUSTER_NAME",
    "PODNET_CGROUP_ROOT",
    "PODNET_OTLP_ENDPOINT",
    "PODNET_OTLP_PROTOCOL",
    "PODNET_OTLP_INTERVAL",
    "PODNET_OTLP_HEADERS",
    "PODNET_OTLP_TIMEOUT",
    "PODNET_OTLP_INSECURE",
    "PODNET_OTLP_HISTOGRAM",
    "PODNET_OTLP_TEMPORALITY",
    "NODE_NAME",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_RESOURCE_ATTRIBUTES",
]
# Near-valid values reach the later checks that purely random text never gets past.
PLAUSIBLE = st.sampled_from(
    ["", "0", "1", "5", "-1", "1e3", "nan", "true", "grpc", "http/protobuf", "delta", "lowmemory", "gzip",
     "a=b", "a=%0A", "c:4317", "http://c:4318", "https://[::1]:1/x", "[::1]:0", "0.0.0.0:9436", "info",
     "http1", "turns", "off", "openssl"]
)  # fmt: skip
TEXT = st.one_of(st.text(), PLAUSIBLE, st.from_regex(r"\[?[0-9a-f:.]{0,12}\]?:[0-9]{0,6}", fullmatch=True))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(listen=TEXT, poll_interval=TEXT, env=st.dictionaries(st.sampled_from(ENV_NAMES), TEXT))
def test_resolve_returns_config_or_raises_config_error(
    listen: str, poll_interval: str, env: dict[str, str]
) -> None:
    try:
        _, namespace = parse_args(["run", f"--listen={listen}", f"--poll-interval={poll_interval}"])
        config = resolve(namespace, env)
    except ConfigError as exc:
        assert_one_line(str(exc))
    else:
        assert isinstance(config, Config)
        assert 1 <= config.listen_port <= 65535
        assert 0 < config.poll_interval <= 3600


@pytest.mark.parametrize(
    ("argv", "env", "file", "expected"),
    [
        ((), {}, None, "http"),
        (("--requests", "turns"), {}, None, "turns"),
        (("--requests", "OFF"), {}, None, "off"),
        ((), {"PODNET_REQUESTS": "turns"}, None, "turns"),
        ((), {"PODNET_REQUESTS": "false"}, None, "off"),
        ((), {"PODNET_REQUESTS": "yes"}, None, "http"),
        ((), {}, "requests: false\n", "off"),
        ((), {}, "requests: true\n", "http"),
        ((), {}, "requests: turns\n", "turns"),
        (("--requests", "http"), {"PODNET_REQUESTS": "off"}, None, "http"),
        (("--requests", "HTTP1"), {}, None, "http1"),
        ((), {"PODNET_REQUESTS": " http1 "}, None, "http1"),
        ((), {}, "requests: http1\n", "http1"),
    ],
)
def test_requests_sources(
    write_config: WriteConfig, argv: tuple[str, ...], env: dict[str, str], file: str | None, expected: str
) -> None:
    extra = ("--config", str(write_config(file))) if file else ()
    assert run(*argv, *extra, env=env).requests == expected


@pytest.mark.parametrize("value", ["maybe", "peek", ""])
def test_bad_requests_mode_is_one_line(value: str) -> None:
    message = error_of(env={"PODNET_REQUESTS": value}) if value else error_of("--requests", "2")
    assert_one_line(message)
    assert "PODNET_REQUESTS" in message or "--requests" in message
    assert "must be http, http1, turns or off" in message


@pytest.mark.parametrize(
    ("argv", "env", "file", "expected"),
    [
        ((), {}, None, "off"),
        (("--tls", "openssl"), {}, None, "openssl"),
        (("--tls", " OpenSSL "), {}, None, "openssl"),
        (("--tls", "off"), {}, None, "off"),
        ((), {"PODNET_TLS": "openssl"}, None, "openssl"),
        ((), {"PODNET_TLS": "true"}, None, "openssl"),
        ((), {"PODNET_TLS": "no"}, None, "off"),
        ((), {"PODNET_TLS": ""}, None, "off"),  # empty: unset
        ((), {}, "tls: openssl\n", "openssl"),
        ((), {}, "tls: true\n", "openssl"),
        ((), {}, "tls: false\n", "off"),
        ((), {}, "tls: off\n", "off"),  # YAML 1.1 reads an unquoted off as false
        ((), {}, "tls:\n", "off"),
        (("--tls", "off"), {"PODNET_TLS": "openssl"}, "tls: openssl\n", "off"),
        ((), {"PODNET_TLS": "off"}, "tls: openssl\n", "off"),
        (("--tls", "openssl", "--requests", "http1"), {}, None, "openssl"),
        ((), {"PODNET_TLS": "openssl", "PODNET_REQUESTS": "http"}, None, "openssl"),
    ],
)
def test_tls_sources(
    write_config: WriteConfig, argv: tuple[str, ...], env: dict[str, str], file: str | None, expected: str
) -> None:
    extra = ("--config", str(write_config(file))) if file else ()
    assert run(*argv, *extra, env=env).tls == expected


@pytest.mark.parametrize(
    ("argv", "env", "file", "names"),
    [
        (("--tls", "openssl", "--requests", "turns"), {}, None, ("--requests is 'turns'", "--tls is")),
        (("--tls", "openssl", "--requests", "off"), {}, None, ("--requests is 'off'",)),
        (("--tls", "openssl"), {"PODNET_REQUESTS": "false"}, None, ("PODNET_REQUESTS is 'off'",)),
        ((), {"PODNET_TLS": "true", "PODNET_REQUESTS": "turns"}, None, ("PODNET_TLS is 'openssl'",)),
        ((), {}, "tls: openssl\nrequests: turns\n", ("key requests is 'turns'", "key tls is 'openssl'")),
        (("--requests", "off"), {}, "tls: true\n", ("--requests is 'off'", "key tls is 'openssl'")),
    ],
)
def test_tls_needs_http_requests(
    write_config: WriteConfig,
    argv: tuple[str, ...],
    env: dict[str, str],
    file: str | None,
    names: tuple[str, ...],
) -> None:
    extra = ("--config", str(write_config(file))) if file else ()
    message = error_of(*argv, *extra, env=env)
    assert message.startswith("--tls openssl needs --requests http or http1"), message
    assert message.endswith("set requests to http, or tls to off"), message
    for name in names:
        assert name in message, (name, message)


def test_doctor_takes_tls() -> None:
    _, namespace = parse_args(["doctor", "--tls", "openssl"])
    assert resolve(namespace, {}).tls == "openssl"
    _, namespace = parse_args(["doctor"])
    assert resolve(namespace, {"PODNET_TLS": "openssl"}).tls == "openssl"
    assert resolve(namespace, {}).tls == "off"


@pytest.mark.parametrize(
    ("tls", "uprobes", "ptrace", "ok", "says"),
    [
        ("off", True, False, True, "--tls off: TLS connections count as turns; uprobes available"),
        ("off", False, False, True, "no uprobes in this kernel"),
        ("openssl", True, True, True, "CAP_SYS_PTRACE present"),
        ("openssl", True, False, False, "no CAP_SYS_PTRACE"),
        ("openssl", False, True, False, "this kernel has no uprobes"),
    ],
)
def test_doctor_tls_check(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tls: str,
    uprobes: bool,
    ptrace: bool,
    ok: bool,
    says: str,
) -> None:
    from exporter.app import doctor

    pmu = tmp_path / "uprobe"
    if uprobes:
        pmu.mkdir()
    monkeypatch.setattr(doctor, "UPROBE_PATHS", (str(pmu), str(tmp_path / "uprobe_events")))
    monkeypatch.setattr(doctor, "_caps", lambda: (1 << doctor.CAP_SYS_PTRACE) if ptrace else 0)
    check = doctor.check_tls(tls)
    assert (check.name, check.ok, check.required) == ("TLS", ok, False)
    assert says in check.detail
    assert bool(check.fix) == (not ok)


SECRET = "s3cr3tTOKEN"


@pytest.mark.parametrize(
    ("env", "argv"),
    [
        (
            {"PODNET_OTLP_HEADERS": f"authorization=Bearer%20{SECRET},oops"},
            ["--otlp-endpoint", "http://c:4318"],
        ),
        (
            {"OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer {SECRET},oops"},
            ["--otlp-endpoint", "http://c:4318"],
        ),
        ({}, ["--otlp-endpoint", "http://c:4318", "--otlp-headers", f"authorization:Bearer {SECRET}=x"]),
        ({}, ["--otlp-endpoint", "http://c:4318", "--otlp-headers", f"k={SECRET}\x01"]),
        ({}, ["--otlp-endpoint", f"http://user:{SECRET}@collector:bad"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": f"ftp://u:{SECRET}@collector:4318"}, []),
    ],
)
def test_secrets_are_never_in_errors(env: dict[str, str], argv: list[str]) -> None:
    message = error_of(*argv, env=env)
    assert message and SECRET not in message, message
