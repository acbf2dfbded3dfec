"""HTTP/2 cleartext (h2c, prior knowledge) ground truth for kernel tests: Debian's nginx as the
server, nghttp (many URLs on one connection) and curl (one URL) as clients, all run in pods.

nginx counts what it served in its access log, one line per request (per HTTP/2 stream):
    <status> <method> <protocol> <uri> <connection serial> <request number on that connection>
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podsim import SimPod, wait_for_file

NGINX = "/usr/sbin/nginx"
NGHTTP = "/usr/bin/nghttp"
CURL = "/usr/bin/curl"

# Path -> status nginx answers it with (any method: `return` does not look at it).
LOCATIONS = {"/ok": 200, "/created": 201, "/moved": 301, "/missing": 404, "/boom": 500, "/busy": 503}


@dataclass(frozen=True)
class Served:
    """One access log line."""

    status: int
    method: str
    protocol: str
    uri: str
    connection: int
    number: int  # $connection_requests: the request's number on its connection


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Nginx:
    """nginx in `pod`, serving h2c on `port` from a directory of its own (config, logs, pid, temp
    files), in one process (no master, no daemon) so that it stays in the pod's cgroup and dies
    with it; with a `leaf` certificate also HTTP/1.1 over TLS on `tls_port` and HTTP/2 over TLS
    (ALPN h2) on `tls_h2_port`. `stop()` before reading the access log: every request is logged
    by then."""

    def __init__(
        self,
        pod: SimPod,
        port: int | None = None,
        *,
        leaf: Any = None,
        tls_port: int | None = None,
        tls_h2_port: int | None = None,
    ) -> None:
        self.pod = pod
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="podnet-h2-nginx-")
        os.chmod(self.dir, 0o755)
        self.access_log = Path(self.dir, "access.log")
        self.error_log = Path(self.dir, "error.log")
        pid = Path(self.dir, "nginx.pid")
        locations = "\n".join(
            f'    location = {path} {{ return {code} "{path.lstrip("/")}\\n"; }}'
            if code < 300 or code >= 400
            else f"    location = {path} {{ return {code} /ok; }}"
            for path, code in LOCATIONS.items()
        )
        temp = "\n".join(
            f"  {kind}_temp_path {self.dir}/{kind}_temp;"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        listens = [f"    listen {port} http2 default_server;"] if port else []
        if leaf is not None:
            listens += [f"    ssl_certificate {leaf.cert};", f"    ssl_certificate_key {leaf.key};"]
            listens += [f"    listen {tls_port} ssl default_server;"] if tls_port else []
            listens += [f"    listen {tls_h2_port} ssl http2 default_server;"] if tls_h2_port else []
        listens_text = "\n".join(listens)
        conf = f"""
daemon off;
master_process off;
worker_processes 1;
pid {pid};
error_log {self.error_log} info;
events {{ worker_connections 1024; }}
http {{
  log_format podnet '$status $request_method $server_protocol $request_uri $connection $connection_requests';
  access_log {self.access_log} podnet;
{temp}
  http2_max_concurrent_streams 256;
  keepalive_requests 100000;
  server {{
{listens_text}
    server_name _;
    root {self.dir}/www;
{locations}
  }}
}}
"""
        Path(self.dir, "www").mkdir()
        Path(self.dir, "nginx.conf").write_text(conf)
        self.proc = pod.popen(
            [NGINX, "-p", self.dir + "/", "-c", f"{self.dir}/nginx.conf", "-e", str(self.error_log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # The pid file is written after the listening socket is bound.
        wait_for_file(str(pid), proc=self.proc)

    def stop(self) -> None:
        """Stop nginx gracefully (SIGQUIT: finish, log and close what is open); idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def served(self) -> list[Served]:
        out = []
        for line in self.access_log.read_text().splitlines():
            status, method, protocol, uri, conn, number = line.split()
            out.append(Served(int(status), method, protocol, uri, int(conn), int(number)))
        return out

    def errors(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def counts(served: list[Served]) -> Counter[tuple[str, str]]:
    """(method, status class) -> requests, from the access log."""
    return Counter((s.method, status_class(s.status)) for s in served)


def nghttp(pod: SimPod, urls: list[str], data: str | None = None, method: str | None = None) -> list[int]:
    """GET (POST with `data`, a file; or `method`) every URL on ONE h2c connection, all streams at
    once; the response statuses as nghttp saw them (from its HAR output), in request order."""
    argv = [NGHTTP, "-n", "--har=-"]
    if data is not None:
        argv += ["-d", data]
    if method is not None:
        argv += ["-H", f":method: {method}"]
    r = pod.run([*argv, *urls], timeout=60)
    har: dict[str, Any] = json.loads(r.stdout)
    entries = har["log"]["entries"]
    assert len(entries) == len(urls), r.stdout
    return [int(e["response"]["status"]) for e in entries]


def curl_h2c(pod: SimPod, url: str, method: str = "GET") -> int:
    """One request over h2c prior knowledge; its status as curl saw it (the protocol checked)."""
    r = pod.run(
        [CURL, "-sS", "--http2-prior-knowledge", "-X", method, "-o", "/dev/null",
         "-w", "%{http_version} %{response_code}", url],
        timeout=30,
    )  # fmt: skip
    version, code = r.stdout.decode().split()
    assert version == "2", r.stdout
    return int(code)
