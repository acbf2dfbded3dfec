"""/metrics locked the Prometheus way (--web.config.file, the exporter-toolkit format), end to
end: the real exporter serves TLS with a required client certificate and basic auth, and the
real Prometheus server scrapes it. A wrong password is refused with 401 (Prometheus reads
up == 0), as is a client without a certificate. A renewed certificate is served without a
restart; a broken config file is refused, counted, and the one in force stays. No password
appears in any output."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
import yaml
from exporter_proc import ExporterProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from certs import Pair, make_ca, make_leaf  # lives in tests/, shared with the unit tests
from prometheus_server import Prometheus

pytestmark = pytest.mark.kernel

USER = "prometheus"
PASSWORD = "pn-scrape-Secr3t-7d1f"
WRONG = "pn-wrong-Passw0rd-9c2e"
TIMEOUT = 60.0


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def client_context(ca: Pair, cert: Pair | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def write_web_config(path: Path, server: Pair, ca: Pair | None, users: dict[str, str]) -> None:
    tls: dict[str, object] = {"cert_file": server.cert.name, "key_file": server.key.name}
    if ca is not None:
        tls |= {"client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": ca.cert.name}
    config: dict[str, object] = {"tls_server_config": tls}
    if users:
        config["basic_auth_users"] = users
    path.write_text(yaml.safe_dump(config))


def served_cert(port: int, ca: Pair) -> bytes:
    """The DER certificate a new TLS handshake with the exporter presents."""
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # this probe only looks at what is served
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def anonymous(exp: ExporterProcess, path: str) -> int:
    """The status of a request with the exporter's client certificate but no password."""
    try:
        with urllib.request.urlopen(exp.url + path, timeout=10, context=exp.tls) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def der_of(pair: Pair) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pair.cert.read_text())


def test_prometheus_scrapes_over_tls_with_basic_auth(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package prometheus; scripts/setup.sh --test)")
    ca = make_ca(tmp_path, "podnet-ca")
    server = make_leaf(tmp_path, "server", ca, ["IP:127.0.0.1", "DNS:localhost"])
    scraper = make_leaf(tmp_path, "scraper", ca, ["DNS:prometheus.monitoring.svc"], usage="clientAuth")
    stranger_ca = make_ca(tmp_path, "stranger-ca")
    stranger = make_leaf(tmp_path, "stranger", stranger_ca, ["DNS:stranger"], usage="clientAuth")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=6)).decode()
    web = tmp_path / "web-config.yml"
    write_web_config(web, server, ca, {USER: hashed})

    exp = ExporterProcess(
        ["--web.config.file", str(web), "--pin-dir", "none"],
        tls=client_context(ca, scraper),
        headers=basic(USER, PASSWORD),
    )
    prom = None
    try:
        exp.wait_ready()
        assert "serving /metrics on https://127.0.0.1" in exp.log()
        status, _, body = exp.get("/metrics")
        assert status == 200 and b"podnet_exporter_polls_total" in body
        # A wrong password and none at all: 401, asking for basic auth.
        for headers in (basic(USER, WRONG), basic("intruder", PASSWORD), {"Authorization": ""}):
            status, got, _ = exp.get("/metrics", headers=headers)
            assert status == 401, headers
            assert got.get("WWW-Authenticate", "").startswith("Basic")
        # Probes need no password (kubelet sends none), but still TLS and the client certificate.
        assert anonymous(exp, "/healthz") == 200
        assert anonymous(exp, "/readyz") == 200
        assert anonymous(exp, "/metrics") == 401
        # Without a client certificate, or with one from another CA, no TLS session at all.
        for ctx in (client_context(ca, None), client_context(ca, stranger)):
            req = urllib.request.Request(exp.url + "/healthz")
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                urllib.request.urlopen(req, timeout=10, context=ctx).read()
        # Plain HTTP on the TLS port gets nothing.
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{exp.port}/metrics", timeout=10).read()

        (tmp_path / "password").write_text(PASSWORD)
        (tmp_path / "wrong").write_text(WRONG)
        tls_config = {
            "ca_file": str(ca.cert),
            "cert_file": str(scraper.cert),
            "key_file": str(scraper.key),
        }
        target = {"targets": [f"127.0.0.1:{exp.port}"]}

        def job(name: str, password_file: str, tls: dict[str, str]) -> dict[str, object]:
            return {
                "job_name": name,
                "scheme": "https",
                "tls_config": tls,
                "basic_auth": {"username": USER, "password_file": str(tmp_path / password_file)},
                "static_configs": [target],
            }

        no_cert = {"ca_file": str(ca.cert)}
        prom = Prometheus(
            tmp_path,
            [
                job("podnet", "password", tls_config),
                job("podnet-wrong-password", "wrong", tls_config),
                job("podnet-no-client-cert", "password", no_cert),
            ],
        )
        prom.wait_ready()
        prom.wait_for('up{job="podnet"}', 1.0)
        prom.wait_for('up{job="podnet-wrong-password"}', 0.0)
        prom.wait_for('up{job="podnet-no-client-cert"}', 0.0)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if prom.value('podnet_exporter_polls_total{job="podnet"}'):
                break
            time.sleep(0.2)
        assert prom.value('podnet_exporter_polls_total{job="podnet"}'), "no podnet series scraped over TLS"
        errors = {t["labels"]["job"]: t["lastError"] for t in prom.get("/api/v1/targets")["activeTargets"]}
        assert "401" in errors["podnet-wrong-password"], errors
        assert errors["podnet"] == "", errors
        assert errors["podnet-no-client-cert"], errors
        # The refusals are counted: the wrong-password job's scrapes and the requests above.
        refused = prom.value('podnet_exporter_http_requests_total{job="podnet",handler="metrics",code="401"}')
        assert refused is not None and refused >= 4, refused
        for output in (exp.log(), prom.log()):
            assert PASSWORD not in output and hashed not in output
    finally:
        if prom is not None:
            prom.stop()
        exp.stop()
    assert PASSWORD not in Path(exp.log_path).read_text(errors="replace")


def test_renewed_certificate_is_served_without_restart(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "podnet-ca")
    server = make_leaf(tmp_path, "server", ca, ["IP:127.0.0.1"])
    renewed = make_leaf(tmp_path, "renewed", ca, ["IP:127.0.0.1"])
    web = tmp_path / "web-config.yml"
    write_web_config(web, server, None, {})
    exp = ExporterProcess(["--web.config.file", str(web), "--pin-dir", "none"], tls=client_context(ca, None))
    try:
        exp.wait_ready()
        assert served_cert(exp.port, ca) == der_of(server)

        # A broken edit of the config file is refused, counted, and the one in force stays.
        web.write_text("tls_server_config: [not, a, mapping]\n")
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if exp.scrape().value("podnet_exporter_errors_total", stage="web_config") >= 1:
                break
            time.sleep(0.2)
        assert exp.scrape().value("podnet_exporter_errors_total", stage="web_config") >= 1, exp.log()
        assert f"web config file {web}" in exp.log()
        assert served_cert(exp.port, ca) == der_of(server)
        write_web_config(web, server, None, {})

        # A renewed certificate (as cert-manager writes it into the Secret) is used by new
        # connections, with no restart.
        for part in ("key", "cert"):
            staged = tmp_path / f"staged.{part}"
            shutil.copy(getattr(renewed, part), staged)
            os.replace(staged, getattr(server, part))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and served_cert(exp.port, ca) != der_of(renewed):
            time.sleep(0.2)
        assert served_cert(exp.port, ca) == der_of(renewed), exp.log()
        assert exp.get("/metrics")[0] == 200
        assert exp.proc.poll() is None
    finally:
        exp.stop()
