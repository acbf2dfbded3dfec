"""The Helm chart helm/podnet-exporter (rendered offline with helm-python-sdk, objects checked against the
Kubernetes OpenAPI schemas with kubernetes-validate), and the container image's Dockerfile."""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import helm_python as helm
import kubernetes_validate
import pytest
import yaml

import exporter
from exporter.app.config import parse_args, resolve

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "podnet-exporter"
RELEASE, NAMESPACE = "podnet", "podnet"
FULLNAME = "podnet-podnet-exporter"
# Oldest (Chart.yaml kubeVersion) and newest Kubernetes versions kubernetes-validate knows, plus one between.
KUBE_VERSIONS = ("1.25.0", "1.30.0", "1.37.0")
MONITORING = "monitoring.coreos.com/v1"
EVERYTHING_ON: dict[str, Any] = {
    "serviceMonitor": {
        "enabled": True,
        "interval": "15s",
        "scrapeTimeout": "10s",
        "labels": {"release": "kube-prometheus-stack"},
        "relabelings": [{"targetLabel": "cluster", "replacement": "prod-eu"}],
        "metricRelabelings": [
            {"sourceLabels": ["__name__"], "regex": "podnet_exporter_bpf_.*", "action": "drop"}
        ],
    },
    "otlp": {"endpoint": "http://otel-collector.observability:4317", "headersSecret": {"name": "otlp-auth"}},
    "clusterName": "prod-eu",
    "config": {"kernelHeaders": "auto"},
    "imagePullSecrets": [{"name": "regcred"}],
    "commonLabels": {"team": "net"},
    "commonAnnotations": {"owner": "net-team"},
    "podLabels": {"tier": "observability"},
    "podAnnotations": {"example.com/x": "y"},
    "extraArgs": ["--log-level", "debug"],
    "extraEnv": [{"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "deployment.environment=prod"}],
    "extraVolumes": [{"name": "ca", "configMap": {"name": "ca"}}],
    "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/otel", "readOnly": True}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["gpu"]}]}
                ]
            }
        }
    },
    "dashboards": {"namespace": "grafana", "folder": "Network", "labels": {"x": "y"}},
}
# A real bcrypt hash (cost 4: quick to make), as web.basicAuth.users wants.
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
TLS: dict[str, Any] = {"web": {"tls": {"enabled": True, "secretName": "podnet-tls"}}}
MTLS: dict[str, Any] = {
    "web": {
        "tls": {
            "enabled": True,
            "secretName": "podnet-tls",
            "clientAuthType": "RequireAndVerifyClientCert",
            "clientCASecretName": "scrapers-ca",
        }
    }
}
BASIC_AUTH: dict[str, Any] = {"web": {"basicAuth": {"users": {"prometheus": HASH}}}}
EXISTING_WEB: dict[str, Any] = {"web": {"existingConfigSecret": "podnet-web", "tls": {"enabled": True}}}
# Each way of configuring the endpoint, and the alerts: every one renders valid Kubernetes.
WEB_MODES: dict[str, dict[str, Any]] = {
    "tls": TLS,
    "mtls": MTLS,
    "tls-basic-auth": {"web": {**TLS["web"], **BASIC_AUTH["web"]}, "serviceMonitor": {"enabled": True}},
    "basic-auth": BASIC_AUTH,
    "existing-web-config": EXISTING_WEB,
    "node-ip": {"web": {"listen": "nodeIP"}},
    "loopback": {"web": {"listen": "loopback"}},
    "prometheus-rule": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
}
WEB_CONFIG_SECRET = f"{FULLNAME}-web-config"
# TLS plaintext through uprobes on OpenSSL (--tls openssl): the one setting that widens the pod's privileges.
TLS_CAPTURE: dict[str, Any] = {"config": {"tls": "openssl"}}
# Values earlier chart versions had, now removed: the schema keeps an entry for each that accepts no
# value, so setting one fails with a sentence saying what to do. Value -> host path it used to mount.
REMOVED_VALUES = {"hostPaths.libModules": "/lib/modules", "hostPaths.usrSrc": "/usr/src"}
# The kernel headers tree the image carries (its ENV PODNET_KERNEL_HEADERS).
IMAGE_HEADERS = "/opt/podnet/kernel-headers"


# ---- helpers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as c:
        yield c


class Rendered:
    def __init__(self, manifests: dict[str, str]) -> None:
        self.notes = next((text for path, text in manifests.items() if path.endswith("NOTES.txt")), "")
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                continue
            self.objects += [d for d in yaml.safe_load_all(text) if d]

    def kinds(self) -> list[str]:
        return sorted(o["kind"] for o in self.objects)

    def get(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [
            o for o in self.objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
        ]
        assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
        return found[0]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    @property
    def daemonset(self) -> dict[str, Any]:
        return self.get("DaemonSet")

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.daemonset["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        (c,) = self.pod["containers"]
        return dict(c)

    @property
    def config_map(self) -> dict[str, Any]:
        return self.get("ConfigMap", FULLNAME)

    @property
    def exporter_config(self) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(self.config_map["data"]["config.yaml"])
        return data

    @property
    def web_config_text(self) -> str:
        """The generated web-config.yml (the Secret holds it base64-encoded)."""
        secret = self.get("Secret", WEB_CONFIG_SECRET)
        assert set(secret["data"]) == {"web-config.yml"} and secret["type"] == "Opaque"
        return base64.b64decode(secret["data"]["web-config.yml"]).decode()

    @property
    def web_config(self) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(self.web_config_text)
        return data

    @property
    def pod_annotations(self) -> dict[str, str]:
        annotations: dict[str, str] = self.daemonset["spec"]["template"]["metadata"]["annotations"]
        return annotations


def render(chart: helm.Chart, values: dict[str, Any] | None = None, name: str = RELEASE) -> Rendered:
    return Rendered(chart.render(values or {}, name=name, namespace=NAMESPACE))


def values_yaml() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    return data


def leaf_keys(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted keys of values.yaml down to the settings a user sets (free-form maps and lists are leaves)."""
    free_form = {
        "securityContext",
        "podSecurityContext",
        "resources",
        "updateStrategy",
        "nodeSelector",
        "startupProbe",
        "livenessProbe",
        "readinessProbe",
        "headers",
        "rules",  # prometheusRule.rules: documented as one row, each alert in the Alerts table
    }
    for key, value in values.items():
        path = prefix + key
        if isinstance(value, dict) and value and key not in free_form:
            yield from leaf_keys(value, path + ".")
        else:
            yield path


# ---- chart metadata, lint and schema ---------------------------------------------------------------------


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert meta["name"] == "podnet-exporter" and meta["apiVersion"] == "v2" and meta["type"] == "application"
    assert meta["appVersion"] == exporter.__version__, (
        "Chart.yaml appVersion must follow the exporter version"
    )
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])


@pytest.mark.parametrize("values", [None, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_lint_is_clean(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_schema_accepts_the_defaults(chart: helm.Chart) -> None:
    chart.validate_schema(chart.values)
    chart.validate_schema(EVERYTHING_ON)


def test_schema_and_values_list_the_same_keys(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None and schema["additionalProperties"] is False

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        props = node.get("properties", {})
        for key, value in values.items():
            assert key in props, f"{path}{key} is in values.yaml but not in values.schema.json"
            assert f"{path}{key}" not in REMOVED_VALUES, f"{path}{key} is removed but still in values.yaml"
            if isinstance(value, dict) and props[key].get("additionalProperties") is False:
                walk(value, props[key], f"{path}{key}.")
        if node.get("additionalProperties") is False and ("description" in node or not path):
            removed = {key for key in props if f"{path}{key}" in REMOVED_VALUES}
            missing = set(props) - set(values) - {"global"} - removed
            assert not missing, f"{path}: in the schema but not in values.yaml: {missing}"
            for key in removed:  # accepts nothing: its const (the message) is excluded by its not
                assert props[key]["not"] == {"const": props[key]["const"]}, f"{path}{key}"

    walk(values_yaml(), schema, "")
    for key in REMOVED_VALUES:
        node = schema
        for part in key.split("."):
            node = node["properties"][part]
        assert node["deprecated"] is True, key


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bogus": 1}, "additional properties 'bogus' not allowed"),
        ({"serviceMonitor": {"enabeld": True}}, "additional properties 'enabeld' not allowed"),
        ({"port": "9436"}, "at '/port': got string, want integer"),
        ({"port": 0}, "at '/port': minimum"),
        ({"port": 65536}, "at '/port': maximum"),
        ({"service": {"port": 70000}}, "at '/service/port': maximum"),
        ({"otlp": {"protocol": "http"}}, "at '/otlp/protocol': value must be one of 'grpc', 'http/protobuf'"),
        (
            {"otlp": {"histogram": "linear"}},
            "at '/otlp/histogram': value must be one of 'exponential', 'explicit'",
        ),
        ({"otlp": {"temporality": "lowmemory"}}, "at '/otlp/temporality': value must be one of"),
        ({"otlp": {"endpoint": "otel collector:4317"}}, "at '/otlp/endpoint'"),
        ({"otlp": {"interval": 0}}, "at '/otlp/interval'"),
        ({"config": {"histogramScale": 3}}, "at '/config/histogramScale': value must be one of 0, 1, 2"),
        ({"config": {"mapEntries": 100}}, "at '/config/mapEntries': minimum"),
        ({"config": {"logLevel": "verbose"}}, "at '/config/logLevel'"),
        (
            {"config": {"requests": "peek"}},
            "at '/config/requests': value must be one of 'http', 'http1', 'turns', 'off', true, false",
        ),
        (
            {"config": {"tls": "boringssl"}},
            "at '/config/tls': value must be one of 'off', 'openssl', true, false",
        ),
        ({"config": {"tls": "on"}}, "at '/config/tls': value must be one of 'off', 'openssl'"),
        ({"config": {"tls": 1}}, "at '/config/tls'"),
        ({"config": {"cgroupRoot": "sys/fs/cgroup"}}, "at '/config/cgroupRoot'"),
        ({"config": {"kernelHeaders": "usr/src/linux"}}, "at '/config/kernelHeaders'"),
        ({"image": {"pullPolicy": "always"}}, "at '/image/pullPolicy'"),
        ({"image": {"digest": "abc"}}, "at '/image/digest'"),
        ({"serviceMonitor": {"interval": "30"}}, "at '/serviceMonitor/interval'"),
        ({"clusterName": "prod\neu"}, "at '/clusterName'"),
        ({"securityContext": {"privileged": "yes"}}, "at '/securityContext/privileged'"),
        ({"tolerations": {"operator": "Exists"}}, "at '/tolerations': got object, want array"),
        (
            {"web": {"listen": "0.0.0.0"}},
            "at '/web/listen': value must be one of 'all', 'nodeIP', 'loopback'",
        ),
        ({"web": {"tls": {"clientAuthType": "RequireAnyClientCert"}}}, "at '/web/tls/clientAuthType'"),
        ({"web": {"tls": {"minVersion": "TLS1.2"}}}, "at '/web/tls/minVersion'"),
        ({"web": {"basicAuth": {"users": {"prometheus": "s3cret"}}}}, "at '/web/basicAuth/users/prometheus'"),
        ({"serviceMonitor": {"scheme": "HTTPS"}}, "at '/serviceMonitor/scheme'"),
        ({"prometheusRule": {"rules": {"PodnetExporterDown": {"for": "5 min"}}}}, "PodnetExporterDown/for'"),
        (
            {"prometheusRule": {"rules": {"PodnetNoSuchAlert": {}}}},
            "additional properties 'PodnetNoSuchAlert'",
        ),
    ],
)
def test_schema_rejects_bad_values_clearly(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as exc:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
            "serviceMonitor.enabled and podMonitor.enabled are both true",
        ),
        (
            {"otlp": {"headers": {"a": "b"}, "headersSecret": {"name": "s"}}},
            "otlp.headers and otlp.headersSecret.name are both set",
        ),
        (
            {"serviceMonitor": {"enabled": True}, "service": {"enabled": False}},
            "serviceMonitor.enabled needs",
        ),
        ({"web": {"tls": {"enabled": True}}}, "web.tls.enabled needs web.tls.secretName"),
        (
            {"web": {"tls": {"secretName": "podnet-tls"}}},
            "web.tls.secretName is set but web.tls.enabled is false",
        ),
        (
            {
                "web": {
                    "tls": {"enabled": True, "secretName": "t", "clientAuthType": "VerifyClientCertIfGiven"}
                }
            },
            "web.tls.clientAuthType=VerifyClientCertIfGiven needs a CA for the client certificates: set "
            "web.tls.clientCASecretName",
        ),
        (
            {"web": {"tls": {"enabled": True, "secretName": "t", "clientCASecretName": "ca"}}},
            "web.tls.clientCASecretName is set but web.tls.clientAuthType is NoClientCert",
        ),
        (
            {"web": {"tls": {"clientAuthType": "RequireAndVerifyClientCert"}, "existingConfigSecret": "w"}},
            "web.tls.clientAuthType=RequireAndVerifyClientCert needs web.tls.enabled",
        ),
        (
            {"web": {"existingConfigSecret": "w", "basicAuth": {"users": {"a": HASH}}}},
            "web.existingConfigSecret is set together with web.tls.secretName, web.tls.clientCASecretName or "
            "web.basicAuth.users",
        ),
        (
            {"web": {"existingConfigSecret": "w", "tls": {"enabled": True, "secretName": "t"}}},
            "web.existingConfigSecret is set together with",
        ),
        ({"web": {"listen": "nodeIP"}, "hostNetwork": False}, "web.listen=nodeIP needs hostNetwork=true"),
        ({"web": {"listen": "loopback"}, "hostNetwork": False}, "web.listen=loopback needs hostNetwork=true"),
        (
            {"web": {"listen": "loopback"}, "podMonitor": {"enabled": True}},
            "web.listen=loopback with a ServiceMonitor or PodMonitor",
        ),
        (
            {"prometheusRule": {"enabled": True}},
            "prometheusRule.enabled needs prometheusRule.selector when neither serviceMonitor nor podMonitor",
        ),
        (
            {"config": {"tls": "openssl", "requests": "turns"}},
            "config.tls=openssl needs config.requests http or http1, not turns: the decrypted payloads are "
            "read only to recognise HTTP; set config.requests=http, or config.tls=off",
        ),
        (
            {"config": {"tls": True, "requests": False}},
            "config.tls=openssl needs config.requests http or http1, not off",
        ),
    ],
)
def test_contradictory_values_fail_with_a_message(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# ---- every object is valid Kubernetes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [None, EVERYTHING_ON, {"podMonitor": {"enabled": True}}, TLS_CAPTURE, *WEB_MODES.values()],
    ids=["defaults", "everything-on", "podmonitor", "tls-openssl", *WEB_MODES],
)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_objects_validate_against_the_kubernetes_schema(
    chart: helm.Chart, values: dict[str, Any] | None, kube: str
) -> None:
    r = render(chart, values)
    for obj in r.objects:
        if obj["apiVersion"] == MONITORING:
            continue  # a CRD: checked by test_monitors_have_the_operator_fields
        kubernetes_validate.validate(obj, kube, strict=True)
        name = obj["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"]


def test_default_objects(chart: helm.Chart) -> None:
    r = render(chart)
    assert r.kinds() == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "ConfigMap",
            "DaemonSet",
            "Service",
            "ServiceAccount",
        ]
    )
    for obj in r.objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "podnet-exporter"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == exporter.__version__


def test_long_release_names_are_truncated(chart: helm.Chart) -> None:
    r = render(chart, name="a-very-long-release-name-for-the-podnet-exporter-x")
    for obj in r.objects:
        assert len(obj["metadata"]["name"]) <= 63
    assert render(chart, {"fullnameOverride": "podnet"}).daemonset["metadata"]["name"] == "podnet"


# ---- the DaemonSet ---------------------------------------------------------------------------------------


def test_daemonset_runs_everywhere_and_rolls_gently(chart: helm.Chart) -> None:
    r = render(chart)
    ds = r.daemonset
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "10%"},
    }
    assert r.pod["tolerations"] == [{"operator": "Exists"}]
    assert r.pod["priorityClassName"] == "system-node-critical"
    assert r.pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    # A map default is removed key by key (Helm merges maps): null deletes.
    narrow = render(
        chart, {"tolerations": [], "priorityClassName": "", "nodeSelector": {"kubernetes.io/os": None}}
    ).pod
    assert "tolerations" not in narrow and "priorityClassName" not in narrow and "nodeSelector" not in narrow


def test_security_context_is_least_privilege(chart: helm.Chart) -> None:
    r = render(chart)
    sc = r.container["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {
        "drop": ["ALL"],
        "add": ["BPF", "PERFMON"],
    }
    assert "SYS_ADMIN" not in json.dumps(r.objects)
    assert "SYS_PTRACE" not in json.dumps(r.objects)
    assert r.pod["hostPID"] is False and r.pod["hostIPC"] is False
    assert r.pod["hostNetwork"] is True and r.pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    pod_net = render(chart, {"hostNetwork": False}).pod
    assert pod_net["hostNetwork"] is False and pod_net["dnsPolicy"] == "ClusterFirst"
    # The escape hatch for kernels older than 5.8 or runtimes that do not know CAP_BPF.
    hatch = render(chart, {"securityContext": {"privileged": True}}).container["securityContext"]
    assert hatch["privileged"] is True


@pytest.mark.parametrize(
    ("values", "capture"),
    [
        (None, False),
        ({"config": {"tls": "off"}}, False),
        ({"config": {"tls": False}}, False),
        (TLS_CAPTURE, True),
        ({"config": {"tls": True}}, True),
        ({"config": {"tls": "openssl", "requests": "http1"}}, True),
    ],
    ids=["default", "off", "false", "openssl", "true", "openssl-http1"],
)
def test_tls_capture_adds_host_pid_and_sys_ptrace_only(
    chart: helm.Chart, values: dict[str, Any] | None, capture: bool
) -> None:
    # Finding libssl in other containers reads /proc/<pid>/maps and /proc/<pid>/root of the host's
    # processes: the host PID namespace and a ptrace access check.
    r = render(chart, values)
    assert r.pod["hostPID"] is capture and r.pod["hostIPC"] is False
    sc = r.container["securityContext"]
    added = ["BPF", "PERFMON", "SYS_PTRACE"] if capture else ["BPF", "PERFMON"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": added}
    assert (sc["privileged"], sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"]) == (
        False,
        False,
        True,
    )
    assert "SYS_ADMIN" not in json.dumps(r.objects)
    assert ("hostPID and SYS_PTRACE" in r.notes) is capture
    # Without CAP_SYS_ADMIN uprobes are made in the host's tracefs (uprobe_events).
    mounts = {m["name"]: m["mountPath"] for m in r.container["volumeMounts"]}
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in r.pod["volumes"]}
    assert (mounts.get("tracefs"), volumes.get("tracefs")) == (
        ("/sys/kernel/tracing", "/sys/kernel/tracing") if capture else (None, None)
    )


def test_tls_capture_keeps_the_users_capabilities(chart: helm.Chart) -> None:
    # SYS_PTRACE is added once, after what the user lists; the values themselves are not changed.
    sc = {"capabilities": {"drop": ["ALL"], "add": ["BPF", "PERFMON", "SYS_RESOURCE"]}}
    r = render(chart, {**TLS_CAPTURE, "securityContext": sc})
    assert r.container["securityContext"]["capabilities"]["add"] == [
        "BPF",
        "PERFMON",
        "SYS_RESOURCE",
        "SYS_PTRACE",
    ]
    listed = {"capabilities": {"add": ["BPF", "PERFMON", "SYS_PTRACE"]}}
    again = render(chart, {**TLS_CAPTURE, "securityContext": listed}).container["securityContext"]
    assert again["capabilities"]["add"] == ["BPF", "PERFMON", "SYS_PTRACE"]
    # The checksum that rolls the pods follows the config, which carries the setting.
    assert render(chart).pod_annotations["checksum/config"] != r.pod_annotations["checksum/config"]


def test_mounts_are_read_only_except_tmp(chart: helm.Chart) -> None:
    r = render(chart)
    mounts = {m["mountPath"]: m for m in r.container["volumeMounts"]}
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    host = {
        path: volumes[m["name"]]["hostPath"]["path"]
        for path, m in mounts.items()
        if "hostPath" in volumes[m["name"]]
    }
    assert host == {
        "/host/sys/fs/cgroup": "/sys/fs/cgroup",
        "/sys/fs/bpf": "/sys/fs/bpf",
        "/run/podnet": "/run/podnet",
    }
    # Pinned maps and saved totals are written; every other host path is read-only.
    for path in set(host) - {"/sys/fs/bpf", "/run/podnet"}:
        assert mounts[path]["readOnly"] is True, path
    assert volumes[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["type"] == "Directory"
    assert volumes[mounts["/run/podnet"]["name"]]["hostPath"]["type"] == "DirectoryOrCreate"
    assert mounts["/etc/podnet"]["readOnly"] is True
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"] == {"sizeLimit": "64Mi"}
    assert not mounts["/tmp"].get("readOnly")
    # Nothing else of the host: no kernel headers (the image has its own), no /proc,
    # /sys/kernel/debug, tracefs or the runtime socket.
    assert len(mounts) == 5
    assert r.exporter_config["cgroup_root"] == "/host/sys/fs/cgroup"
    assert (r.exporter_config["pin_dir"], r.exporter_config["state_dir"]) == (
        "/sys/fs/bpf/podnet",
        "/run/podnet",
    )
    off = render(chart, {"persistence": {"enabled": False}})
    assert {m["mountPath"] for m in off.container["volumeMounts"]}.isdisjoint({"/sys/fs/bpf", "/run/podnet"})
    assert off.exporter_config["pin_dir"] == "none"


def _under(path: str, top: str) -> bool:
    """Whether `path` is `top`, below it or above it (a mount of / or /usr shows /usr/src too)."""
    parts, top_parts = Path(path).parts, Path(top).parts
    n = min(len(parts), len(top_parts))
    return parts[:n] == top_parts[:n]


@pytest.mark.parametrize(
    "values",
    [
        None,
        EVERYTHING_ON,
        {"persistence": {"enabled": False}},
        {"securityContext": {"privileged": True}},
        {"config": {"kernelHeaders": "auto"}},
        *WEB_MODES.values(),
    ],
    ids=["defaults", "everything-on", "no-persistence", "privileged", "kernel-headers-auto", *WEB_MODES],
)
def test_no_kernel_headers_from_the_node(chart: helm.Chart, values: dict[str, Any] | None) -> None:
    """The image carries its own kernel headers: nothing under /lib/modules or /usr/src comes from the
    host, by any volume type (hostPath of any type, read-only or not), and nothing is mounted there."""
    r = render(chart, values)
    host_paths = [v["hostPath"]["path"] for v in r.pod["volumes"] if "hostPath" in v]
    assert host_paths  # the cgroup tree at least
    for top in REMOVED_VALUES.values():
        for path in host_paths:
            assert not _under(path, top), f"hostPath {path} exposes the node's {top}"
        for mount in r.container["volumeMounts"]:
            assert not _under(mount["mountPath"], top), mount
    assert not any(v["name"] in ("lib-modules", "usr-src") for v in r.pod["volumes"])
    assert '"/lib/modules"' not in json.dumps(r.daemonset) and '"/usr/src"' not in json.dumps(r.daemonset)


@pytest.mark.parametrize("key", sorted(REMOVED_VALUES))
@pytest.mark.parametrize("value", ["/lib/modules", "/usr/src", "", "/srv/headers"])
def test_removed_host_path_values_are_rejected_with_the_fix(chart: helm.Chart, key: str, value: str) -> None:
    group, name = key.split(".")
    with pytest.raises(helm.HelmValuesError) as exc:
        chart.render({group: {name: value}}, name=RELEASE, namespace=NAMESPACE)
    text = str(exc.value)
    assert f"at '/{group}/{name}': value must be 'left unset: {key} was removed" in text
    assert "the image carries its own kernel headers" in text
    assert f"--set {key}=null" in text and "Upgrading in docs/HELM.md" in text


def test_removed_values_from_an_old_release_can_be_deleted(tmp_path: Path) -> None:
    """helm upgrade --reuse-values renders the new chart with the old chart's defaults, which had both
    keys: the upgrade fails with the message until they are set to null (which deletes them)."""
    old = tmp_path / "podnet-exporter"
    shutil.copytree(CHART_DIR, old)
    values = values_yaml()
    values["hostPaths"] = {"libModules": "/lib/modules", "usrSrc": "/usr/src", **values["hostPaths"]}
    (old / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    with helm.Chart.load(old) as reused:
        with pytest.raises(helm.HelmValuesError, match=re.escape("hostPaths.libModules was removed")):
            reused.render({}, name=RELEASE, namespace=NAMESPACE)
        nulls = {"hostPaths": dict.fromkeys(("libModules", "usrSrc"))}
        r = Rendered(reused.render(nulls, name=RELEASE, namespace=NAMESPACE))
    assert {m["mountPath"] for m in r.container["volumeMounts"]}.isdisjoint(REMOVED_VALUES.values())


def container_environ(r: Rendered) -> dict[str, str]:
    """The exporter's environment: the image's ENV headers tree, replaced by the pod's plain env values."""
    env = {"PODNET_KERNEL_HEADERS": IMAGE_HEADERS}
    env.update({e["name"]: e["value"] for e in r.container["env"] if "value" in e})
    return env


OWN_HEADERS = "/host/usr/src/linux-headers-6.1.0-13-amd64"


@pytest.mark.parametrize(
    ("value", "pod_env", "kernel_headers"),
    [
        ("", None, IMAGE_HEADERS),  # the image's tree
        (OWN_HEADERS, OWN_HEADERS, OWN_HEADERS),
        ("auto", "", None),  # None: the exporter's own search, down to /lib/modules/$(uname -r)/build
    ],
    ids=["image", "path", "auto"],
)
def test_kernel_headers_setting_replaces_the_images_tree(
    chart: helm.Chart, tmp_path: Path, value: str, pod_env: str | None, kernel_headers: str | None
) -> None:
    r = render(chart, {"config": {"kernelHeaders": value}})
    env = {e["name"]: e.get("value") for e in r.container["env"]}
    assert env.get("PODNET_KERNEL_HEADERS") == pod_env
    # Not in the ConfigMap: the image's PODNET_KERNEL_HEADERS would win over the file.
    assert "kernel_headers" not in r.exporter_config
    assert resolved(r, tmp_path, container_environ(r)).kernel_headers == kernel_headers


def test_container_command_env_ports_and_probes(chart: helm.Chart) -> None:
    r = render(chart)
    c = r.container
    assert c["image"] == f"ghcr.io/podnet/podnet-exporter:{exporter.__version__}"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["args"] == ["run", "--config", "/etc/podnet/config.yaml"]
    assert "command" not in c  # the image's ENTRYPOINT podnet-exporter
    assert c["env"] == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9436, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # The first start compiles the eBPF programs: give it minutes, not the liveness probe's seconds.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 180
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    assert r.pod["serviceAccountName"] == FULLNAME
    assert r.pod["automountServiceAccountToken"] is True


def test_image_settings(chart: helm.Chart) -> None:
    digest = "sha256:" + "a" * 64
    r = render(
        chart,
        {
            "image": {
                "repository": "registry.example.com/podnet",
                "tag": "1.2.3",
                "digest": digest,
                "pullPolicy": "Always",
            },
            "imagePullSecrets": [{"name": "regcred"}],
        },
    )
    assert r.container["image"] == f"registry.example.com/podnet:1.2.3@{digest}"
    assert r.container["imagePullPolicy"] == "Always"
    assert r.pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert render(chart, {"image": {"tag": "main"}}).container["image"].endswith(":main")


def test_extras_and_labels(chart: helm.Chart) -> None:
    r = render(chart, EVERYTHING_ON)
    c = r.container
    assert c["args"][-2:] == ["--log-level", "debug"]
    assert {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "deployment.environment=prod"} in c["env"]
    assert {"name": "ca", "mountPath": "/etc/ssl/otel", "readOnly": True} in c["volumeMounts"]
    assert {"name": "ca", "configMap": {"name": "ca"}} in r.pod["volumes"]
    assert r.pod["affinity"] == EVERYTHING_ON["affinity"]
    assert r.pod["imagePullSecrets"] == [{"name": "regcred"}]
    template = r.daemonset["spec"]["template"]["metadata"]
    assert template["labels"]["tier"] == "observability" and template["labels"]["team"] == "net"
    assert template["annotations"]["example.com/x"] == "y"
    for obj in r.objects:
        assert obj["metadata"]["labels"]["team"] == "net", obj["kind"]
        assert obj["metadata"]["annotations"]["owner"] == "net-team", obj["kind"]


# ---- exporter settings -----------------------------------------------------------------------------------


def resolved(r: Rendered, tmp_path: Path, env: dict[str, str] | None = None) -> Any:
    """The rendered config.yaml as the real exporter reads it (raises ConfigError when it would not start)."""
    path = tmp_path / "config.yaml"
    path.write_text(r.config_map["data"]["config.yaml"])
    args = r.container["args"]
    assert args[:3] == ["run", "--config", "/etc/podnet/config.yaml"]
    _, ns = parse_args(["run", "--config", str(path), *args[3:]])
    return resolve(ns, {"NODE_NAME": "node-a", **(env or {})})


def test_default_config_is_accepted_by_the_exporter(chart: helm.Chart, tmp_path: Path) -> None:
    cfg = resolved(render(chart), tmp_path)
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 9436)
    assert cfg.poll_interval == 5 and cfg.log_level == "info" and cfg.max_series == 10000
    assert cfg.map_entries == 65536 and cfg.histogram_scale == 0
    assert cfg.cgroup_root == "/host/sys/fs/cgroup"
    assert cfg.node_name == "node-a"
    assert cfg.cluster_name == "" and cfg.otlp is None
    assert cfg.pods_file is None  # the Kubernetes API, not a file
    assert cfg.requests == "http"


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("turns", "turns"),
        ("off", "off"),
        (False, "off"),
        (True, "http"),
        ("http", "http"),
        ("http1", "http1"),
    ],
)
def test_request_tracking_modes_reach_the_exporter(
    chart: helm.Chart, tmp_path: Path, value: object, mode: str
) -> None:
    assert resolved(render(chart, {"config": {"requests": value}}), tmp_path).requests == mode


@pytest.mark.parametrize(
    ("value", "mode"),
    [("off", "off"), ("openssl", "openssl"), (False, "off"), (True, "openssl"), (None, "off")],
)
def test_tls_modes_reach_the_exporter(chart: helm.Chart, tmp_path: Path, value: object, mode: str) -> None:
    # None: the key deleted (--set config.tls=null) renders the exporter's default.
    r = render(chart, {"config": {"tls": value}})
    assert r.exporter_config["tls"] in ("off", "openssl")
    assert resolved(r, tmp_path).tls == mode


def test_settings_reach_the_exporter(chart: helm.Chart, tmp_path: Path) -> None:
    values = {
        "port": 9500,
        "clusterName": "prod-eu",
        "config": {
            "pollInterval": 2.5,
            "logLevel": "debug",
            "maxSeries": 5000,
            "mapEntries": 131072,
            "histogramScale": 2,
            "cgroupRoot": "/host/sys/fs/cgroup/unified",
        },
        "otlp": {
            "endpoint": "https://otel.example.com:4318/v1/metrics",
            "protocol": "http/protobuf",
            "interval": 15,
            "timeout": 5,
            "histogram": "explicit",
            "temporality": "delta",
            "headers": {"X-Scope-OrgID": "team-a"},
        },
    }
    r = render(chart, values)
    cfg = resolved(r, tmp_path)
    assert cfg.listen_port == 9500 and r.container["ports"][0]["containerPort"] == 9500
    assert r.daemonset["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9500"
    assert cfg.poll_interval == 2.5 and cfg.log_level == "debug" and cfg.max_series == 5000
    assert cfg.map_entries == 131072 and cfg.histogram_scale == 2
    assert cfg.cgroup_root == "/host/sys/fs/cgroup/unified" and cfg.cluster_name == "prod-eu"
    assert cfg.otlp is not None
    assert cfg.otlp.endpoint == "https://otel.example.com:4318/v1/metrics"
    assert (cfg.otlp.protocol, cfg.otlp.interval, cfg.otlp.timeout) == ("http/protobuf", 15, 5)
    assert (cfg.otlp.histogram, cfg.otlp.temporality, cfg.otlp.insecure) == ("explicit", "delta", False)
    assert cfg.otlp.headers == (("x-scope-orgid", "team-a"),)


def test_otlp_headers_from_a_secret(chart: helm.Chart, tmp_path: Path) -> None:
    r = render(
        chart,
        {
            "otlp": {
                "endpoint": "otel:4317",
                "insecure": True,
                "headersSecret": {"name": "otlp-auth", "key": "h"},
            }
        },
    )
    env = {e["name"]: e for e in r.container["env"]}
    assert env["PODNET_OTLP_HEADERS"]["valueFrom"] == {"secretKeyRef": {"name": "otlp-auth", "key": "h"}}
    assert "headers" not in r.exporter_config["otlp"]  # nothing secret in the ConfigMap
    cfg = resolved(r, tmp_path, {"PODNET_OTLP_HEADERS": "authorization=Bearer%20s3cr3t"})
    assert cfg.otlp is not None and cfg.otlp.endpoint == "http://otel:4317" and cfg.otlp.insecure
    assert cfg.otlp.headers == (("authorization", "Bearer s3cr3t"),)


def test_config_change_rolls_the_pods(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any] | None) -> str:
        return str(
            render(chart, values).daemonset["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        )

    default = checksum(None)
    assert re.fullmatch(r"[0-9a-f]{64}", default)
    assert checksum(None) == default
    assert checksum({"config": {"pollInterval": 10}}) != default
    assert checksum({"otlp": {"endpoint": "http://otel:4317"}}) != default
    assert checksum({"podLabels": {"a": "b"}}) == default


# ---- RBAC, Service, scraping -----------------------------------------------------------------------------


def test_rbac_is_pods_get_list_watch_only(chart: helm.Chart) -> None:
    r = render(chart)
    role = r.get("ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = r.get("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": FULLNAME,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert r.get("ServiceAccount")["metadata"]["name"] == FULLNAME
    none = render(chart, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}})
    assert not none.all("ClusterRole") and not none.all("ServiceAccount")
    assert none.pod["serviceAccountName"] == "mine"


def test_service_selects_the_exporter_pods(chart: helm.Chart) -> None:
    r = render(chart)
    svc = r.get("Service")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9436, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert svc["spec"]["selector"].items() <= r.daemonset["spec"]["template"]["metadata"]["labels"].items()
    assert not render(chart, {"service": {"enabled": False}}).all("Service")


def test_scrape_annotations_toggle(chart: helm.Chart) -> None:
    on = render(chart).daemonset["spec"]["template"]["metadata"]["annotations"]
    assert (on["prometheus.io/scrape"], on["prometheus.io/port"], on["prometheus.io/path"]) == (
        "true",
        "9436",
        "/metrics",
    )
    off = render(chart, {"scrapeAnnotations": {"enabled": False}}).daemonset["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert not any(k.startswith("prometheus.io/") for k in off)


# Fields of the Prometheus Operator CRDs (monitoring.coreos.com/v1) the chart may set.
ENDPOINT_FIELDS = {
    "port",
    "path",
    "scheme",
    "tlsConfig",
    "basicAuth",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
}
RELABEL_FIELDS = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}


def _check_monitor(mon: dict[str, Any], kind: str, endpoints_key: str, r: Rendered) -> dict[str, Any]:
    assert mon["apiVersion"] == MONITORING and mon["kind"] == kind
    spec = mon["spec"]
    assert set(spec) == {"selector", "namespaceSelector", endpoints_key}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (ep,) = spec[endpoints_key]
    assert set(ep) <= ENDPOINT_FIELDS
    assert ep["port"] == "metrics" and ep["path"] == "/metrics"
    assert ep["scheme"] == "http"  # web.tls is off in these renders
    # Without honorLabels, Prometheus renames the exporter's namespace/pod labels exported_*.
    assert ep["honorLabels"] is True
    for relabel in ep.get("relabelings", []) + ep.get("metricRelabelings", []):
        assert set(relabel) <= RELABEL_FIELDS
    return dict(ep)


def test_service_monitor(chart: helm.Chart) -> None:
    assert not render(chart).all("ServiceMonitor")
    r = render(chart, EVERYTHING_ON)
    mon = r.get("ServiceMonitor")
    ep = _check_monitor(mon, "ServiceMonitor", "endpoints", r)
    assert (ep["interval"], ep["scrapeTimeout"]) == ("15s", "10s")
    assert ep["relabelings"] == EVERYTHING_ON["serviceMonitor"]["relabelings"]
    assert ep["metricRelabelings"] == EVERYTHING_ON["serviceMonitor"]["metricRelabelings"]
    assert mon["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    svc = r.get("Service")
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert "WARNING" in r.notes  # the annotations are still on: scraped twice if one Prometheus reads both
    elsewhere = render(
        chart,
        {
            "serviceMonitor": {"enabled": True, "namespace": "monitoring"},
            "scrapeAnnotations": {"enabled": False},
        },
    )
    assert elsewhere.get("ServiceMonitor")["metadata"]["namespace"] == "monitoring"
    assert "WARNING" not in elsewhere.notes


def test_pod_monitor(chart: helm.Chart) -> None:
    assert not render(chart).all("PodMonitor")
    r = render(chart, {"podMonitor": {"enabled": True, "interval": "1m", "labels": {"release": "prom"}}})
    mon = r.get("PodMonitor")
    ep = _check_monitor(mon, "PodMonitor", "podMetricsEndpoints", r)
    assert ep["interval"] == "1m" and "scrapeTimeout" not in ep
    pod_labels = r.daemonset["spec"]["template"]["metadata"]["labels"]
    assert mon["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [p["name"] for p in r.container["ports"]] == ["metrics"]


def test_notes(chart: helm.Chart) -> None:
    notes = render(chart).notes
    assert f"kubectl -n {NAMESPACE} get daemonset {FULLNAME}" in notes
    assert "pod-security.kubernetes.io/enforce=privileged" in notes
    assert "honor_labels: true" in notes
    assert "podnet-exporter doctor" in notes
    silent = render(chart, {"scrapeAnnotations": {"enabled": False}}).notes
    assert "Nothing configures scraping" in silent


# ---- the web endpoint: bind address, TLS, basic auth -----------------------------------------------------


def _set_args(r: Rendered, args: list[str]) -> None:
    r.pod["containers"][0]["args"] = args


def _probes(r: Rendered) -> dict[str, dict[str, Any]]:
    return {k: r.container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}


def test_plain_http_by_default(chart: helm.Chart) -> None:
    r = render(chart)
    assert not r.all("Secret")
    assert "--web.config.file" not in r.container["args"]
    assert {m["mountPath"] for m in r.container["volumeMounts"]}.isdisjoint(
        {"/etc/podnet-web", "/etc/podnet-web-tls", "/etc/podnet-web-client-ca"}
    )
    assert "checksum/web-config" not in r.pod_annotations
    assert "prometheus.io/scheme" not in r.pod_annotations
    for probe in _probes(r).values():
        assert "scheme" not in probe["httpGet"] and "host" not in probe["httpGet"]


@pytest.mark.parametrize(
    ("listen", "host_ip", "want"),
    [
        ("all", None, "0.0.0.0"),
        ("loopback", None, "127.0.0.1"),
        ("nodeIP", "10.0.3.7", "10.0.3.7"),
        ("nodeIP", "fd00:10::7", "fd00:10::7"),
    ],
)
def test_listen_modes_reach_the_exporter(
    chart: helm.Chart, tmp_path: Path, listen: str, host_ip: str | None, want: str
) -> None:
    r = render(chart, {"web": {"listen": listen}, "port": 9500})
    env = {e["name"]: e for e in r.container["env"]}
    if listen == "nodeIP":
        assert env["PODNET_HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
        assert "--listen=[$(PODNET_HOST_IP)]:9500" in r.container["args"]
        assert "listen" not in r.exporter_config  # the flag alone says it
        # What the kubelet does to $(VAR) in args, for an IPv4 and an IPv6 node.
        assert host_ip is not None
        _set_args(r, [a.replace("$(PODNET_HOST_IP)", host_ip) for a in r.container["args"]])
    else:
        assert "PODNET_HOST_IP" not in env
        assert not any(a.startswith("--listen") for a in r.container["args"])
    cfg = resolved(r, tmp_path)
    assert (cfg.listen_host, cfg.listen_port) == (want, 9500)
    for probe in _probes(r).values():  # the kubelet probes 127.0.0.1 only when nothing else listens
        assert probe["httpGet"].get("host") == ("127.0.0.1" if listen == "loopback" else None)
    annotations = r.pod_annotations
    assert ("prometheus.io/scrape" in annotations) == (listen != "loopback")
    assert ("127.0.0.1 only" in r.notes) == (listen == "loopback")


def test_tls_generates_the_web_config(chart: helm.Chart) -> None:
    r = render(chart, {"web": {**TLS["web"], "tls": {**TLS["web"]["tls"], "minVersion": "TLS13"}}})
    assert r.web_config == {
        "tls_server_config": {
            "cert_file": "/etc/podnet-web-tls/tls.crt",
            "key_file": "/etc/podnet-web-tls/tls.key",
            "client_auth_type": "NoClientCert",
            "min_version": "TLS13",
        }
    }
    args = r.container["args"]
    assert args[args.index("--web.config.file") + 1] == "/etc/podnet-web/web-config.yml"
    mounts = {m["mountPath"]: m for m in r.container["volumeMounts"]}
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    assert mounts["/etc/podnet-web"]["readOnly"] is True and mounts["/etc/podnet-web-tls"]["readOnly"] is True
    assert volumes[mounts["/etc/podnet-web"]["name"]]["secret"]["secretName"] == WEB_CONFIG_SECRET
    # Whole Secrets, never subPath: the kubelet then updates the files when the Secret changes.
    assert volumes[mounts["/etc/podnet-web-tls"]["name"]]["secret"] == {
        "secretName": "podnet-tls",
        "defaultMode": 0o400,
    }
    assert not any("subPath" in m for m in mounts.values())
    assert "/etc/podnet-web-client-ca" not in mounts
    for probe in _probes(r).values():
        assert probe["httpGet"]["scheme"] == "HTTPS"
    assert r.pod_annotations["prometheus.io/scheme"] == "https"
    assert re.fullmatch(r"[0-9a-f]{64}", r.pod_annotations["checksum/web-config"])


def test_basic_auth_users_are_hashes(chart: helm.Chart) -> None:
    r = render(chart, BASIC_AUTH)
    assert r.web_config == {"basic_auth_users": {"prometheus": HASH}}
    assert bcrypt.checkpw(b"s3cret", r.web_config["basic_auth_users"]["prometheus"].encode())
    assert "/etc/podnet-web-tls" not in {m["mountPath"] for m in r.container["volumeMounts"]}
    # /healthz and /readyz are not behind basic auth: the probes stay plain HTTP GETs.
    assert _probes(r) == _probes(render(chart))
    assert "prometheus.io/scheme" not in r.pod_annotations
    assert HASH not in json.dumps(r.get("ConfigMap", FULLNAME))  # the hashes are in the Secret only


def test_web_config_change_rolls_the_pods(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        return render(chart, values).pod_annotations["checksum/web-config"]

    one = checksum(BASIC_AUTH)
    assert checksum(BASIC_AUTH) == one
    assert checksum({"web": {"basicAuth": {"users": {"prometheus": HASH, "grafana": HASH}}}}) != one
    assert checksum({"web": {**TLS["web"], **BASIC_AUTH["web"]}}) != one
    assert checksum({**BASIC_AUTH, "podLabels": {"a": "b"}}) == one


@pytest.mark.parametrize("same_secret", [True, False], ids=["ca-in-tls-secret", "separate-ca-secret"])
def test_client_certificates(chart: helm.Chart, same_secret: bool) -> None:
    ca_secret = "podnet-tls" if same_secret else "scrapers-ca"
    values = {"web": {"tls": {**MTLS["web"]["tls"], "clientCASecretName": ca_secret}}}
    r = render(chart, values)
    tls = r.web_config["tls_server_config"]
    assert tls["client_auth_type"] == "RequireAndVerifyClientCert"
    mounts = {m["mountPath"]: m for m in r.container["volumeMounts"]}
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    if same_secret:
        assert tls["client_ca_file"] == "/etc/podnet-web-tls/ca.crt"
        assert "/etc/podnet-web-client-ca" not in mounts
    else:
        assert tls["client_ca_file"] == "/etc/podnet-web-client-ca/ca.crt"
        ca = volumes[mounts["/etc/podnet-web-client-ca"]["name"]]["secret"]
        assert ca["secretName"] == "scrapers-ca" and ca["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
        assert mounts["/etc/podnet-web-client-ca"]["readOnly"] is True
    # The kubelet has no client certificate: every HTTP probe becomes a TCP check on the same port.
    for probe in _probes(r).values():
        assert "httpGet" not in probe and probe["tcpSocket"] == {"port": "metrics"}
    assert "--cert and --key" in r.notes
    # A certificate only when given: the probes (which give none) still pass over HTTPS.
    optional = render(
        chart, {"web": {"tls": {**values["web"]["tls"], "clientAuthType": "VerifyClientCertIfGiven"}}}
    )
    for probe in _probes(optional).values():
        assert probe["httpGet"]["scheme"] == "HTTPS"


def test_probes_keep_what_the_user_set(chart: helm.Chart) -> None:
    r = render(
        chart,
        {
            "web": {"listen": "loopback", **TLS["web"]},
            "livenessProbe": {"httpGet": {"scheme": "HTTP", "host": "192.0.2.1"}},
            "readinessProbe": {"httpGet": None, "exec": {"command": ["true"]}},
            "startupProbe": None,
        },
    )
    assert r.container["livenessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "metrics",
        "scheme": "HTTP",
        "host": "192.0.2.1",
    }
    assert r.container["readinessProbe"]["exec"] == {"command": ["true"]}
    assert "httpGet" not in r.container["readinessProbe"] and "startupProbe" not in r.container
    mtls_loopback = render(chart, {"web": {"listen": "loopback", **MTLS["web"]}})
    for probe in _probes(mtls_loopback).values():
        assert probe["tcpSocket"] == {"port": "metrics", "host": "127.0.0.1"}


def test_existing_web_config_secret(chart: helm.Chart) -> None:
    r = render(chart, EXISTING_WEB)
    assert not r.all("Secret")  # nothing generated
    args = r.container["args"]
    assert args[args.index("--web.config.file") + 1] == "/etc/podnet-web/web-config.yml"
    mounts = {m["mountPath"]: m for m in r.container["volumeMounts"]}
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    # One directory holding the file and whatever it references by relative path.
    assert volumes[mounts["/etc/podnet-web"]["name"]]["secret"]["secretName"] == "podnet-web"
    assert "items" not in volumes[mounts["/etc/podnet-web"]["name"]]["secret"]
    assert mounts["/etc/podnet-web"]["readOnly"] is True
    assert "/etc/podnet-web-tls" not in mounts and "checksum/web-config" not in r.pod_annotations
    # web.tls.enabled describes the file: the probes and annotations follow it.
    for probe in _probes(r).values():
        assert probe["httpGet"]["scheme"] == "HTTPS"
    assert r.pod_annotations["prometheus.io/scheme"] == "https"
    plain = render(chart, {"web": {"existingConfigSecret": "podnet-web"}})  # basic auth only, say
    assert "--web.config.file" in plain.container["args"]
    for probe in _probes(plain).values():
        assert "scheme" not in probe["httpGet"]


@pytest.mark.parametrize("kind", ["serviceMonitor", "podMonitor"])
def test_monitors_scrape_with_tls_and_basic_auth(chart: helm.Chart, kind: str) -> None:
    key = "endpoints" if kind == "serviceMonitor" else "podMetricsEndpoints"
    kind_name = kind[0].upper() + kind[1:]
    tls_config = {"ca": {"secret": {"name": "podnet-tls", "key": "ca.crt"}}, "serverName": "podnet-exporter"}
    basic_auth = {
        "username": {"name": "podnet-scrape", "key": "username"},
        "password": {"name": "podnet-scrape", "key": "password"},
    }
    r = render(
        chart,
        {
            **{"web": {**TLS["web"], **BASIC_AUTH["web"]}},
            kind: {"enabled": True, "tlsConfig": tls_config, "basicAuth": basic_auth},
        },
    )
    (ep,) = r.get(kind_name)["spec"][key]
    assert set(ep) <= ENDPOINT_FIELDS
    assert (ep["scheme"], ep["tlsConfig"], ep["basicAuth"]) == ("https", tls_config, basic_auth)
    assert "no basicAuth credentials" not in r.notes
    # The scheme follows web.tls unless set; tlsConfig and basicAuth only when given.
    (plain,) = render(chart, {kind: {"enabled": True}}).get(kind_name)["spec"][key]
    assert plain["scheme"] == "http" and "tlsConfig" not in plain and "basicAuth" not in plain
    (forced,) = render(chart, {**TLS, kind: {"enabled": True, "scheme": "http"}}).get(kind_name)["spec"][key]
    assert forced["scheme"] == "http"
    assert "no basicAuth credentials" in render(chart, {**BASIC_AUTH, kind: {"enabled": True}}).notes


def test_generated_web_config_is_accepted_by_the_exporter(chart: helm.Chart, tmp_path: Path) -> None:
    """The rendered web-config.yml, its certificate paths pointed at real files, through the
    exporter's own loader (which builds the TLS context, so keys, values and files must all work)."""
    web_config = pytest.importorskip("exporter.export.web_config")
    sys.path.insert(0, str(REPO / "tests"))
    import certs  # lives in tests/: throwaway CAs made with the openssl CLI

    tls_dir, ca_dir = tmp_path / "tls", tmp_path / "client-ca"
    tls_dir.mkdir()
    ca_dir.mkdir()
    server_ca, client_ca = certs.make_ca(tls_dir, "server-ca"), certs.make_ca(ca_dir, "clients")
    leaf = certs.make_leaf(tls_dir, "podnet-exporter", server_ca, sans=["DNS:podnet-exporter"])
    leaf.cert.rename(tls_dir / "tls.crt")
    leaf.key.rename(tls_dir / "tls.key")
    client_ca.cert.rename(ca_dir / "ca.crt")
    values = {"web": {**MTLS["web"], **BASIC_AUTH["web"]}}
    rendered = render(chart, values).web_config_text
    config = rendered.replace("/etc/podnet-web-tls", str(tls_dir))
    config = config.replace("/etc/podnet-web-client-ca", str(ca_dir))
    path = tmp_path / "web-config.yml"
    path.write_text(config)
    loaded = web_config.load_web_config(str(path))
    assert loaded.tls is not None and loaded.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert loaded.tls.client_ca_file == str(ca_dir / "ca.crt")
    assert dict(loaded.basic_auth_users) == {"prometheus": HASH}
    assert loaded.ssl_context() is not None
    # And the exporter takes the flag the DaemonSet passes.
    r = render(chart, values)
    args = r.container["args"]
    args[args.index("--web.config.file") + 1] = str(path)
    _set_args(r, args)
    cfg = resolved(r, tmp_path)
    assert cfg.web_config_file == str(path)


def test_every_mode_lints(chart: helm.Chart) -> None:
    for name, values in WEB_MODES.items():
        report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], (name, report)


# ---- PrometheusRule (the alerts themselves are tested in test_alerts.py) ---------------------------------

RULE_FIELDS = {"alert", "record", "expr", "for", "labels", "annotations"}


def test_prometheus_rule(chart: helm.Chart) -> None:
    assert not render(chart).all("PrometheusRule")
    r = render(
        chart,
        {
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {
                "enabled": True,
                "namespace": "monitoring",
                "labels": {"release": "kube-prometheus-stack"},
                "rules": {"PodnetExporterErrors": {"severity": "info", "for": "1h"}},
                "additionalRules": [{"record": "podnet:pods:sum", "expr": "sum(podnet_exporter_pods)"}],
            },
        },
    )
    rule = r.get("PrometheusRule")
    assert rule["apiVersion"] == MONITORING
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(rule["spec"]) == {"groups"}
    (group,) = rule["spec"]["groups"]
    assert group["name"] == "podnet-exporter"
    alerts = {x["alert"]: x for x in group["rules"] if "alert" in x}
    assert set(alerts) == set(values_yaml()["prometheusRule"]["rules"])
    for name, alert in alerts.items():
        assert set(alert) <= RULE_FIELDS and name.startswith("Podnet")
        assert f'job="{FULLNAME}",namespace="{NAMESPACE}"' in alert["expr"], name
        assert {"summary", "description", "runbook_url"} <= set(alert["annotations"])
        assert alert["annotations"]["runbook_url"].endswith("/docs/HELM.md#" + name.lower())
    assert alerts["PodnetExporterErrors"]["labels"] == {"severity": "info"}
    assert alerts["PodnetExporterErrors"]["for"] == "1h"
    assert alerts["PodnetExporterAbsent"]["labels"] == {"severity": "critical"}
    assert group["rules"][-1] == {"record": "podnet:pods:sum", "expr": "sum(podnet_exporter_pods)"}
    assert "PrometheusRule" in r.notes


def test_prometheus_rule_selector(chart: helm.Chart) -> None:
    def exprs(values: dict[str, Any]) -> list[str]:
        rule = render(chart, {"prometheusRule": {"enabled": True}, **values}).get("PrometheusRule")
        return [x["expr"] for x in rule["spec"]["groups"][0]["rules"]]

    # A PodMonitor's job label is <its namespace>/<its name>.
    pod = exprs({"podMonitor": {"enabled": True, "namespace": "monitoring"}})
    assert all(f'job="monitoring/{FULLNAME}",namespace="{NAMESPACE}"' in e for e in pod)
    own = exprs({"prometheusRule": {"enabled": True, "selector": 'job="podnet"'}})
    assert own[0] == 'up{job="podnet"} == 0'
    off = exprs(
        {
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {
                "enabled": True,
                "runbookURL": "",
                "rules": {"PodnetExporterDown": {"enabled": False}},
            },
        }
    )
    assert not any(e.startswith("up{") and e.endswith("== 0") for e in off)


def test_prometheus_rule_thresholds_follow_the_settings(chart: helm.Chart) -> None:
    def alert(values: dict[str, Any], name: str) -> dict[str, Any]:
        rule = render(
            chart, {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}, **values}
        ).get("PrometheusRule")
        (found,) = [x for x in rule["spec"]["groups"][0]["rules"] if x.get("alert") == name]
        return dict(found)

    assert alert({}, "PodnetPollsStale")["expr"].endswith("> 120")  # never under two minutes
    assert alert({"config": {"pollInterval": 30}}, "PodnetPollsStale")["expr"].endswith("> 300")
    assert "[900s]" in alert({}, "PodnetOTLPExportFailing")["expr"]
    assert "[1800s]" in alert({"otlp": {"interval": 600}}, "PodnetOTLPExportFailing")["expr"]
    assert (
        "now 131072"
        in alert({"config": {"mapEntries": 131072}}, "PodnetMapUpdateFailures")["annotations"]["description"]
    )
    assert (
        "runbook_url"
        not in alert({"prometheusRule": {"enabled": True, "runbookURL": ""}}, "PodnetExporterDown")[
            "annotations"
        ]
    )


# ---- Grafana dashboards ----------------------------------------------------------------------------------


def test_dashboards_are_shipped_for_the_grafana_sidecar(chart: helm.Chart) -> None:
    sources = {p.name: p.read_text() for p in sorted((REPO / "dashboards").glob("*.json"))}
    r = render(chart)
    maps = [cm for cm in r.all("ConfigMap") if cm["metadata"]["name"] != FULLNAME]
    assert len(maps) == len(sources) == 2
    shipped: dict[str, str] = {}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == NAMESPACE
        assert "annotations" not in cm["metadata"]
        shipped.update(cm["data"])
    # The chart copies dashboards/*.json verbatim (test_dashboards.py checks the copies byte for byte).
    assert shipped == sources
    for text in shipped.values():
        json.loads(text)


def test_dashboard_settings(chart: helm.Chart) -> None:
    r = render(
        chart,
        {
            "dashboards": {
                "label": "grafana.com/dashboard",
                "labelValue": "podnet",
                "namespace": "grafana",
                "folder": "Network",
                "folderAnnotation": "k8s-sidecar-target-directory",
                "annotations": {"a": "b"},
            }
        },
    )
    maps = [cm for cm in r.all("ConfigMap") if cm["metadata"]["name"] != FULLNAME]
    assert len(maps) == 2
    for cm in maps:
        meta = cm["metadata"]
        assert (
            meta["labels"]["grafana.com/dashboard"] == "podnet" and "grafana_dashboard" not in meta["labels"]
        )
        assert meta["namespace"] == "grafana"
        assert meta["annotations"] == {"k8s-sidecar-target-directory": "Network", "a": "b"}
    assert [
        cm["metadata"]["name"] for cm in render(chart, {"dashboards": {"enabled": False}}).all("ConfigMap")
    ] == [FULLNAME]


def test_dashboard_configmaps_fit(chart: helm.Chart) -> None:
    for cm in render(chart).all("ConfigMap"):
        # 1 MiB is the ConfigMap limit; client-side kubectl apply stores a copy in a 256 KiB annotation.
        assert len(json.dumps(cm)) < 256 * 1024, cm["metadata"]["name"]


# ---- docs ------------------------------------------------------------------------------------------------


def test_docs_list_every_value() -> None:
    docs = (REPO / "docs" / "HELM.md").read_text()
    section = docs.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    table = {m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", section, re.M)}
    keys = set(leaf_keys(values_yaml()))
    assert keys - table == set(), "values missing from the docs/HELM.md values table"
    assert table - keys == set(), "docs/HELM.md documents values that do not exist"
    for cap in ("BPF", "PERFMON"):
        assert f"`{cap}`" in docs, cap
    for path in ("/sys/fs/cgroup", "/tmp", "/sys/kernel/btf/vmlinux", IMAGE_HEADERS):
        assert f"`{path}`" in docs, path
    # The removed values and mounts are explained where an upgrading user looks.
    upgrading = docs.split("\n## Upgrading\n", 1)[1].split("\n## ", 1)[0]
    for key, path in REMOVED_VALUES.items():
        assert f"`{key}`" in upgrading and f"`{path}`" in upgrading, key
        assert f"--set {key}=null" in upgrading, key
    assert "config.kernelHeaders" in upgrading and "extraVolumes" in upgrading
    assert "helm install podnet helm/podnet-exporter -n podnet --create-namespace" in docs


# ---- container image -------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comment lines dropped, as BuildKit does."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def test_dockerfile_base_image_is_debian_bookworm_slim() -> None:
    ins = dockerfile_instructions()
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
    stages: set[str] = set()
    for word, rest in ins:
        if word != "FROM":
            continue
        image = re.sub(r"--platform=\S+\s+", "", rest).split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        parts = rest.split()
        if image not in stages:
            assert image in ("debian:bookworm-slim", "debian:12-slim"), image
        if len(parts) >= 3 and parts[-2].upper() == "AS":
            stages.add(parts[-1])
    assert ins[-1] == ("CMD", '["run"]')


def test_dockerfile_installs_bcc_from_debian_only() -> None:
    text = " ".join(f"{w} {r}" for w, r in dockerfile_instructions())
    apt = re.search(r"apt-get install ([^&;]+)", text)
    assert apt, "no apt-get install"
    packages = {p for p in apt.group(1).split() if not p.startswith("-")}
    assert {"python3", "python3-venv", "python3-bpfcc"} <= packages
    # setup.sh is the reference for the host: the image needs a subset of its packages.
    setup = (REPO / "scripts" / "setup.sh").read_text()
    host = set(re.search(r"^pkgs=\(([^)]*)\)", setup, re.M).group(1).split())  # type: ignore[union-attr]
    assert packages <= host
    assert not re.search(r"pip3?\s+install[^&;]*\bbcc\b", text), (
        "never pip install bcc: PyPI's bcc is unrelated"
    )
    pyproject = (REPO / "pyproject.toml").read_text()
    assert not re.search(r'^\s*"bcc\b', pyproject, re.M)
    # The venv sees Debian's BCC through a symlink, exactly where scripts/setup.sh points it.
    bcc_src = re.search(r"^bcc_src=(\S+)", setup, re.M).group(1)  # type: ignore[union-attr]
    assert f"ln -s {bcc_src} " in text
    assert "import bcc, exporter" in text  # the build fails if either is not importable


def test_dockerfile_entrypoint_and_layout() -> None:
    ins = dockerfile_instructions()
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    words = dict(final)
    assert json.loads(words["ENTRYPOINT"]) == ["podnet-exporter"]
    assert json.loads(words["CMD"]) == ["run"]
    assert "podnet-exporter" in (REPO / "pyproject.toml").read_text()  # the console script
    assert words.get("USER", "root") == "root"  # BPF needs root with capabilities; see docs/HELM.md
    assert words["EXPOSE"] == "9436"
    env = dict(item.split("=", 1) for item in shlex.split(" ".join(r for w, r in final if w == "ENV")))
    copies = [shlex.split(r) for w, r in final if w == "COPY"]
    bpf_dest = next(c[-1] for c in copies if c[-2].rstrip("/") == "bpf")
    assert env["PODNET_BPF_DIR"].rstrip("/") == bpf_dest.rstrip("/")
    assert env["PATH"].startswith("/opt/podnet/venv/bin:")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # read-only root filesystem


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `path` out (last matching pattern wins, ! re-includes)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(f"{regex}(/.*)?", path):
            ignored = not negate
    return ignored


def test_dockerfile_copies_exist_and_are_in_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for word, rest in dockerfile_instructions():
        if word != "COPY" or "--from=" in rest:
            continue
        for src in shlex.split(rest)[:-1]:
            src = src.rstrip("/")
            assert (REPO / src).exists(), f"COPY {src}: missing from the repository"
            assert not _dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
            if (REPO / src).is_dir():
                for f in (REPO / src).rglob("*"):
                    rel = f.relative_to(REPO).as_posix()
                    if f.is_file() and "__pycache__" not in rel:
                        assert not _dockerignored(rel, patterns), rel
    for private in (".venv", ".git", "tests/kernel/podsim.py", "exporter/__pycache__/x.pyc"):
        assert _dockerignored(private, patterns), private


def test_runtime_default_seccomp_for_pod_and_container(chart: helm.Chart) -> None:
    r = render(chart)
    assert r.pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert r.container["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert r.container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON"]}
