"""The Grafana dashboards in dashboards/: JSON structure, variables, and every query checked by the real
PromQL parser (`promtool check rules`). tests/kernel/test_prometheus_e2e.py runs the same queries against
a Prometheus scraping the real exporter."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.metrics import model

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "dashboards"
CHART_DASHBOARD_DIR = REPO / "helm" / "podnet-exporter" / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own variables (and data link macros) that need no definition in the dashboard.
BUILTIN_VARIABLES = re.compile(r"__\w*")
VARIABLE_REF = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\{([^{}]*)\}")
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>[a-zA-Z_]\w*)\)$")
# What Grafana puts in for its interval and range macros, and a sample per dashboard variable.
MACROS = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}
SAMPLES: list[dict[str, str]] = [
    {"cluster": ".*", "namespace": ".+", "workload": "web", "pod": ".*"},
    {"cluster": "(eu-1|us-2)", "namespace": "(shop|data)", "workload": "web", "pod": "(web-0|web-1)"},
]


def known_series() -> set[str]:
    """Every series name the exporter exposes (counters with _total, histogram _bucket/_sum/_count)."""
    names: set[str] = set()
    for spec in model.ALL_FAMILIES:
        if spec.kind is model.Kind.HISTOGRAM:
            names |= {spec.name + "_bucket", spec.name + "_sum", spec.name + "_count"}
        else:
            names.add(spec.exposed_name)
    return names


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def variable_query(var: dict[str, Any]) -> str:
    query = var["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def substitute(expr: str, values: dict[str, str]) -> str:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return values[name]

    return VARIABLE_REF.sub(one, expr)


@pytest.fixture(params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_both_dashboards_exist() -> None:
    assert [p.name for p in DASHBOARDS] == ["podnet-overview.json", "podnet-workload.json"]


def test_chart_copies_are_byte_identical() -> None:
    """dashboards/ is the one source; the chart ships copies because a chart must be self-contained
    (helm package, Argo CD and Flux read only the chart directory)."""
    copies = sorted(p.name for p in CHART_DASHBOARD_DIR.glob("*.json"))
    assert copies == [p.name for p in DASHBOARDS], "cp dashboards/*.json helm/podnet-exporter/dashboards/"
    for source in DASHBOARDS:
        copy = CHART_DASHBOARD_DIR / source.name
        assert not copy.is_symlink()
        assert copy.read_bytes() == source.read_bytes(), (
            f"{copy} differs from {source}: cp dashboards/*.json helm/podnet-exporter/dashboards/"
        )


def test_top_level_fields(dashboard: dict[str, Any]) -> None:
    assert "__inputs" not in dashboard and "__requires" not in dashboard
    assert dashboard["id"] is None
    assert re.fullmatch(r"podnet-[a-z]+", dashboard["uid"])
    assert dashboard["title"].startswith("podnet / ")
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "podnet" in dashboard["tags"]  # the dashboards link to each other by this tag
    assert dashboard["annotations"]["list"] == []
    # Grafana's ConfigMap size limit is 1 MiB; kubectl apply's annotation limit 256 KiB.
    assert len(json.dumps(dashboard)) < 200_000


def test_uids_are_unique() -> None:
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


def test_panel_ids_unique_and_grid_sane(dashboard: dict[str, Any]) -> None:
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        g = p["gridPos"]
        assert set(g) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in g.values()), p["title"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            assert g == {"h": 1, "w": 24, "x": 0, "y": g["y"]}
        else:
            assert p.get("title") and p.get("description"), f"panel {p['id']} needs a title and a description"

    def overlaps(group: list[dict[str, Any]]) -> list[tuple[str, str]]:
        cells: dict[tuple[int, int], str] = {}
        clashes = []
        for p in group:
            g = p["gridPos"]
            for y in range(g["y"], g["y"] + g["h"]):
                for x in range(g["x"], g["x"] + g["w"]):
                    if (x, y) in cells:
                        clashes.append((cells[(x, y)], p["title"]))
                    cells[(x, y)] = p["title"]
        return clashes

    assert overlaps(dashboard["panels"]) == []
    for row in dashboard["panels"]:
        if row["type"] == "row":
            assert row["collapsed"] == bool(row["panels"]), "only collapsed rows hold their panels"
            assert overlaps(row["panels"]) == []


def test_datasource_refs_use_the_variable(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == DATASOURCE_REF, panel["title"]
            assert t["expr"].strip(), panel["title"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE_REF, var["name"]
    # No hard-coded datasource anywhere (an uid other than the variable would break on import).
    text = json.dumps(dashboard)
    assert set(re.findall(r'"uid": "([^"]*)"', text)) <= {"${datasource}", dashboard["uid"]}


def test_variables(dashboard: dict[str, Any]) -> None:
    vs = variables(dashboard)
    want = ["datasource", "cluster", "namespace"]
    if dashboard["uid"] == "podnet-workload":
        want += ["workload", "pod"]
    assert list(vs) == want
    ds = vs["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    cluster = vs["cluster"]
    # Works without a cluster label: "All" is the regex .* which also matches a missing label.
    assert variable_query(cluster) == "label_values(podnet_exporter_build_info, cluster)"
    assert cluster["includeAll"] is True and cluster["allValue"] == ".*"
    assert cluster["current"]["value"] in ("$__all", ["$__all"])
    # Chained: each variable's query is filtered by the ones before it.
    chain = [n for n in want if n != "datasource"]
    for i, name in enumerate(chain[1:], start=1):
        query = variable_query(vs[name])
        m = LABEL_VALUES.match(query)
        assert m and m.group("label") == name, query
        for earlier in chain[:i]:
            assert f'{earlier}=~"${earlier}"' in query, (name, earlier)
        assert "podnet_" in query
    for var in vs.values():
        if var.get("includeAll"):
            assert var["allValue"] in (".*", ".+"), var["name"]


def _referenced(text: str) -> set[str]:
    return {a or b or c for a, b, c in VARIABLE_REF.findall(text)}


def test_every_referenced_variable_exists_and_every_variable_is_used(dashboard: dict[str, Any]) -> None:
    defined = set(variables(dashboard))
    text = json.dumps({k: v for k, v in dashboard.items() if k != "templating"})
    used = _referenced(text)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            used |= _referenced(variable_query(var))
    used = {u for u in used if not BUILTIN_VARIABLES.fullmatch(u)}
    assert used <= defined, f"undefined variables: {used - defined}"
    assert defined <= used, f"unused variables: {defined - used}"


def test_every_query_reads_podnet_metrics_with_the_cluster_filter(dashboard: dict[str, Any]) -> None:
    known = known_series()
    for panel, target in targets(dashboard):
        expr = target["expr"]
        selectors = SELECTOR.findall(expr)
        assert selectors, (panel["title"], expr)
        for name, matchers in selectors:
            assert 'cluster=~"$cluster"' in matchers, (panel["title"], expr)
            # No {__name__=~"a|b"}: rate() drops the metric name, the series of a and b with the same
            # labels then collide and Prometheus refuses the query (found by test_prometheus_e2e.py).
            assert name in known, f"{panel['title']}: unknown or missing metric name in {expr}"
        # Nothing else: every identifier followed by { or [ is a podnet series.
        bare = re.findall(r"\b([a-z_]+)\s*\[", expr)
        assert bare == [], (panel["title"], bare)


def test_dashboards_cover_every_metric() -> None:
    exprs = " ".join(t["expr"] for path in DASHBOARDS for _, t in targets(load(path)))
    used = {name for name in known_series() if re.search(rf"\b{name}\b", exprs)}
    wanted = {
        spec.exposed_name if spec.kind is not model.Kind.HISTOGRAM else spec.name + "_bucket"
        for spec in model.POD_FAMILIES
    }
    wanted |= {
        "podnet_exporter_build_info",
        "podnet_exporter_poll_duration_seconds",
        "podnet_exporter_program_attached",
        "podnet_exporter_map_update_failures_total",
        "podnet_exporter_errors_total",
    }
    assert wanted - used == set()


def test_workload_dashboard_shows_every_pod_metric() -> None:
    workload = load(DASHBOARD_DIR / "podnet-workload.json")
    exprs = " ".join(t["expr"] for _, t in targets(workload))
    for spec in model.POD_FAMILIES:
        name = spec.exposed_name if spec.kind is not model.Kind.HISTOGRAM else spec.name + "_bucket"
        assert re.search(rf"\b{name}\b", exprs), name


def test_latency_panels_use_quantiles_and_heatmaps(dashboard: dict[str, Any]) -> None:
    for metric in (
        "podnet_tcp_rtt_seconds",
        "podnet_tcp_connect_duration_seconds",
        "podnet_request_duration_seconds",
    ):
        quantiles = {
            q
            for _, t in targets(dashboard)
            for q in re.findall(
                rf"histogram_quantile\((0\.\d+), sum by \([^)]*\ble\b[^)]*\) \(rate\({metric}_bucket",
                t["expr"],
            )
        }
        assert {"0.5", "0.99"} <= quantiles, metric
    heatmaps = [p for p in all_panels(dashboard) if p["type"] == "heatmap"]
    assert {re.search(r"(podnet_\w+)_bucket", p["targets"][0]["expr"]).group(1) for p in heatmaps} == {  # type: ignore[union-attr]
        "podnet_tcp_rtt_seconds",
        "podnet_tcp_connect_duration_seconds",
    }
    for p in heatmaps:
        assert p["targets"][0]["format"] == "heatmap" and p["options"]["calculate"] is False


def test_request_panels(dashboard: dict[str, Any]) -> None:
    rows = [p for p in dashboard["panels"] if p["type"] == "row" and p["title"] == "Requests"]
    assert len(rows) == 1 and not rows[0]["collapsed"]
    exprs = [t["expr"] for _, t in targets(dashboard) if "podnet_request" in t["expr"]]
    assert any("sum by (" in e and "role" in e and "podnet_requests_total" in e for e in exprs)
    # HTTP status panels cover HTTP/1.x and HTTP/2; gRPC has its own status (grpc_status).
    ratio = [e for e in exprs if 'status_class=~"5xx"' in e]
    assert len(ratio) == 1 and ratio[0].count('protocol=~"http|http2"') == 3, ratio
    assert not any('protocol="http"' in e for e in exprs), exprs
    # Every request query aggregates to the labels it shows, so grpc_status splits no panel's series.
    for e in exprs:
        if "podnet_requests_total" in e:
            assert "sum by (" in e, e


def test_workload_request_panels_by_protocol_and_grpc_status() -> None:
    workload = load(DASHBOARD_DIR / "podnet-workload.json")
    panels = {p["title"]: p for p in all_panels(workload)}
    by_protocol = panels["Requests by protocol"]["targets"][0]["expr"]
    assert by_protocol.startswith("sum by (protocol) (rate(podnet_requests_total{"), by_protocol
    assert 'workload=~"$workload"' in by_protocol and "protocol=" not in by_protocol
    grpc = panels["gRPC requests by status"]["targets"][0]["expr"]
    assert grpc.startswith("sum by (grpc_status) (rate(podnet_requests_total{"), grpc
    assert 'workload=~"$workload"' in grpc and 'protocol="grpc"' in grpc
    assert panels["gRPC requests by status"]["targets"][0]["legendFormat"] == "{{grpc_status}}"
    # Both sit in the Requests row (the last row, not collapsed).
    rows = [p for p in workload["panels"] if p["type"] == "row"]
    assert rows[-1]["title"] == "Requests"
    for title in ("Requests by protocol", "gRPC requests by status"):
        assert panels[title]["gridPos"]["y"] > rows[-1]["gridPos"]["y"]


def test_overview_has_exporter_health_and_flow_table() -> None:
    overview = load(DASHBOARD_DIR / "podnet-overview.json")
    titles = {p["title"] for p in all_panels(overview)}
    assert "Exporter health" in titles
    flow = next(p for p in all_panels(overview) if p["title"] == "Pod-to-pod flows")
    assert flow["type"] == "table"
    expr = flow["targets"][0]["expr"]
    for label in ("workload", "peer_namespace", "peer_workload", "peer_kind", "direction"):
        assert label in expr
    assert any(t["expr"].startswith("topk(") for _, t in targets(overview))


def _check_rules(tmp_path: Path, exprs: list[tuple[str, str]]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/setup.sh --test)")
    groups = [
        {"name": f"check-{i}", "rules": [{"record": f"podnet:dashboard_check_{i}", "expr": expr}]}
        for i, (_, expr) in enumerate(exprs)
    ]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")
    r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        # Name the panels whose expressions promtool rejected.
        bad = sorted({int(n) for n in re.findall(r'group "check-(\d+)"', r.stdout + r.stderr)})
        detail = "\n".join(f"  {exprs[i][0]}: {exprs[i][1]}" for i in bad)
        pytest.fail(f"promtool check rules failed:\n{r.stdout}{r.stderr}\n{detail}")
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout, r.stdout


@pytest.mark.parametrize("values", SAMPLES, ids=["all", "selected"])
def test_every_query_is_valid_promql(
    dashboard: dict[str, Any], values: dict[str, str], tmp_path: Path
) -> None:
    exprs = [
        (f"{panel['title']} [{t['refId']}]", substitute(t["expr"], values)) for panel, t in targets(dashboard)
    ]
    for name, var in variables(dashboard).items():
        if var["type"] != "query":
            continue
        m = LABEL_VALUES.match(variable_query(var))
        assert m and m.group("selector"), name
        exprs.append((f"variable {name}", f"count({substitute(m.group('selector'), values)})"))
    for label, expr in exprs:
        assert "$" not in expr and "[[" not in expr, (label, expr)
    _check_rules(tmp_path, exprs)


def test_promtool_rejects_bad_promql(tmp_path: Path) -> None:
    """The check above would be worthless if promtool accepted anything."""
    with pytest.raises(pytest.fail.Exception, match="promtool check rules failed"):
        _check_rules(
            tmp_path, [("broken", 'sum by (le (rate(podnet_tcp_rtt_seconds_bucket{cluster=~".*"}[1m]))')]
        )
