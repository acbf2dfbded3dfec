#!/usr/bin/env python3
"""What HTTP/2 and gRPC recognition costs per request: kernel run time of the hot path per
request served, and the throughput ratio with / without, for each request mode.

    .venv/bin/python bench/h2_cost.py [--workloads h2,grpc,h1] [--modes http,http1,off]
        [--rounds N] [--json OUT]

Builds (`podnet-exporter run --requests MODE` builds them): `http` (the default: HTTP/1.x
and HTTP/2 recognised, HTTP/2 payloads walked frame by frame by the tail-called walkers
h2_walk_on_sent / h2_walk_on_received), `http1` (HTTP/1.x recognised, HTTP/2 connections
counted as turns, no walker), `off` (the TCP data plane alone). Like tcp_overhead.py's
--method inproc, the exporter's own tcp_traffic programs are loaded in this process
(exporter.kernel.programs.load_programs, each build once); the two hot hooks are attached
only while measured.

Workloads (client and server both on this host, so both ends' events are counted):
  h2    nginx, h2c (`listen ... http2`, `return 200 "ok"`), driven by h2load: 4 connections,
        10 streams in flight on each (many streams per connection);
  grpc  the grpcio server and client of tests/kernel/h2_actions.py: unary calls on one
        channel (one connection), 100 in flight;
  h1    the same nginx on a plain port, HTTP/1.1 keep-alive, driven by h2load --h1 (the
        same client and server as h2, so the two differ only in the protocol).

Two measurements per workload:
  1. ns per request (the robust figure): kernel.bpf_stats_enabled=1 for this phase only
     (restored after), one run per build; the run time of the hooks (sock_send_length,
     sock_recv_length) over the run divided by the requests the client completed. The kernel
     accounts a tail-called program's time to the program that was entered (its own
     run_time_ns/run_cnt do not move), so the walkers' time is inside the hooks' figure;
     the walkers' share is read as the difference between `http` and `http1`. bpf_stats adds
     its own ~55 ns per hook run (included). Each stats run also checks what the build
     counted (request_hist, map_update_failures) against the client's count.
  2. throughput ratio (noisy on a shared 2-vCPU VM): rounds of one run without programs and
     one run with each build, in shuffled order; ratio = with / without of the same round,
     median over rounds with quartiles.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from nginx_bench import start_nginx  # noqa: E402
from tcp_overhead import LoadedBuild, busy_cpu_seconds, free_port, quartiles  # noqa: E402

HOOKS = ("sock_send_length", "sock_recv_length")
WALKERS = ("h2_walk_on_sent", "h2_walk_on_received")
PROTOCOLS = {1: "other", 2: "http", 3: "http2", 4: "grpc"}
ROLES = {1: "server", 2: "client"}
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


@dataclass
class Run:
    requests: int
    seconds: float
    failed: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def wait_port(port: int, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


class Nginx:
    """One worker, two servers: h2c (prior knowledge) and plain HTTP/1.1, each answering
    `return 200 "ok"` to every path; keep-alive without a request limit."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="podnet-bench-h2-")
        self.h2_port, self.h1_port = free_port(), free_port()
        http = f"""
  access_log off;
  default_type text/plain;
  keepalive_requests 1000000000;
  keepalive_timeout 600s;
  server {{ listen 127.0.0.1:{self.h2_port} http2; location / {{ return 200 "ok"; }} }}
  server {{ listen 127.0.0.1:{self.h1_port}; location / {{ return 200 "ok"; }} }}"""
        self.proc = start_nginx(self.dir, http)
        wait_port(self.h2_port, "nginx")
        wait_port(self.h1_port, "nginx")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


_H2LOAD_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
_H2LOAD_TIME = re.compile(r"finished in ([\d.]+)(m?s),")


def h2load(url: str, length: str, clients: int, streams: int, h1: bool = False) -> Callable[[], Run]:
    """`length`: "-n N" (N requests) or "-D S" (S seconds)."""
    argv = ["h2load", *length.split(), "-c", str(clients), "-m", str(streams), *(["--h1"] if h1 else []), url]

    def run() -> Run:
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        m, t = _H2LOAD_REQUESTS.search(out), _H2LOAD_TIME.search(out)
        if not m or not t:
            raise RuntimeError(out)
        seconds = float(t.group(1)) / (1000 if t.group(2) == "ms" else 1)
        failed = int(m.group(5)) + int(m.group(6))
        return Run(int(m.group(4)), seconds, failed)

    return run


class GrpcServer:
    ACTIONS = REPO / "tests/kernel/h2_actions.py"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="podnet-bench-grpc-")
        ready = Path(self.dir, "ready")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(self.ACTIONS),
                "grpc-server",
                "--port",
                str(self.port),
                "--ready-file",
                str(ready),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("gRPC server did not start")
            time.sleep(0.05)

    def workload(self, calls: int, concurrency: int) -> Callable[[], Run]:
        argv = [
            sys.executable,
            str(self.ACTIONS),
            "grpc-client",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--calls",
            str(calls),
            "--fail-every",
            "0",
            "--concurrency",
            str(concurrency),
        ]

        def run() -> Run:
            # The client's whole life (interpreter start, channel set-up, calls): the same
            # fixed part with and without, so ratios are slightly diluted, never inflated.
            t0 = time.monotonic()
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            seconds = time.monotonic() - t0
            summary = json.loads(out)
            ok = int(summary["statuses"].get("0", 0))
            return Run(ok, seconds, int(summary["calls"]) - ok)

        return run

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def prog_stats(fds: dict[str, int]) -> dict[str, tuple[int, int]]:
    from exporter.kernel.bpfstats import prog_run_stats

    return {name: prog_run_stats(fd) or (0, 0) for name, fd in fds.items()}


def counted_requests(build: LoadedBuild) -> dict[str, int]:
    """Requests this build has counted so far, by "role/protocol" (all cgroups, all
    generations, summed over CPUs)."""
    table = build.progs.table("tcp_traffic", "request_hist")
    out: Counter[str] = Counter()
    if table is None:
        return {}
    for key, per_cpu in table.items():
        n = sum(v.count for v in per_cpu)
        out[f"{ROLES.get(key.role, key.role)}/{PROTOCOLS.get(key.protocol, key.protocol)}"] += n
    return dict(out)


def map_failures(build: LoadedBuild) -> dict[int, int]:
    table = build.progs.table("tcp_traffic", "map_update_failures")
    if table is None:
        return {}
    out: dict[int, int] = {}
    for key, per_cpu in table.items():
        n = sum(int(v) if isinstance(v, int) else int(v.value) for v in per_cpu)
        if n:
            out[int(key.value if isinstance(key, ct.c_uint32) else key)] = n
    return out


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def cost_per_request(build: LoadedBuild, workload: Callable[[], Run]) -> dict[str, Any]:
    """One run with bpf_stats on (the caller enables it): hooks' and walkers' run time and
    run count over the run, per request completed; and what the build counted."""
    hook_fds = {h: fd for h, fd in build.progs.program_fds().items() if h in HOOKS}
    tail_fds = dict(build.progs.tail_fds)
    counted0, failures0 = counted_requests(build), map_failures(build)
    build.attach()
    try:
        s0 = prog_stats({**hook_fds, **tail_fds})
        run = workload()
        s1 = prog_stats({**hook_fds, **tail_fds})
    finally:
        build.stop()
    delta = {k: (s1[k][0] - s0[k][0], s1[k][1] - s0[k][1]) for k in s0}
    hooks_ns = sum(delta[h][0] for h in hook_fds)
    hook_runs = sum(delta[h][1] for h in hook_fds)
    failures1 = map_failures(build)
    return {
        "requests": run.requests,
        "failed": run.failed,
        "hooks_ns_per_request": hooks_ns / max(run.requests, 1),
        "hook_runs_per_request": hook_runs / max(run.requests, 1),
        "ns_per_hook_run": hooks_ns / max(hook_runs, 1),
        "programs": {k: {"run_time_ns": t, "run_cnt": c} for k, (t, c) in delta.items()},
        "counted": diff(counted_requests(build), counted0),
        "map_update_failures": {
            k: v - failures0.get(k, 0) for k, v in failures1.items() if v != failures0.get(k, 0)
        },
    }


def describe(c: dict[str, Any]) -> str:
    per_hook = "/".join(f"{c['programs'][h]['run_time_ns'] / max(c['requests'], 1):.0f}" for h in HOOKS)
    walker_runs = [c["programs"][t]["run_cnt"] for t in WALKERS if t in c["programs"]]
    return (
        f"{c['hooks_ns_per_request']:.0f} ns/request (send/recv {per_hook}; "
        f"{c['hook_runs_per_request']:.2f} hook runs/request, {c['ns_per_hook_run']:.0f} ns/run); "
        f"requests {c['requests']} (failed {c['failed']}); counted {c['counted']}; "
        f"walker run_cnt {walker_runs}; map failures {c['map_update_failures']}"
    )


def ratios(builds: dict[str, LoadedBuild], workload: Callable[[], Run], rounds: int) -> dict[str, Any]:
    """Rounds of a run without programs and one with each build, shuffled; per build the
    median over rounds of (with / without) in the same round, for throughput and for busy
    CPU time per request."""
    rate: dict[str, list[float]] = {m: [] for m in builds}
    cpu: dict[str, list[float]] = {m: [] for m in builds}
    baseline: list[float] = []
    for r in range(rounds):
        order: list[str | None] = [None, *builds]
        random.shuffle(order)
        got: dict[str | None, tuple[float, float]] = {}
        for mode in order:
            subject = builds[mode] if mode is not None else None
            if subject is not None:
                subject.attach()
            try:
                c0 = busy_cpu_seconds()
                run = workload()
                got[mode] = (run.rate, (busy_cpu_seconds() - c0) / max(run.requests, 1))
            finally:
                if subject is not None:
                    subject.stop()
        baseline.append(got[None][0])
        for m in builds:
            rate[m].append(got[m][0] / got[None][0])
            cpu[m].append(got[m][1] / got[None][1])
        shown = "  ".join(f"{m} {rate[m][-1]:.3f}" for m in builds)
        print(f"    round {r + 1}: without {got[None][0]:,.0f} req/s  {shown}", flush=True)
    return {
        "without_median_rate": statistics.median(baseline),
        **{
            m: {
                "median_ratio": statistics.median(rate[m]),
                "quartiles": quartiles(rate[m]),
                "median_cpu_per_request_ratio": statistics.median(cpu[m]),
                "cpu_quartiles": quartiles(cpu[m]),
                "ratios": rate[m],
            }
            for m in builds
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="h2,grpc,h1", type=lambda v: v.split(","))
    ap.add_argument("--modes", default="http,http1,off", type=lambda v: v.split(","))
    ap.add_argument("--rounds", type=int, default=7, help="throughput rounds per workload (0: none)")
    ap.add_argument(
        "--requests", type=int, default=50000, help="requests per h2load run measured by bpf_stats"
    )
    ap.add_argument(
        "--seconds", type=float, default=1.5, help="length of each h2load run in the ratio rounds"
    )
    ap.add_argument("--clients", type=int, default=4, help="h2load connections")
    ap.add_argument("--streams", type=int, default=10, help="h2load streams in flight per connection (h2)")
    ap.add_argument("--grpc-calls", type=int, default=4000, help="calls per gRPC client run (both phases)")
    ap.add_argument("--grpc-concurrency", type=int, default=100)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    bad = set(a.modes) - {"http", "http1", "turns", "off"} or set(a.workloads) - {"h2", "grpc", "h1"}
    if bad:
        ap.error(f"unknown {sorted(bad)[0]}")
    for tool in ("nginx", "h2load"):
        if shutil.which(tool) is None and {"h2", "h1"} & set(a.workloads):
            ap.error(f"{tool} not found (apt-get install nginx-light nghttp2-client)")

    t0 = time.monotonic()
    builds = {m: LoadedBuild(requests=m, only_hot_path=True) for m in a.modes}
    for m, b in builds.items():
        print(f"build {m}: {b.progs.builds.get('tcp_traffic')}; tail-called: {sorted(b.progs.tail_fds)}")
    print(f"loaded in {time.monotonic() - t0:.0f} s", flush=True)
    report: dict[str, Any] = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "args": vars(a),
    }
    nginx = Nginx() if {"h2", "h1"} & set(a.workloads) else None
    grpc = GrpcServer() if "grpc" in a.workloads else None
    try:
        # workload -> (a run of a fixed number of requests, for bpf_stats; a run for the ratios)
        workloads: dict[str, tuple[Callable[[], Run], Callable[[], Run]]] = {}
        for w in a.workloads:
            if w in ("h2", "h1") and nginx is not None:
                h1 = w == "h1"
                url = f"http://127.0.0.1:{nginx.h1_port if h1 else nginx.h2_port}/"
                streams = 1 if h1 else a.streams
                workloads[w] = (
                    h2load(url, f"-n {a.requests}", a.clients, streams, h1),
                    h2load(url, f"-D {round(a.seconds * 1000)}ms", a.clients, streams, h1),
                )
            elif w == "grpc" and grpc is not None:
                workloads[w] = (grpc.workload(a.grpc_calls, a.grpc_concurrency),) * 2
        for w, (wl, timed) in workloads.items():
            wl()  # warm-up: caches, the gRPC server's threads
            print(f"{w}: ns per request (bpf_stats)", flush=True)
            before = STATS.read_text().strip()
            STATS.write_text("1")
            costs: dict[str, Any] = {}
            try:
                for m, b in builds.items():
                    costs[m] = c = cost_per_request(b, wl)
                    print(f"    {m}: {describe(c)}", flush=True)
            finally:
                STATS.write_text(before)
            if "http" in costs and "http1" in costs:
                costs["walker_ns_per_request"] = (
                    costs["http"]["hooks_ns_per_request"] - costs["http1"]["hooks_ns_per_request"]
                )
            report[w] = {"cost": costs}
            if a.rounds:
                print(f"{w}: throughput with / without, {a.rounds} rounds", flush=True)
                report[w]["throughput"] = ratios(builds, timed, a.rounds)
    finally:
        if nginx is not None:
            nginx.stop()
        if grpc is not None:
            grpc.stop()
        for b in builds.values():
            b.progs.close()

    summary = {
        w: {
            **{f"{m} ns/request": round(r["cost"][m]["hooks_ns_per_request"]) for m in a.modes},
            **(
                {f"{m} ratio": round(r["throughput"][m]["median_ratio"], 3) for m in a.modes}
                if "throughput" in r
                else {}
            ),
        }
        for w, r in report.items()
        if isinstance(r, dict) and "cost" in r
    }
    print(json.dumps(summary, indent=2))
    print(f"total {time.monotonic() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
