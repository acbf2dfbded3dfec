#!/usr/bin/env python3
"""Cost of podnet on the data path, as a throughput ratio: the same workload with and
without the exporter attached, alternating, in one run (so both halves of a pair see the
same machine). Reports the median of per-pair ratios and each program's ns per event
from the kernel's bpf_stats.

    .venv/bin/python bench/tcp_overhead.py [--pairs N] [--seconds S] [--json OUT]

Workloads:
  pingpong  1-byte request/response over loopback on 4 connections (C, bench/pingpong.c):
            the worst case, the most probe events per byte;
  http      nginx serving a 1 KiB body over keep-alive to wrk (4 connections, 2 threads):
            a realistic service.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Exporter:
    def __init__(self, poll: float) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                "run",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--poll-interval",
                str(poll),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("exporter did not become ready")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def build_pingpong() -> str:
    out = os.path.join(tempfile.gettempdir(), "podnet-pingpong")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", out, str(REPO / "bench/pingpong.c")], check=True)
    return out


def pingpong_workload(binary: str, seconds: float) -> Callable[[], float]:
    def run() -> float:
        out = subprocess.run([binary, "4", str(seconds)], check=True, capture_output=True, text=True)
        return int(out.stdout.strip()) / seconds

    return run


class Nginx:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="podnet-bench-nginx-")
        self.port = free_port()
        Path(self.dir, "index.html").write_bytes(b"x" * 1024)
        conf = f"""
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  server {{ listen 127.0.0.1:{self.port}; root {self.dir}; }}
}}
"""
        Path(self.dir, "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen(
            ["nginx", "-c", f"{self.dir}/nginx.conf", "-p", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def wrk_workload(port: int, seconds: float) -> Callable[[], float]:
    def run() -> float:
        out = subprocess.run(
            ["wrk", "-t2", "-c4", f"-d{max(1, round(seconds))}s", f"http://127.0.0.1:{port}/index.html"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m:
            raise RuntimeError(out)
        return float(m.group(1))

    return run


def alternate(workload: Callable[[], float], pairs: int, poll: float) -> dict[str, object]:
    """Pairs of (without, with), the order flipped every pair so drift cancels."""
    ratios, off, on = [], [], []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        result: dict[bool, float] = {}
        for attached in order:
            exp = Exporter(poll) if attached else None
            try:
                result[attached] = workload()
            finally:
                if exp:
                    exp.stop()
        off.append(result[False])
        on.append(result[True])
        ratios.append(result[True] / result[False])
        print(
            f"  pair {i + 1}: without {result[False]:,.0f}/s  with {result[True]:,.0f}/s  "
            f"ratio {ratios[-1]:.3f}",
            flush=True,
        )
    return {"median_ratio": statistics.median(ratios), "ratios": ratios, "without": off, "with": on}


def program_costs(workload: Callable[[], float], poll: float) -> dict[str, float]:
    """ns per event per program, from bpf_stats (enabled only for this run: it adds its own
    overhead, so it is kept out of the throughput pairs)."""
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = stats.read_text().strip()
    stats.write_text("1")
    exp = Exporter(poll)
    try:
        workload()
        time.sleep(poll * 2.5)
        text = exp.metrics()
    finally:
        exp.stop()
        stats.write_text(old)
    seconds = dict(re.findall(r'podnet_exporter_bpf_run_seconds_total\{program="(\w+)"\} (\S+)', text))
    runs = dict(re.findall(r'podnet_exporter_bpf_runs_total\{program="(\w+)"\} (\S+)', text))
    return {p: float(seconds[p]) * 1e9 / float(runs[p]) for p in seconds if float(runs.get(p, 0)) > 0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--poll", type=float, default=5.0)
    ap.add_argument("--json", default="")
    ap.add_argument("--skip-http", action="store_true")
    a = ap.parse_args()
    report: dict[str, object] = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "pairs": a.pairs,
        "seconds": a.seconds,
        "poll_interval": a.poll,
    }
    pp = pingpong_workload(build_pingpong(), a.seconds)
    print("pingpong: 1-byte request/response, 4 connections, loopback")
    report["pingpong"] = alternate(pp, a.pairs, a.poll)
    report["pingpong_ns_per_event"] = program_costs(pp, min(a.poll, 1.0))
    if not a.skip_http:
        if shutil.which("nginx") is None or shutil.which("wrk") is None:
            print("http: skipped (apt-get install nginx-light wrk)")
        else:
            nginx = Nginx()
            try:
                print("http: nginx 1 KiB keep-alive, wrk 2 threads 4 connections")
                wl = wrk_workload(nginx.port, a.seconds)
                report["http"] = alternate(wl, a.pairs, a.poll)
                report["http_ns_per_event"] = program_costs(wl, min(a.poll, 1.0))
            finally:
                nginx.stop()
    summary = {k: v["median_ratio"] for k, v in report.items() if isinstance(v, dict) and "median_ratio" in v}
    print(
        json.dumps(
            {
                "median_ratio": summary,
                "ns_per_event": {k: v for k, v in report.items() if k.endswith("ns_per_event")},
            },
            indent=2,
        )
    )
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
