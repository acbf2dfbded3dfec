#!/usr/bin/env python3
"""What TLS recognition (--tls openssl) costs per request: BPF run time of the hooks and of
the OpenSSL uprobe programs per request, and -- what bpf_stats cannot see -- the CPU time the
client and server processes spend per request with and without the uprobes (the breakpoint
trap, the single-step and the return trampoline of every probed SSL call), with a noisy
throughput ratio.

    .venv/bin/python bench/tls_cost.py [--workloads h1s,h2s]
        [--modes openssl,entry-only,tls-off,off] [--rounds N] [--requests N]
        [--floor-calls N] [--json OUT]

Builds (each loaded once in this process, the exporter's own tcp_traffic programs through
exporter.kernel.programs.load_programs, as h2_cost.py does):
  openssl  --requests http --tls openssl: the two hot hooks, and uprobes (entry + return) on
           SSL_write/SSL_read/_ex, the handshakes and SSL_free of every libssl the host's
           processes map (tls_libs.OpenSslProbes, as the exporter attaches them); the
           plaintext goes through HTTP/1.x and HTTP/2 recognition;
  tls-off  --requests http --tls off: the hooks only; TLS connections counted as turns;
  off      --requests off: the TCP data plane alone;
  entry-only  (diagnostic) `openssl` with the entry uprobes only, no uretprobes: nothing is
           recognised; it splits the cost between the entry and the return probes.
The hot hooks and the uprobes are attached only while measured. Uprobes attach to the library
file (its inode), so every process mapping it on the host is probed while they are attached.

Workloads (client and server on this host, both ends counted): nginx (one worker) with a
self-signed certificate, `return 200 "ok"`, driven by h2load over https:
  h1s  HTTPS/1.1: `listen ... ssl;`, `h2load --h1 -c 4` (keep-alive);
  h2s  HTTP/2 over TLS (ALPN h2): `listen ... ssl http2;`, `h2load -c 4 -m 10`.
nginx and h2load run in a cgroup v2 of their own: what the builds count there is compared with
h2load's count; what they count in other cgroups (other processes' TLS on the host, probed
too while attached) is reported apart.

Measurements per workload:
  1. BPF run time per request: kernel.bpf_stats_enabled=1 for this phase only, one run of
     --requests requests per build; run_time_ns of the hooks (sock_send_length,
     sock_recv_length) and of the uprobe programs (on_ssl_*; tail-called walkers are
     accounted to the program that entered them) over the requests h2load completed;
     uprobe run_cnt per request; and what the build counted (request_hist, by role and
     protocol; map_update_failures) against h2load's succeeded count.
  2. CPU per request of the two processes: rounds of one run with nothing attached and one
     with each build, in shuffled order, --requests requests each; the nginx worker's
     /proc/<pid>/schedstat run time (ns) plus h2load's rusage (utime + stime, reaped child);
     per build the difference with the round's nothing-attached run, median over rounds.
     The same runs give the throughput ratio (with / without, median, quartiles).
  3. The uprobe floor: an empty BPF program on a uprobe (and a uretprobe) of three C
     functions differing only in their first instruction (nop and push, which x86 uprobes
     emulate; `sub $0x18,%rsp`, single-stepped out of line, which is how OpenSSL 3's
     SSL_read and SSL_write begin; the probed library's first instructions are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from h2_cost import (  # noqa: E402
    _H2LOAD_REQUESTS,
    _H2LOAD_TIME,
    HOOKS,
    PROTOCOLS,
    ROLES,
    STATS,
    Run,
    diff,
    map_failures,
    prog_stats,
    wait_port,
)
from nginx_bench import start_nginx  # noqa: E402
from tcp_overhead import free_port, quartiles  # noqa: E402

CGROUP2 = (
    Path("/sys/fs/cgroup/unified")
    if Path("/sys/fs/cgroup/unified/cgroup.procs").exists()
    else Path("/sys/fs/cgroup")
)


class Cgroup:
    """A cgroup v2 of our own for nginx and h2load: what the builds count there is theirs alone
    (other sessions' traffic on the host lands in other cgroups)."""

    def __init__(self) -> None:
        self.path = CGROUP2 / f"podnet-bench-tls-{os.getpid()}"
        self.path.mkdir()
        self.id = os.stat(self.path).st_ino

    def enter(self) -> None:
        """preexec_fn: the child moves itself in before exec."""
        (self.path / "cgroup.procs").write_text("0")

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def counted_requests(build: TlsBuild, cgroup_id: int, elsewhere: bool = False) -> dict[str, int]:
    """Requests this build has counted so far in one cgroup (elsewhere: in all the others), by
    "role/protocol"."""
    table = build.progs.table("tcp_traffic", "request_hist")
    out: dict[str, int] = {}
    if table is None:
        return out
    for key, per_cpu in table.items():
        if (key.cgroup_id == cgroup_id) == elsewhere:
            continue
        name = f"{ROLES.get(key.role, key.role)}/{PROTOCOLS.get(key.protocol, key.protocol)}"
        out[name] = out.get(name, 0) + sum(v.count for v in per_cpu)
    return out


def h2load(cgroup: Cgroup, url: str, n: int, clients: int, streams: int, h1: bool) -> Callable[[], Run]:
    """h2_cost.h2load (-n only), run in `cgroup`."""
    argv = ["h2load", "-n", str(n), "-c", str(clients), "-m", str(streams), *(["--h1"] if h1 else []), url]

    def run() -> Run:
        out = subprocess.run(argv, check=True, capture_output=True, text=True, preexec_fn=cgroup.enter).stdout
        m, t = _H2LOAD_REQUESTS.search(out), _H2LOAD_TIME.search(out)
        if not m or not t:
            raise RuntimeError(out)
        seconds = float(t.group(1)) / (1000 if t.group(2) == "ms" else 1)
        return Run(int(m.group(4)), seconds, int(m.group(5)) + int(m.group(6)))

    return run


MODES = {
    "openssl": ("http", "openssl", True),
    "entry-only": ("http", "openssl", False),
    "tls-off": ("http", "off", True),
    "off": ("off", "off", True),
}
EXPECTED = {"h1s": "http", "h2s": "http2"}


class TlsBuild:
    """One build of tcp_traffic loaded in this process; attach() attaches the two hot hooks
    and, with --tls openssl, the uprobes on every libssl mapped on the host; stop() detaches
    them all."""

    def __init__(self, requests: str, tls: str, returns: bool = True) -> None:
        from exporter.kernel.btf import Btf
        from exporter.kernel.offsets import resolve_offsets
        from exporter.kernel.programs import PROGRAMS, MapSizes, load_programs

        btf = Btf.load()
        specs = [p for p in PROGRAMS if p.name == "tcp_traffic"]
        self.tls = tls
        self.returns = returns
        self.progs = load_programs(
            btf,
            resolve_offsets(btf),
            MapSizes(),
            specs,
            requests=requests,  # type: ignore[arg-type]
            tls=tls,  # type: ignore[arg-type]
        )
        if not self.progs.tp_btf:
            raise RuntimeError("no tp_btf build on this kernel: this bench detaches tp_btf links only")
        for h in HOOKS:
            prog_fd, link_fd = self.progs.tp_btf[h]
            os.close(link_fd)
            self.progs.tp_btf[h] = (prog_fd, -1)  # closed here: keep the loader off it
        self._links: list[int] = []
        self._probes: Any = None
        self.libraries: list[str] = []
        self.keys: set[tuple[int, int]] = set()

    def attach(self) -> None:
        from exporter.kernel.bpf_syscall import attach_tp_btf

        self._links = [attach_tp_btf(self.progs.tp_btf[h][0]) for h in HOOKS]
        if self.tls == "openssl":
            from exporter.kernel.programs import OPENSSL_PROBES
            from exporter.kernel.tls_libs import OpenSslProbes

            self._probes = OpenSslProbes(
                self.progs.tls_object(),
                [(u.symbol, u.function, u.ret) for u in OPENSSL_PROBES if self.returns or not u.ret],
                interval=0,
            )
            problems = self._probes.refresh()
            libs = self._probes.attacher.libraries()
            self.libraries = [f"{lib.path} (dev {lib.dev}, ino {lib.ino})" for lib in libs]
            self.keys = {(lib.dev, lib.ino) for lib in libs}
            if problems or not libs:
                self.stop()
                raise RuntimeError(f"uprobes not attached: {problems or 'no libssl mapped'}")

    def stop(self) -> None:
        for fd in self._links:
            os.close(fd)
        self._links = []
        if self._probes is not None:
            problems = self._probes.close()
            self._probes = None
            if problems:
                raise RuntimeError(f"uprobes not detached: {problems}")

    def program_fds(self) -> dict[str, int]:
        return {k: fd for k, fd in self.progs.program_fds().items() if k in HOOKS or k.startswith("on_ssl_")}


class TlsNginx:
    """One worker; HTTPS/1.1 on one port, HTTP/2 over TLS on another, both `return 200 "ok"`,
    a self-signed certificate made with openssl in the same temporary directory."""

    def __init__(self, cgroup: Cgroup, access_log: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="podnet-bench-tls-")
        self.access_log = Path(self.dir, "access.log")
        self.h1_port, self.h2_port = free_port(), free_port()
        cert, key = f"{self.dir}/cert.pem", f"{self.dir}/key.pem"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
                *("-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert),
            ],
            check=True,
            capture_output=True,
        )
        tls = f"ssl_certificate {cert}; ssl_certificate_key {key};"
        http = f"""
  access_log {self.access_log if access_log else "off"};
  default_type text/plain;
  keepalive_requests 1000000000;
  keepalive_timeout 600s;
  server {{ listen 127.0.0.1:{self.h1_port} ssl; {tls} location / {{ return 200 "ok"; }} }}
  server {{ listen 127.0.0.1:{self.h2_port} ssl http2; {tls} location / {{ return 200 "ok"; }} }}"""
        self.proc = start_nginx(self.dir, http, preexec_fn=cgroup.enter)
        wait_port(self.h1_port, "nginx")
        wait_port(self.h2_port, "nginx")
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        if len(children) != 1:
            raise RuntimeError(f"nginx workers: {children}")
        self.worker = int(children[0])

    def worker_cpu_ns(self) -> int:
        """Run time of the worker's threads (schedstat: ns on CPU, user and kernel)."""
        total = 0
        for task in os.listdir(f"/proc/{self.worker}/task"):
            total += int(Path(f"/proc/{self.worker}/task/{task}/schedstat").read_text().split()[0])
        return total

    def served(self) -> int:
        """Requests in the access log (when started with access_log=True)."""
        if not self.access_log.exists():
            return 0
        with self.access_log.open("rb") as f:
            return sum(1 for _ in f)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Sample:
    run: Run
    server_ns: int
    client_ns: int


def children_cpu_ns() -> int:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round((r.ru_utime + r.ru_stime) * 1e9)


def sampled(nginx: TlsNginx, workload: Callable[[], Run]) -> Sample:
    """One h2load run with the CPU time nginx's worker and h2load (reaped by then) spent."""
    s0, c0 = nginx.worker_cpu_ns(), children_cpu_ns()
    run = workload()
    return Sample(run, nginx.worker_cpu_ns() - s0, children_cpu_ns() - c0)


def bpf_cost(build: TlsBuild, workload: Callable[[], Run], cgroup_id: int) -> dict[str, Any]:
    """One run with bpf_stats on (the caller enables it)."""
    counted0, failures0 = counted_requests(build, cgroup_id), map_failures(build)  # type: ignore[arg-type]
    elsewhere0 = counted_requests(build, cgroup_id, elsewhere=True)
    build.attach()
    try:
        fds = build.program_fds()
        s0 = prog_stats(fds)
        run = workload()
        s1 = prog_stats(fds)
    finally:
        build.stop()
    n = max(run.requests, 1)
    delta = {k: (s1[k][0] - s0[k][0], s1[k][1] - s0[k][1]) for k in s0}
    hooks = [k for k in delta if k in HOOKS]
    uprobes = [k for k in delta if k.startswith("on_ssl_")]
    failures1 = map_failures(build)  # type: ignore[arg-type]
    return {
        "requests": run.requests,
        "failed": run.failed,
        "hooks_ns_per_request": sum(delta[k][0] for k in hooks) / n,
        "uprobes_ns_per_request": sum(delta[k][0] for k in uprobes) / n,
        "hook_runs_per_request": sum(delta[k][1] for k in hooks) / n,
        "uprobe_hits_per_request": sum(delta[k][1] for k in uprobes) / n,
        "programs": {k: {"run_time_ns": t, "run_cnt": c} for k, (t, c) in delta.items()},
        "counted": diff(counted_requests(build, cgroup_id), counted0),
        # Other processes on the host (other cgroups) while the probes were attached.
        "counted_elsewhere": diff(counted_requests(build, cgroup_id, elsewhere=True), elsewhere0),
        "map_update_failures": {
            k: v - failures0.get(k, 0) for k, v in failures1.items() if v != failures0.get(k, 0)
        },
        "libraries": build.libraries,
    }


def describe(c: dict[str, Any]) -> str:
    hits = {k[len("on_ssl_") :]: v["run_cnt"] for k, v in c["programs"].items() if k.startswith("on_ssl_")}
    return (
        f"hooks {c['hooks_ns_per_request']:.0f} + uprobes {c['uprobes_ns_per_request']:.0f} ns/request "
        f"({c['hook_runs_per_request']:.2f} hook runs, {c['uprobe_hits_per_request']:.2f} uprobe hits "
        f"per request {hits}); requests {c['requests']} (failed {c['failed']}); counted {c['counted']} "
        f"(other cgroups: {c['counted_elsewhere']}); "
        f"map failures {c['map_update_failures']}"
    )


def exact(c: dict[str, Any], protocol: str) -> bool:
    want = {f"server/{protocol}": c["requests"], f"client/{protocol}": c["requests"]}
    return bool(c["counted"] == want and not c["failed"])


def cpu_rounds(
    nginx: TlsNginx, builds: dict[str, TlsBuild], workload: Callable[[], Run], rounds: int
) -> dict[str, Any]:
    """Per round: one run with nothing attached and one with each build, shuffled."""
    added: dict[str, dict[str, list[float]]] = {m: {"server": [], "client": [], "total": []} for m in builds}
    ratio: dict[str, list[float]] = {m: [] for m in builds}
    base: dict[str, list[float]] = {"server": [], "client": [], "total": [], "rate": []}
    for r in range(rounds):
        order: list[str | None] = [None, *builds]
        random.shuffle(order)
        got: dict[str | None, Sample] = {}
        for mode in order:
            if mode is not None:
                builds[mode].attach()
            try:
                got[mode] = sampled(nginx, workload)
            finally:
                if mode is not None:
                    builds[mode].stop()

        def per_request(s: Sample) -> dict[str, float]:
            n = max(s.run.requests, 1)
            return {
                "server": s.server_ns / n / 1000,
                "client": s.client_ns / n / 1000,
                "total": (s.server_ns + s.client_ns) / n / 1000,
            }

        b = per_request(got[None])
        for k, v in b.items():
            base[k].append(v)
        base["rate"].append(got[None].run.rate)
        shown = []
        for m in builds:
            p = per_request(got[m])
            for k in p:
                added[m][k].append(p[k] - b[k])
            ratio[m].append(got[m].run.rate / got[None].run.rate)
            shown.append(f"{m} +{p['total'] - b['total']:.2f} µs ({ratio[m][-1]:.3f})")
        print(
            f"    round {r + 1}: without {b['total']:.2f} µs/request ({got[None].run.rate:,.0f} req/s)  "
            + "  ".join(shown),
            flush=True,
        )
    return {
        "without": {k: statistics.median(v) for k, v in base.items()},
        **{
            m: {
                **{f"added_{k}_us_per_request": statistics.median(v) for k, v in added[m].items()},
                "added_total_quartiles": quartiles(added[m]["total"]),
                "median_ratio": statistics.median(ratio[m]),
                "ratio_quartiles": quartiles(ratio[m]),
                "added_total": added[m]["total"],
                "ratios": ratio[m],
            }
            for m in builds
        },
    }


def uprobe_floor(calls: int) -> dict[str, Any]:
    """ns per call of a function with an empty BPF program on a uprobe at its entry (and with
    a uretprobe too, as --tls openssl attaches them), by the function's first instruction."""
    from exporter.kernel.headers import find_tree

    headers = find_tree()
    if not headers.ok or shutil.which("gcc") is None:
        return {"skipped": headers.reason if not headers.ok else "no gcc"}
    headers.use()
    from bcc import BPF

    d = tempfile.mkdtemp(prefix="podnet-bench-uprobe-")
    try:
        exe = f"{d}/f"
        subprocess.run(["gcc", "-O2", "-o", exe, str(REPO / "bench/uprobe_floor.c")], check=True)
        bpf = BPF(src_file=str(REPO / "bench/empty.bpf.c").encode(), cflags=["-w"])

        def per_call(which: str) -> float:
            out = subprocess.run([exe, which, str(calls)], check=True, capture_output=True, text=True)
            return float(out.stdout.split()[0])

        out: dict[str, Any] = {}
        for which in ("nop", "push", "sub"):
            sym = f"f_{which}".encode()
            row = {"none": per_call(which)}
            bpf.attach_uprobe(name=exe.encode(), sym=sym, fn_name=b"on_uprobe")
            row["uprobe"] = per_call(which)
            bpf.attach_uretprobe(name=exe.encode(), sym=sym, fn_name=b"on_uprobe")
            row["uprobe+uretprobe"] = per_call(which)
            bpf.detach_uretprobe(name=exe.encode(), sym=sym)
            bpf.detach_uprobe(name=exe.encode(), sym=sym)
            out[which] = row
            print(f"    first instruction {which}: ns per call {row}", flush=True)
        bpf.cleanup()
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def first_instructions(library: str, symbols: tuple[str, ...] = ("SSL_read", "SSL_write")) -> dict[str, str]:
    """The first instruction of each symbol in `library` (objdump), where the uprobe goes."""
    if shutil.which("objdump") is None:
        return {}
    nm = subprocess.run(["nm", "-D", library], capture_output=True, text=True).stdout
    out = {}
    for line in nm.splitlines():
        f = line.split()
        if len(f) == 3 and f[2].partition("@")[0] in symbols:
            start = int(f[0], 16)
            dis = subprocess.run(
                ["objdump", "-d", library, f"--start-address={start:#x}", f"--stop-address={start + 8:#x}"],
                capture_output=True,
                text=True,
            ).stdout
            lines = [x for x in dis.splitlines() if x.strip().startswith(f"{start:x}:")]
            if lines:
                out[f[2].partition("@")[0]] = lines[0].split("\t")[-1].strip()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="h1s,h2s", type=lambda v: v.split(","))
    ap.add_argument("--modes", default="openssl,entry-only,tls-off,off", type=lambda v: v.split(","))
    ap.add_argument("--rounds", type=int, default=7, help="CPU / throughput rounds per workload (0: none)")
    ap.add_argument("--requests", type=int, default=20000, help="requests per h2load run")
    ap.add_argument("--clients", type=int, default=4, help="h2load connections")
    ap.add_argument("--streams", type=int, default=10, help="h2load streams in flight per connection (h2s)")
    ap.add_argument(
        "--floor-calls",
        type=int,
        default=100000,
        help="calls per run of the uprobe floor (empty BPF program on a C function; 0: skip)",
    )
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    bad = set(a.modes) - set(MODES) or set(a.workloads) - set(EXPECTED)
    if bad:
        ap.error(f"unknown {sorted(bad)[0]}")
    for tool in ("nginx", "h2load", "openssl"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found (apt-get install nginx-light nghttp2-client openssl)")

    t0 = time.monotonic()
    builds = {m: TlsBuild(*MODES[m]) for m in a.modes}
    for m, b in builds.items():
        print(f"build {m}: {b.progs.builds.get('tcp_traffic')}; uprobe object: {b.progs.tls_program}")
    print(f"loaded in {time.monotonic() - t0:.0f} s", flush=True)
    report: dict[str, Any] = {"kernel": os.uname().release, "cpus": os.cpu_count(), "args": vars(a)}
    cgroup = Cgroup()
    nginx = TlsNginx(cgroup)
    try:
        if "openssl" in builds:
            # The probes attach to the libraries mapped now (nginx's); h2load must map the same file.
            b = builds["openssl"]
            b.attach()
            b.stop()
            h2load_path = shutil.which("h2load") or "h2load"
            ldd = subprocess.run(["ldd", h2load_path], capture_output=True, text=True).stdout
            path = next(line.split()[2] for line in ldd.splitlines() if "libssl.so" in line)
            st = os.stat(path)
            print(f"probed: {b.libraries}; h2load maps {path} (dev {st.st_dev}, ino {st.st_ino})")
            if (st.st_dev, st.st_ino) not in b.keys:
                raise RuntimeError("h2load's libssl is not among the probed libraries")
            report["first_instructions"] = first_instructions(path)
            print(f"first instructions (where the uprobes go): {report['first_instructions']}")
        for w in a.workloads:
            h1 = w == "h1s"
            url = f"https://127.0.0.1:{nginx.h1_port if h1 else nginx.h2_port}/"
            wl = h2load(cgroup, url, a.requests, a.clients, 1 if h1 else a.streams, h1)
            wl()  # warm-up
            print(f"{w}: BPF run time per request (bpf_stats)", flush=True)
            before = STATS.read_text().strip()
            STATS.write_text("1")
            costs: dict[str, Any] = {}
            try:
                for m, b in builds.items():
                    costs[m] = c = bpf_cost(b, wl, cgroup.id)
                    print(f"    {m}: {describe(c)}", flush=True)
            finally:
                STATS.write_text(before)
            if "openssl" in costs:
                c = costs["openssl"]
                c["exact"] = exact(c, EXPECTED[w])
                print(f"    openssl counted exactly h2load's requests as {EXPECTED[w]}: {c['exact']}")
            report[w] = {"bpf": costs}
            if a.rounds:
                print(f"{w}: CPU per request of nginx + h2load, added by each build, {a.rounds} rounds")
                report[w]["cpu"] = cpu_rounds(nginx, builds, wl, a.rounds)
    finally:
        nginx.stop()
        cgroup.remove()
        for b in builds.values():
            b.progs.close()

    if a.floor_calls:
        print("uprobe floor: an empty BPF program on a C function, by its first instruction")
        report["uprobe_floor_ns_per_call"] = uprobe_floor(a.floor_calls)

    summary: dict[str, Any] = {}
    for w in a.workloads:
        r = report[w]
        s: dict[str, Any] = {}
        for m in a.modes:
            c = r["bpf"][m]
            s[f"{m} BPF ns/request (hooks + uprobes)"] = (
                f"{c['hooks_ns_per_request']:.0f} + {c['uprobes_ns_per_request']:.0f}"
            )
            if "cpu" in r:
                u = r["cpu"][m]
                s[f"{m} CPU µs/request added (server/client/total), ratio"] = (
                    f"{u['added_server_us_per_request']:.2f}/{u['added_client_us_per_request']:.2f}/"
                    f"{u['added_total_us_per_request']:.2f}, {u['median_ratio']:.3f}"
                )
        if "cpu" in r:
            s["without: CPU µs/request, req/s"] = (
                f"{r['cpu']['without']['total']:.2f}, {r['cpu']['without']['rate']:,.0f}"
            )
        if "cpu" in r and "openssl" in r["bpf"] and "tls-off" in r["bpf"]:
            # What TLS recognition adds over counting the same connections as turns, and the
            # part of it no BPF program accounts for (traps, single-steps, trampolines) per SSL
            # call probed (entry hits; a return probe shares its call's breakpoint).
            o, t = r["bpf"]["openssl"], r["bpf"]["tls-off"]
            added = (
                r["cpu"]["openssl"]["added_total_us_per_request"]
                - r["cpu"]["tls-off"]["added_total_us_per_request"]
            )
            bpf = (o["hooks_ns_per_request"] + o["uprobes_ns_per_request"] - t["hooks_ns_per_request"]) / 1000
            calls = o["uprobe_hits_per_request"] - o["programs"].get("on_ssl_return", {}).get(
                "run_cnt", 0
            ) / max(o["requests"], 1)
            s["TLS recognition: CPU µs/request added over tls-off"] = round(added, 2)
            s["  of which BPF (bpf_stats)"] = round(bpf, 2)
            s["  SSL calls probed per request"] = round(calls, 2)
            s["  the rest, µs per SSL call"] = round((added - bpf) / max(calls, 1e-9), 2)
        if "openssl" in r["bpf"]:
            s["uprobe hits/request"] = round(r["bpf"]["openssl"]["uprobe_hits_per_request"], 2)
            s["exact"] = r["bpf"]["openssl"]["exact"]
        summary[w] = s
    if "uprobe_floor_ns_per_call" in report:
        summary["uprobe floor, ns per call"] = report["uprobe_floor_ns_per_call"]
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"total {time.monotonic() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
