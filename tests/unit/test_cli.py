"""Tests for exporter.app.cli, run as `python -m exporter` in a subprocess: every bad input ends
as exactly one `podnet-exporter: error:` line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import __version__
from exporter.app.config import build_parser

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "podnet-exporter: error:"


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any podnet or OTLP settings of its own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PODNET_", "OTEL_")) and k not in ("NODE_NAME", "PYTHONSTARTUP")
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        cwd=ROOT,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(PREFIX), line
    for name in names:
        assert name in line, (name, line)
    return line


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    out = {
        "malformed_yaml": d / "malformed.yaml",
        "unknown_key": d / "unknown.yaml",
        "list_top": d / "list.yaml",
        "pod_not_list": d / "pod.json",
        "not_json": d / "garbage.json",
    }
    out["malformed_yaml"].write_text("listen: [0.0.0.0:9436\npoll_interval: 5\n")
    out["unknown_key"].write_text("poll_intervall: 5\n")
    out["list_top"].write_text("- listen: 0.0.0.0:9436\n- poll_interval: 5\n")
    # A single Pod, not a PodList: exists and is readable, so only the pods module rejects it.
    out["pod_not_list"].write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "web",
                    "namespace": "shop",
                    "uid": "5f1d3c1e-8a2b-4c3d-9e4f-0123456789ab",
                },
            }
        )
    )
    out["not_json"].write_text("apiVersion: v1\nkind: List\n")
    return out


BAD_ARGS: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("listen nonsense", ["run", "--listen", "nonsense:port"], ("--listen", "nonsense:port", "port")),
    ("listen empty host port 0", ["run", "--listen", ":0"], ("--listen",)),
    ("listen port 0", ["run", "--listen", "0.0.0.0:0"], ("--listen", "1-65535")),
    ("listen v6 without brackets", ["run", "--listen", "::1:9436"], ("--listen", "brackets")),
    ("negative poll interval", ["run", "--poll-interval", "-1"], ("--poll-interval",)),
    ("non-numeric poll interval", ["run", "--poll-interval", "abc"], ("--poll-interval", "abc")),
    ("zero poll interval", ["run", "--poll-interval", "0"], ("--poll-interval",)),
    ("missing pods file", ["run", "--pods-file", "/nonexistent"], ("--pods-file", "/nonexistent")),
    ("relative pin dir", ["run", "--pin-dir", "bpf/podnet"], ("--pin-dir", "absolute", "none")),
    ("empty state dir", ["run", "--state-dir", " "], ("--state-dir", "/run/podnet")),
    ("histogram scale", ["run", "--histogram-scale", "3"], ("--histogram-scale",)),
    ("map entries", ["run", "--map-entries", "10"], ("--map-entries",)),
    ("log level", ["run", "--log-level", "loud"], ("--log-level",)),
    ("missing config file", ["run", "--config", "/nonexistent.yaml"], ("--config", "/nonexistent.yaml")),
    ("unknown flag", ["run", "--frobnicate"], ("--frobnicate",)),
    ("flag without value", ["run", "--listen"], ("--listen",)),
    ("unknown subcommand", ["frobnicate"], ("frobnicate",)),
    ("no subcommand", [], ("command",)),
    ("option before the command", ["--listen", "0.0.0.0:9436"], ("--listen", "run")),
]


@pytest.mark.parametrize(("args", "names"), [(a, n) for _, a, n in BAD_ARGS], ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments(args: list[str], names: tuple[str, ...]) -> None:
    assert_one_error_line(cli(*args), *names)


def test_readme_example_message() -> None:
    line = assert_one_error_line(cli("run", "--listen", "nonsense:port"))
    assert line == (
        "podnet-exporter: error: --listen 'nonsense:port': port must be a number 1-65535 "
        "(example: --listen 0.0.0.0:9436)"
    )


@pytest.mark.parametrize(
    ("which", "names"),
    [
        ("malformed_yaml", ("config file", "malformed.yaml", "YAML")),
        ("unknown_key", ("config file", "unknown.yaml", "poll_intervall", "poll_interval")),
        ("list_top", ("config file", "list.yaml", "mapping")),
    ],
)
def test_bad_config_file(files: dict[str, Path], which: str, names: tuple[str, ...]) -> None:
    assert_one_error_line(cli("run", "--config", str(files[which])), *names)


def test_bad_config_file_from_environment(files: dict[str, Path]) -> None:
    proc = cli("run", env=clean_env(PODNET_CONFIG=str(files["unknown_key"])))
    assert_one_error_line(proc, "unknown.yaml", "poll_intervall")


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("PODNET_POLL_INTERVAL", "-5"),
        ("PODNET_LISTEN", "nonsense"),
        ("PODNET_HISTOGRAM_SCALE", "7"),
        ("PODNET_REQUESTS", "http3"),
        ("PODNET_TLS", "gnutls"),
    ],
)
def test_bad_environment(var: str, value: str) -> None:
    assert_one_error_line(cli("run", env=clean_env(**{var: value})), var)


def test_flag_wins_over_bad_environment_but_bad_flag_is_named() -> None:
    proc = cli("run", "--poll-interval", "-2", env=clean_env(PODNET_POLL_INTERVAL="5"))
    line = assert_one_error_line(proc, "--poll-interval")
    assert "PODNET_POLL_INTERVAL" not in line


@pytest.mark.parametrize("which", ["pod_not_list", "not_json"])
def test_pods_file_that_is_not_a_pod_list_fails_at_startup(files: dict[str, Path], which: str) -> None:
    # The file exists, so configuration accepts it; the pods module rejects it at start-up,
    # before cgroups, BTF or any BPF program is touched.
    path = str(files[which])
    proc = cli("run", "--pods-file", path, "--log-level", "error")
    line = assert_one_error_line(proc, "pods file", path, "kubectl get pods -o json")
    assert proc.returncode == 1
    assert "BPF" not in line and "btf" not in line.lower()


def test_pods_file_error_with_default_log_level(files: dict[str, Path]) -> None:
    path = str(files["pod_not_list"])
    proc = cli("run", "--pods-file", path)
    assert_one_error_line(proc, "pods file", path, "'List' or 'PodList'")


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (("--tls", "openssl", "--requests", "turns"), {}, ("--tls openssl needs", "--requests is 'turns'")),
        ((), {"PODNET_TLS": "openssl", "PODNET_REQUESTS": "off"}, ("PODNET_REQUESTS is 'off'", "PODNET_TLS")),
    ],
)
def test_tls_without_http_requests_is_one_line(
    args: tuple[str, ...], env: dict[str, str], names: tuple[str, ...]
) -> None:
    proc = cli("run", *args, env=clean_env(**env))
    line = assert_one_error_line(proc, *names)
    assert line.endswith("set requests to http, or tls to off")
    assert proc.returncode == 2


def test_config_errors_exit_2() -> None:
    assert cli("run", "--listen", "nonsense:port").returncode == 2
    assert cli().returncode == 2


def test_version() -> None:
    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"podnet-exporter {__version__}"
    assert "Traceback" not in proc.stderr


def _run_flags() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    run = sub.choices["run"]  # type: ignore[index]
    return sorted(opt for action in run._actions for opt in action.option_strings if opt.startswith("--"))


README_FLAGS = [
    "--listen",
    "--poll-interval",
    "--pods-file",
    "--node-name",
    "--config",
    "--cgroup-root",
    "--kernel-headers",
    "--log-level",
    "--map-entries",
    "--histogram-scale",
    "--requests",
    "--tls",
    "--cluster-name",
    "--otlp-endpoint",
    "--otlp-protocol",
]


def test_run_help_lists_every_flag() -> None:
    proc = cli("run", "--help")
    assert proc.returncode == 0
    assert proc.stderr == ""
    flags = _run_flags()
    assert set(README_FLAGS) <= set(flags)
    for flag in flags:
        assert flag in proc.stdout, flag
    # Every setting flag names its environment variable.
    for flag in README_FLAGS:
        env = "PODNET_" + flag[2:].replace("-", "_").upper()
        assert env in proc.stdout, env


def test_top_level_help_lists_commands() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("run", "doctor", "bpf-source"):
        assert command in proc.stdout


@pytest.mark.skipif(not Path("/sys/kernel/btf/vmlinux").exists(), reason="needs the kernel's BTF")
def test_bpf_source_prints_offsets_flags_and_every_source() -> None:
    result = cli("bpf-source")
    assert result.returncode == 0, result.stderr
    assert "#define PODNET_OFF_SK_CGROUP " in result.stdout
    assert "// cflags: " in result.stdout
    for name in ("tcp_traffic.bpf.c", "tcp_state.bpf.c", "tcp_events.bpf.c", "podnet.h", "requests.h"):
        assert f"/{name} =====" in result.stdout


@pytest.mark.skipif(not Path("/sys/kernel/btf/vmlinux").exists(), reason="needs the kernel's BTF")
def test_bpf_source_into_a_closed_pipe_is_quiet() -> None:
    proc = subprocess.run(
        f"{sys.executable} -m exporter bpf-source | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith("// resolved kernel struct offsets")


@pytest.mark.parametrize(
    ("content", "names"),
    [
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
            ("cert_file", "missing.crt"),
        ),
        ("basic_auth_users:\n  prom: not-a-bcrypt-hash-s3cr3t\n", ("basic_auth_users", "prom")),
        ("tls_server_confg: {}\n", ("tls_server_confg",)),
    ],
)
def test_bad_web_config_fails_at_startup_in_one_line(
    tmp_path: Path, content: str, names: tuple[str, ...]
) -> None:
    # Checked before cgroups, BTF or any BPF program is touched; the hash is never shown.
    web = tmp_path / "web-config.yml"
    web.write_text(content)
    for flag in ("--web.config.file", "--web-config-file"):
        proc = cli("run", flag, str(web), "--pin-dir", "none", "--log-level", "error")
        line = assert_one_error_line(proc, str(web), *names)
        assert proc.returncode == 1
        assert "s3cr3t" not in line


def test_node_exporter_flag_spellings_are_accepted() -> None:
    # Users moving from node_exporter keep their flags: --web.listen-address, --web.config.file.
    ns = build_parser().parse_args(
        ["run", "--web.listen-address", "127.0.0.1:9999", "--web.max-requests", "3"]
    )
    assert ns.listen == "127.0.0.1:9999"
    assert ns.web_max_requests == "3"
