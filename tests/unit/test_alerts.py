"""The chart's PrometheusRule (prometheusRule.enabled): its alerts are checked by the real promtool
(`check rules`, then `test rules` with a unit test per alert: a bad state fires it with the expected
labels and annotations, a healthy state fires nothing), and evaluated by a real Prometheus server that
scrapes the exporter's self-metrics rendered by the exporter's own code (build_snapshot and
Exposition.render) in a bad and a healthy state, plus a target on a closed port.

The metric and label names in the rules are checked against exporter/metrics/model.py, so a renamed
self-metric fails here rather than leaving an alert that never fires."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from aiohttp import web

from exporter.export.prometheus import TEXT_CONTENT_TYPE, Exposition
from exporter.kernel.bpf_structs import MAP_IDS
from exporter.kernel.programs import PROGRAMS
from exporter.metrics import model
from exporter.metrics.raw import RawData
from exporter.metrics.snapshot import ExporterState, build_snapshot
from exporter.pods.metadata import MetadataSourceState
from exporter.pods.pods import PodMeta

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from background_app import BackgroundApp  # lives in tests/: an aiohttp server on a thread
from prometheus_server import Prometheus  # lives in tests/: a real Prometheus for tests

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "podnet-exporter"
RELEASE, NAMESPACE = "podnet", "podnet"
FULLNAME = "podnet-podnet-exporter"
# The job label a ServiceMonitor gives its targets (the Service name), and the release namespace.
TARGET = {"job": FULLNAME, "namespace": NAMESPACE}
SELECTOR = f'job="{FULLNAME}",namespace="{NAMESPACE}"'
ALERTS = (
    "PodnetExporterDown",
    "PodnetExporterAbsent",
    "PodnetPollsStale",
    "PodnetMapUpdateFailures",
    "PodnetSeriesDropped",
    "PodnetMetadataSourceDown",
    "PodnetOTLPExportFailing",
    "PodnetExporterErrors",
    "PodnetProgramNotAttached",
)
# Real label values, from the exporter's code.
MAP = MAP_IDS["tcp_traffic"][0]
PROGRAM = PROGRAMS[0].hooks[0].label
TIMEOUT = 120.0


def render_rules(values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """spec of the PrometheusRule rendered with a ServiceMonitor and `values`."""
    base: dict[str, Any] = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render({**base, **(values or {})}, name=RELEASE, namespace=NAMESPACE)
    (rule,) = [
        d
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d and d.get("kind") == "PrometheusRule"
    ]
    spec: dict[str, Any] = rule["spec"]
    return spec


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return render_rules()


@pytest.fixture(scope="module")
def alerts(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in spec["groups"] for r in g["rules"] if "alert" in r}


@pytest.fixture(scope="module")
def rules_file(spec: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file, as the operator writes it."""
    path = tmp_path_factory.mktemp("rules") / "podnet.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": spec["groups"]}, sort_keys=False))
    return path


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (Debian package prometheus; make setup-test)")
    return binary


# ---- the rules use the exporter's real metric and label names --------------------------------------------


TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
"""Labels Prometheus attaches to a ServiceMonitor's targets (podnet's self-metrics have no such labels)."""


def test_alerts_are_all_there(alerts: dict[str, dict[str, Any]]) -> None:
    assert tuple(alerts) == ALERTS


def test_rules_use_real_self_metrics(alerts: dict[str, dict[str, Any]]) -> None:
    exposed = {spec.exposed_name: spec for spec in model.SELF_FAMILIES}
    for name, alert in alerts.items():
        expr = alert["expr"]
        used = set(re.findall(r"\b(podnet_\w+)", expr))
        labels = set(TARGET_LABELS)
        for metric in used:
            assert metric in exposed, f"{name}: {metric} is not a podnet self-metric in model.py"
            labels |= set(exposed[metric].labels)
        if "up{" not in expr:
            assert used, name
        # Label matchers in the expression, and labels the annotations print, exist on those series.
        matched = set(re.findall(r"(\w+)=~?\"", expr)) | set(re.findall(r"ignoring\((\w+)\)", expr))
        assert matched <= labels, (name, matched - labels)
        for text in alert["annotations"].values():
            printed = set(re.findall(r"\$labels\.(\w+)", text))
            assert printed <= labels, (name, printed - labels)
        assert SELECTOR in expr, name


def test_promtool_check_rules(rules_file: Path) -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout, done.stdout


# ---- promtool test rules: each alert fires in its bad state, none in a healthy one -------------------------


INSTANCE = "10.0.0.1:9436"
POD_LABELS = {**TARGET, "instance": INSTANCE, "pod": "podnet-podnet-exporter-x7k2p", "container": "exporter"}


def series(name: str, **labels: str) -> str:
    all_labels = {**POD_LABELS, **labels}
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(all_labels.items())) + "}"


# Series of a healthy exporter, 1m apart for 60m (promtool's `a+bxN`: N+1 samples from a). No
# podnet_exporter_errors_total: the exporter creates a stage's counter at its first error.
HEALTHY: dict[str, str] = {
    series("up"): "1x60",
    series("podnet_exporter_last_poll_timestamp_seconds"): "0+60x60",  # = time(): polls are fresh
    series("podnet_exporter_map_update_failures_total", map=MAP): "0x60",
    series("podnet_exporter_series_dropped_total", metric="podnet_flow_bytes_total"): "0x60",
    series("podnet_exporter_metadata_source_up", source="kubernetes"): "1x60",
    series("podnet_exporter_otlp_exports_total", result="ok"): "0+1x60",
    series("podnet_exporter_otlp_exports_total", result="failed"): "0x60",
    series("podnet_exporter_program_attached", program=PROGRAM): "1x60",
}


@dataclass
class Case:
    alert: str
    bad: dict[str, str | None]
    """Series replacing HEALTHY's (None: removed)."""
    eval_time: str
    labels: dict[str, str] = field(default_factory=dict)
    """The firing alert's labels besides alertname and severity."""
    value: str = ""
    """What {{ $value | humanizeDuration }} prints, where an annotation uses it."""


CASES = [
    Case("PodnetExporterDown", {series("up"): "0x60"}, "10m", POD_LABELS),
    Case(
        "PodnetExporterAbsent",
        {series("up"): None, series("up", job="other"): "1x60"},
        "15m",
        TARGET,
    ),
    Case(
        "PodnetPollsStale",
        {series("podnet_exporter_last_poll_timestamp_seconds"): "0x60"},  # frozen at 0 while time() runs
        "10m",
        POD_LABELS,
        value="10m 0s",
    ),
    Case(
        "PodnetMapUpdateFailures",
        {series("podnet_exporter_map_update_failures_total", map=MAP): "0+7x60"},
        "25m",
        {**POD_LABELS, "map": MAP},
    ),
    Case(
        "PodnetSeriesDropped",
        {series("podnet_exporter_series_dropped_total", metric="podnet_flow_bytes_total"): "0+40x60"},
        "25m",
        {**POD_LABELS, "metric": "podnet_flow_bytes_total"},
    ),
    Case(
        "PodnetMetadataSourceDown",
        {series("podnet_exporter_metadata_source_up", source="kubernetes"): "1x4 0x55"},
        "20m",
        {**POD_LABELS, "source": "kubernetes"},
    ),
    Case(
        "PodnetOTLPExportFailing",
        {
            series("podnet_exporter_otlp_exports_total", result="ok"): "5x60",
            series("podnet_exporter_otlp_exports_total", result="failed"): "0+1x60",
        },
        "25m",
        {**POD_LABELS, "result": "failed"},
    ),
    Case(
        "PodnetExporterErrors",
        {series("podnet_exporter_errors_total", stage="checkpoint"): "2+1x60"},
        "20m",
        {**POD_LABELS, "stage": "checkpoint"},
    ),
    Case(
        "PodnetProgramNotAttached",
        {series("podnet_exporter_program_attached", program=PROGRAM): "0x60"},
        "15m",
        {**POD_LABELS, "program": PROGRAM},
    ),
]


def expand(text: str, labels: Mapping[str, str], value: str) -> str:
    """The annotation as Prometheus expands it (the templates use only $labels.x and $value)."""
    text = re.sub(r"\{\{ \$value \| humanizeDuration \}\}", value, text)
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), "<no value>"), text)
    assert "{{" not in text, text
    return text


def unit_test(
    rules_file: Path,
    alerts: dict[str, dict[str, Any]],
    input_series: Mapping[str, str | None],
    eval_time: str,
    firing: Case | None,
) -> dict[str, Any]:
    """A promtool test group: at eval_time only `firing`'s alert fires (or none)."""
    tests = []
    for name, alert in alerts.items():
        expected = []
        if firing is not None and name == firing.alert:
            labels = {**firing.labels, "severity": alert["labels"]["severity"]}
            annotations = {k: expand(v, labels, firing.value) for k, v in alert["annotations"].items()}
            expected.append({"exp_labels": labels, "exp_annotations": annotations})
        tests.append({"eval_time": eval_time, "alertname": name, "exp_alerts": expected})
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in input_series.items() if v is not None],
        "alert_rule_test": tests,
    }


def run_promtool_tests(rules_file: Path, groups: list[dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "podnet.tests.yaml"
    path.write_text(
        yaml.safe_dump(
            {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": groups}, sort_keys=False
        )
    )
    done = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


@pytest.mark.parametrize("case", CASES, ids=[c.alert for c in CASES])
def test_each_alert_fires_in_its_bad_state(
    case: Case, rules_file: Path, alerts: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Only the alert of the case fires, after its `for`, with the series' labels, and its
    annotations expand without holes."""
    duration = int(alerts[case.alert]["for"].removesuffix("m"))
    assert int(case.eval_time.removesuffix("m")) > duration
    group = unit_test(rules_file, alerts, {**HEALTHY, **case.bad}, case.eval_time, case)
    run_promtool_tests(rules_file, [group], tmp_path)


def test_nothing_fires_when_healthy(
    rules_file: Path, alerts: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    groups = [unit_test(rules_file, alerts, HEALTHY, t, None) for t in ("5m", "20m", "60m")]
    # Partial OTLP failures (some pushes still arrive) are not "failing".
    partial = {**HEALTHY, series("podnet_exporter_otlp_exports_total", result="failed"): "0+1x60"}
    groups.append(unit_test(rules_file, alerts, partial, "30m", None))
    # Errors long past, none new.
    old_errors = {**HEALTHY, series("podnet_exporter_errors_total", stage="checkpoint"): "2x60"}
    groups += [unit_test(rules_file, alerts, old_errors, t, None) for t in ("30m", "60m")]
    run_promtool_tests(rules_file, groups, tmp_path)


def test_a_first_error_fires_too(rules_file: Path, alerts: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """The exporter creates a stage's error counter at its first error, at 1: increase() sees no
    change, so the rule also fires for a counter that was not there 15 minutes before, and stops
    once it has been there that long without growing."""
    appears = {**HEALTHY, series("podnet_exporter_errors_total", stage="map_delete"): "_x10 1x50"}
    case = Case("PodnetExporterErrors", {}, "20m", {**POD_LABELS, "stage": "map_delete"})
    groups = [
        unit_test(rules_file, alerts, appears, "20m", case),
        unit_test(rules_file, alerts, appears, "40m", None),
    ]
    run_promtool_tests(rules_file, groups, tmp_path)


# ---- a real Prometheus evaluates the rules against the exporter's own exposition ---------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeExporter:
    """Self-metrics of one exporter, rendered by the exporter's code for every scrape: `bad` is
    an exporter whose every health signal is wrong, and whose counters grow with each scrape."""

    PODS = tuple(
        PodMeta(f"uid-{i}", "shop", f"web-{i}", "node-a", "web", "Deployment", (f"10.1.0.{i}",), False, ())
        for i in range(3)
    )

    def __init__(self, bad: bool) -> None:
        self.bad = bad
        self.scrapes = 0
        self.exposition = Exposition(model.BucketLayout())
        self.previous: model.Snapshot | None = None

    def render(self) -> bytes:
        self.scrapes += 1
        n = self.scrapes
        now = time.time()
        raw = RawData()
        raw.map_failures = {m: (5 * n if self.bad and m == MAP else 0) for m in MAP_IDS["tcp_traffic"]}
        state = ExporterState(
            build=("0.1.0", "3.11", "0.29", "6.1.0", "tp_btf"),
            polls=n,
            errors={"checkpoint": n} if self.bad else {},
            programs={h.label: not (self.bad and h.label == PROGRAM) for p in PROGRAMS for h in p.hooks},
            pods=len(self.PODS),
            otlp=(0, n, 0.0) if self.bad else (n, 0, now),
            metadata=(MetadataSourceState("kubernetes", not self.bad, 0.0 if self.bad else now, 1, n),),
        )
        snap = build_snapshot(
            raw,
            {},
            state,
            now - 3600 if self.bad else now,  # the bad exporter's last poll: an hour ago
            pods=self.PODS,
            max_series=1 if self.bad else None,  # the bad one drops 2 podnet_pod_info series per poll
            previous=self.previous,
        )
        self.previous = snap
        return self.exposition.render(snap).text

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(body=self.render(), headers={"Content-Type": TEXT_CONTENT_TYPE})


def test_fake_exporter_speaks_the_rules_language(alerts: dict[str, dict[str, Any]]) -> None:
    """Every self-metric the rules read is in the rendered exposition of the bad exporter."""
    fake = FakeExporter(bad=True)
    fake.render()
    text = fake.render().decode()
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    for name, alert in alerts.items():
        for metric in re.findall(r"\b(podnet_\w+)", alert["expr"]):
            assert metric in exposed, (name, metric)
    assert 'podnet_exporter_series_dropped_total{metric="podnet_pod_info"} 4.0' in text


@pytest.fixture
def servers() -> Iterator[tuple[BackgroundApp, BackgroundApp]]:
    apps: list[BackgroundApp] = []
    try:
        for bad in (True, False):
            fake = FakeExporter(bad)
            app = web.Application()
            app.router.add_get("/metrics", fake.handle)
            server = BackgroundApp(f"fake-exporter-{'bad' if bad else 'good'}", free_port())
            apps.append(server)
            server.call(server.serve(app))
        yield apps[0], apps[1]
    finally:
        for server in apps:
            server.close()


def test_real_prometheus_evaluates_every_alert(
    servers: tuple[BackgroundApp, BackgroundApp],
    alerts: dict[str, dict[str, Any]],
    rules_file: Path,
    tmp_path: Path,
) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package prometheus; make setup-test)")
    bad, good = (f"127.0.0.1:{s.port}" for s in servers)
    closed = f"127.0.0.1:{free_port()}"  # nothing listens: up == 0
    scrape = {
        "job_name": FULLNAME,
        "honor_labels": True,
        "static_configs": [{"targets": [bad, good, closed], "labels": {"namespace": NAMESPACE}}],
    }
    prom = Prometheus(tmp_path, [scrape], [str(rules_file)])
    try:
        prom.wait_ready()
        deadline = time.monotonic() + TIMEOUT
        states: dict[str, tuple[str, str]] = {}
        while time.monotonic() < deadline:
            groups = prom.get("/api/v1/rules")["groups"]
            states = {r["name"]: (r["health"], r["state"]) for g in groups for r in g["rules"]}
            active = {n for n, (_, s) in states.items() if s in ("pending", "firing")}
            if all(h == "ok" for h, _ in states.values()) and active == set(ALERTS) - {
                "PodnetExporterAbsent"
            }:
                break
            time.sleep(0.5)
        assert set(states) == set(ALERTS), states
        errors = {n: h for n, (h, _) in states.items() if h != "ok"}
        assert not errors, (errors, [r.get("lastError") for g in groups for r in g["rules"]], prom.log())
        inactive = {n: s for n, (_, s) in states.items() if s not in ("pending", "firing")}
        assert inactive == {"PodnetExporterAbsent": "inactive"}, inactive

        # Each expression selects exactly the broken target: the healthy exporter raises nothing.
        expected = {name: bad for name in ALERTS} | {"PodnetExporterDown": closed}
        del expected["PodnetExporterAbsent"]
        for name, instance in expected.items():
            result = prom.query(alerts[name]["expr"])
            assert {s["metric"]["instance"] for s in result} == {instance}, (name, result)
            for sample in result:
                assert sample["metric"]["job"] == FULLNAME and sample["metric"]["namespace"] == NAMESPACE
        by_label = {
            "PodnetMapUpdateFailures": ("map", MAP),
            "PodnetSeriesDropped": ("metric", "podnet_pod_info"),
            "PodnetMetadataSourceDown": ("source", "kubernetes"),
            "PodnetExporterErrors": ("stage", "checkpoint"),
            "PodnetProgramNotAttached": ("program", PROGRAM),
        }
        for name, (label, value) in by_label.items():
            assert {s["metric"][label] for s in prom.query(alerts[name]["expr"])} == {value}, name

        # Absent: these targets exist, so nothing; with a selector matching no target, one series
        # carrying the selector's labels.
        assert prom.query(alerts["PodnetExporterAbsent"]["expr"]) == []
        other = render_rules(
            {"prometheusRule": {"enabled": True, "selector": 'job="gone",namespace="podnet"'}}
        )
        (absent,) = [
            r for g in other["groups"] for r in g["rules"] if r.get("alert") == "PodnetExporterAbsent"
        ]
        (gone,) = prom.query(absent["expr"])
        assert gone["metric"] == {"job": "gone", "namespace": "podnet"}
    finally:
        prom.stop()
