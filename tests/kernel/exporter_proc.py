"""Runs the real exporter (`python -m exporter run`) as a child process and scrapes it."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Scrape:
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]
    text: str

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0 when none)."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= set(ls))

    def series(self, name: str, **labels: str) -> list[dict[str, str]]:
        want = set(labels.items())
        return [dict(ls) for (n, ls) in self.samples if n == name and want <= set(ls)]


def parse(text: str) -> Scrape:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return Scrape(samples, text)


PIN_ROOT = "/sys/fs/bpf/podnet-test"


class ExporterProcess:
    """`state`: where the exporter pins its maps and saves its totals; by default a
    directory of its own, removed (programs detached) by stop(). Pass one to share it
    between runs (a restart) and remove it with reset()."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
        state: tuple[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"podnet-exporter-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.owns_state = state is None and "--pin-dir" not in args
        self.state = state or new_state_dirs()
        pins = [] if "--pin-dir" in args else ["--pin-dir", self.state[0], "--state-dir", self.state[1]]
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "exporter",
            "run",
            "--listen",
            f"127.0.0.1:{self.port}",
            *pins,
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.url = f"{'https' if tls is not None else 'http'}://127.0.0.1:{self.port}"
        self.tls = tls
        """The client context for an exporter serving TLS (--web.config.file)."""
        self.headers = dict(headers or {})
        """Sent with every request (basic auth)."""

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, headers={**self.headers, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.tls) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited {self.proc.returncode}: {self.log()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"exporter not ready after {timeout}s: {self.log()}")

    def scrape(self) -> Scrape:
        status, _, body = self.get("/metrics")
        assert status == 200, body
        return parse(body.decode())

    def fresh_scrape(self, polls: int = 2, timeout: float = 30) -> Scrape:
        return fresh_scrape(self.scrape, polls, timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self.owns_state:
            reset(self.state)
        return self.proc.returncode


def fresh_scrape(scrape: Callable[[], Scrape], polls: int = 2, timeout: float = 30) -> Scrape:
    """A scrape from a poll that started after this call: wait until the poll counter
    advanced by `polls` (one may have been under way when called)."""
    start = scrape().value("podnet_exporter_polls_total")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = scrape()
        if s.value("podnet_exporter_polls_total") >= start + polls:
            return s
        time.sleep(0.05)
    raise TimeoutError("exporter stopped polling")


def rss_kib(pid: int) -> int:
    """A process's resident memory (VmRSS), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def new_state_dirs() -> tuple[str, str]:
    """(pin dir, state dir) of one exporter's state, unique to it."""
    import tempfile
    import uuid

    os.makedirs(PIN_ROOT, exist_ok=True)
    return os.path.join(PIN_ROOT, uuid.uuid4().hex[:12]), tempfile.mkdtemp(prefix="podnet-state-")


def reset(state: tuple[str, str]) -> None:
    """Remove pinned maps and links (detaching their programs) and saved totals."""
    import shutil

    shutil.rmtree(state[0], ignore_errors=True)
    shutil.rmtree(state[1], ignore_errors=True)
