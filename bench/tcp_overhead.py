#!/usr/bin/env python3
"""Cost of podnet on the data path, as a throughput ratio: the same workload with and
without the exporter attached, alternating, in one run (so both halves of a pair see the
same machine). Reports the median of per-pair ratios and each program's ns per event
from the kernel's bpf_stats.

    .venv/bin/python bench/tcp_overhead.py [--pairs N] [--seconds S] [--json OUT]
        [--configs full,turns,no-requests,floor]

Configurations ("with" side of each pair):
  full         podnet-exporter run, default settings (requests tracked, HTTP recognised);
  turns        podnet-exporter run --requests turns (requests tracked, payloads not read);
  no-requests  podnet-exporter run --requests off (the TCP data plane alone);
  floor        no exporter: empty programs on the hot path's two tracepoints
               (bench/empty.bpf.c, loaded as podnet loads its own): the cost of the hooks
               themselves, which no program body can go below.

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
from typing import TYPE_CHECKING, Any

from nginx_bench import start_nginx

if TYPE_CHECKING:
    from exporter.kernel.programs import RequestMode

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Exporter:
    SETTLE = 8.0

    def __init__(self, poll: float, extra: tuple[str, ...] = ()) -> None:
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
                # Measured "without" runs need the programs gone when it stops: no pins.
                "--pin-dir",
                "none",
                *extra,
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
                        # Steady state, not start-up: right after BCC's compiler ran at
                        # full speed for seconds, this VM's CPUs stay measurably slower
                        # for several more (a 2 s settle cost the next HTTP run ~10%).
                        time.sleep(self.SETTLE)
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


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


class Nginx:
    def __init__(self, cpu: int | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="podnet-bench-nginx-")
        self.port = free_port()
        Path(self.dir, "index.html").write_bytes(b"x" * 1024)
        http = f"""
  access_log off;
  keepalive_requests 100000000;
  server {{ listen 127.0.0.1:{self.port}; root {self.dir}; }}"""
        self.proc = start_nginx(self.dir, http, prefix=pinned(cpu, []))
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


def wrk_workload(
    port: int, seconds: float, threads: int = 2, connections: int = 4, cpu: int | None = None
) -> Callable[[], float]:
    def run() -> float:
        out = subprocess.run(
            pinned(
                cpu,
                [
                    "wrk",
                    f"-t{threads}",
                    f"-c{connections}",
                    f"-d{max(1, round(seconds))}s",
                    f"http://127.0.0.1:{port}/index.html",
                ],
            ),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m:
            raise RuntimeError(out)
        return float(m.group(1))

    return run


class EmptyPrograms:
    """The floor: empty tp_btf programs on the hot path's tracepoints, attached per run."""

    HOOKS = ("sock_send_length", "sock_recv_length")

    def __init__(self) -> None:
        sys.path.insert(0, str(REPO))
        from bcc import BPF

        from exporter.kernel.bpf_syscall import load_tp_btf
        from exporter.kernel.btf import Btf
        from exporter.kernel.headers import find_tree

        btf = Btf.load()
        headers = find_tree()
        if not headers.ok:
            raise SystemExit(headers.reason)
        headers.use()
        self._bpf = BPF(src_file=str(REPO / "bench/empty.bpf.c").encode(), cflags=["-w"])
        self._progs = []
        for tp in self.HOOKS:
            type_id = btf.tracepoint_type_id(tp)
            assert type_id is not None, tp
            self._progs.append(load_tp_btf(self._bpf, f"on_{tp}", type_id))
        self._links: list[int] = []

    def attach(self) -> None:
        from exporter.kernel.bpf_syscall import attach_tp_btf

        self._links = [attach_tp_btf(fd) for fd in self._progs]

    def stop(self) -> None:
        for fd in self._links:
            os.close(fd)
        self._links = []


CONFIGS: dict[str, tuple[str, ...]] = {
    "full": (),
    "turns": ("--requests", "turns"),
    "no-requests": ("--requests", "off"),
}
BUILDS: dict[str, dict[str, Any]] = {
    "full": {},
    "turns": {"requests": "turns"},
    "no-requests": {"requests": "off"},
    "raw": {"tp_btf": False},
    "raw no-requests": {"tp_btf": False, "requests": "off"},
}


class LoadedBuild:
    """The exporter's own programs (exporter.kernel.programs.load_programs, every program), loaded
    in this process once; the two hot hooks are attached only while measured, the rest
    (per-connection events) stay attached."""

    HOT = ("sock_send_length", "sock_recv_length")

    def __init__(
        self, requests: RequestMode = "http", tp_btf: bool = True, only_hot_path: bool = False
    ) -> None:
        sys.path.insert(0, str(REPO))
        from exporter.kernel.btf import Btf
        from exporter.kernel.offsets import resolve_offsets
        from exporter.kernel.programs import PROGRAMS, MapSizes, load_programs

        btf = Btf.load()
        specs = [p for p in PROGRAMS if p.name == "tcp_traffic"] if only_hot_path else PROGRAMS
        self.progs = load_programs(
            btf, resolve_offsets(btf), MapSizes(), specs, requests=requests, tp_btf=tp_btf
        )
        self._links: list[int] = []
        if self.progs.tp_btf:
            for h in self.HOT:
                prog_fd, link_fd = self.progs.tp_btf[h]
                os.close(link_fd)
                # Closed here: keep the loader from closing that number again later.
                self.progs.tp_btf[h] = (prog_fd, -1)
        else:
            for h in self.HOT:
                self.progs.objects["tcp_traffic"].detach_raw_tracepoint(tp=h.encode())

    def attach(self) -> None:
        from exporter.kernel.bpf_syscall import attach_tp_btf

        if self.progs.tp_btf:
            self._links = [attach_tp_btf(self.progs.tp_btf[h][0]) for h in self.HOT]
            return
        for h in self.HOT:
            self.progs.objects["tcp_traffic"].attach_raw_tracepoint(tp=h.encode(), fn_name=f"on_{h}".encode())

    def stop(self) -> None:
        if self.progs.tp_btf:
            for fd in self._links:
                os.close(fd)
            self._links = []
            return
        for h in self.HOT:
            self.progs.objects["tcp_traffic"].detach_raw_tracepoint(tp=h.encode())


Subject = Exporter | EmptyPrograms | LoadedBuild


def attach(config: str, poll: float, subjects: dict[str, Any]) -> Subject:
    """Start what the "with" side of a pair measures: an in-process subject (floor, or a
    build loaded by --method inproc), else a fresh exporter process."""
    subject = subjects.get(config)
    if subject is not None:
        subject.attach()
        return subject  # type: ignore[no-any-return]
    return Exporter(poll, CONFIGS[config])


def busy_cpu_seconds() -> float:
    """CPU time spent not idle, all CPUs together (/proc/stat: user, nice, system, irq,
    softirq; time stolen by the hypervisor is not the workload's)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def measured(workload: Callable[[], float]) -> tuple[float, float]:
    """(operations per second, busy CPU seconds per operation) of one run."""
    cpu0, t0 = busy_cpu_seconds(), time.monotonic()
    rate = workload()
    cpu, wall = busy_cpu_seconds() - cpu0, time.monotonic() - t0
    return rate, cpu / (rate * wall)


def alternate(
    workload: Callable[[], float],
    pairs: int,
    poll: float,
    config: str = "full",
    subjects: dict[str, Any] | None = None,
) -> dict[str, object]:
    """Pairs of (without, with), the order flipped every pair so drift cancels. Besides the
    throughput ratio, the ratio of busy CPU time per operation (with / without): where the
    CPUs have time to spare the data path costs CPU time rather than throughput."""
    ratios, cpu_ratios, off, on = [], [], [], []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        result: dict[bool, tuple[float, float]] = {}
        for attached in order:
            exp = attach(config, poll, subjects or {}) if attached else None
            try:
                result[attached] = measured(workload)
            finally:
                if exp:
                    exp.stop()
        off.append(result[False][0])
        on.append(result[True][0])
        ratios.append(result[True][0] / result[False][0])
        cpu_ratios.append(result[True][1] / result[False][1])
        print(
            f"  pair {i + 1}: without {result[False][0]:,.0f}/s  with {result[True][0]:,.0f}/s  "
            f"ratio {ratios[-1]:.3f}  CPU per op {cpu_ratios[-1]:.3f}",
            flush=True,
        )
    return {
        "median_ratio": statistics.median(ratios),
        "quartiles": quartiles(ratios),
        "median_cpu_per_op_ratio": statistics.median(cpu_ratios),
        "cpu_per_op_quartiles": quartiles(cpu_ratios),
        "ratios": ratios,
        "cpu_per_op_ratios": cpu_ratios,
        "without": off,
        "with": on,
    }


def quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def program_costs(workload: Callable[[], float], poll: float, config: str = "full") -> dict[str, float]:
    """ns per event per program, from bpf_stats (enabled only for this run: it adds its own
    overhead, so it is kept out of the throughput pairs)."""
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = stats.read_text().strip()
    stats.write_text("1")
    exp = Exporter(poll, CONFIGS[config])
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


def run_workload(wl: Callable[[], float], a: argparse.Namespace, subjects: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for config in a.configs:
        print(f"  {config}:", flush=True)
        out[config] = alternate(wl, a.pairs, a.poll, config, subjects)
        if config in CONFIGS and not a.skip_costs:
            out[f"{config}_ns_per_event"] = program_costs(wl, min(a.poll, 1.0), config)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--poll", type=float, default=5.0)
    ap.add_argument("--json", default="")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--configs", default="full,turns,no-requests,floor", type=lambda v: v.split(","))
    ap.add_argument(
        "--method",
        choices=("inproc", "process"),
        default="inproc",
        help="inproc: the exporter's programs loaded here and attached per run (fast "
        "alternation, data path only); process: a podnet-exporter process started per run",
    )
    ap.add_argument("--skip-costs", action="store_true", help="no bpf_stats run per configuration")
    ap.add_argument("--skip-pingpong", action="store_true")
    ap.add_argument(
        "--wrk",
        default=(2, 4),
        type=lambda v: tuple(int(x) for x in v.split(",")),
        help="wrk threads,connections (default 2,4; 1,2 leaves each side a CPU: steadier)",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="nginx on CPU 0, wrk on CPU 1: with enough connections both stay busy, and "
        "no thread migrates between them (steadier than unpinned saturation)",
    )
    a = ap.parse_args()
    unknown = set(a.configs) - {*BUILDS, "floor"}
    if unknown:
        ap.error(f"unknown configuration {sorted(unknown)[0]}; choose from {', '.join([*BUILDS, 'floor'])}")
    if a.method == "process" and set(a.configs) - {*CONFIGS, "floor"}:
        ap.error("--method process measures full, turns, no-requests and floor only")
    report: dict[str, object] = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "pairs": a.pairs,
        "seconds": a.seconds,
        "poll_interval": a.poll,
        "wrk": list(a.wrk),
        "pinned": a.pin,
    }
    subjects: dict[str, Any] = {}
    if "floor" in a.configs:
        subjects["floor"] = EmptyPrograms()
    if a.method == "inproc":
        subjects.update({c: LoadedBuild(**BUILDS[c]) for c in a.configs if c in BUILDS})
    report["method"] = a.method
    if not a.skip_pingpong:
        pp = pingpong_workload(build_pingpong(), a.seconds)
        print("pingpong: 1-byte request/response, 4 connections, loopback")
        report["pingpong"] = run_workload(pp, a, subjects)
    if not a.skip_http:
        if shutil.which("nginx") is None or shutil.which("wrk") is None:
            print("http: skipped (apt-get install nginx-light wrk)")
        else:
            nginx = Nginx(0 if a.pin else None)
            try:
                t, c = a.wrk
                where = ", nginx on CPU 0, wrk on CPU 1" if a.pin else ""
                print(f"http: nginx 1 KiB keep-alive, wrk {t} threads {c} connections{where}")
                wl = wrk_workload(nginx.port, a.seconds, t, c, 1 if a.pin else None)
                report["http"] = run_workload(wl, a, subjects)
            finally:
                nginx.stop()

    # "workload/configuration" -> that configuration's results (or its ns per event)
    flat = {f"{w}/{c}": v for w, per in report.items() if isinstance(per, dict) for c, v in per.items()}
    pairs = {k: v for k, v in flat.items() if isinstance(v, dict) and "median_ratio" in v}
    summary = {k: v["median_ratio"] for k, v in pairs.items()}
    cpu = {k: v["median_cpu_per_op_ratio"] for k, v in pairs.items()}
    costs = {k: v for k, v in flat.items() if k.endswith("ns_per_event")}
    medians = {"median_ratio": summary, "median_cpu_per_op_ratio": cpu, "ns_per_event": costs}
    print(json.dumps(medians, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
