#!/usr/bin/env python3
"""What one send/recv event costs, per build of the hot path, in ns: a single-threaded
1-byte ping-pong over loopback (bench/serial_pingpong.c: four events per iteration, one
CPU, no scheduler in between) timed with each build attached and with nothing attached,
in shuffled rounds; the figure is the median over rounds of (with - without) / 4.

Steadier than the throughput ratios of tcp_overhead.py (which are what users see), so it
is the tool for comparing builds. The programs are podnet's own, loaded in-process by
exporter.programs.load_programs; only the two hot hooks are attached and detached per run.

    .venv/bin/python bench/event_cost.py [--rounds N] [--iterations N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tcp_overhead import EmptyPrograms  # noqa: E402

from exporter.bpf_syscall import attach_tp_btf  # noqa: E402
from exporter.btf import Btf  # noqa: E402
from exporter.offsets import resolve_offsets  # noqa: E402
from exporter.programs import PROGRAMS, LoadedPrograms, MapSizes, load_programs  # noqa: E402

HOT = ("sock_send_length", "sock_recv_length")
BUILDS: dict[str, dict[str, bool]] = {
    "tp_btf": {},
    "tp_btf no-requests": {"requests": False},
    "raw": {"tp_btf": False},
    "raw no-requests": {"tp_btf": False, "requests": False},
}


class Build:
    """One build of tcp_traffic, loaded once, its hot hooks attached only while measured."""

    def __init__(self, btf: Btf, kw: dict[str, bool]) -> None:
        spec = [p for p in PROGRAMS if p.name == "tcp_traffic"]
        self.progs: LoadedPrograms = load_programs(btf, resolve_offsets(btf), MapSizes(), spec, **kw)
        self.links: list[int] = []
        self._toggle(False)

    def _toggle(self, on: bool) -> None:
        if self.progs.tp_btf:
            if on:
                self.links = [attach_tp_btf(self.progs.tp_btf[h][0]) for h in HOT]
            else:
                for fd in self.links or [self.progs.tp_btf[h][1] for h in HOT]:
                    os.close(fd)
                self.links = []
                # The loader's own links are closed: keep it from closing those numbers again.
                for h in HOT:
                    self.progs.tp_btf[h] = (self.progs.tp_btf[h][0], -1)
            return
        obj = self.progs.objects["tcp_traffic"]
        for h in HOT:
            if on:
                obj.attach_raw_tracepoint(tp=h.encode(), fn_name=f"on_{h}".encode())
            else:
                obj.detach_raw_tracepoint(tp=h.encode())

    def attach(self) -> None:
        self._toggle(True)

    def stop(self) -> None:
        self._toggle(False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--iterations", type=int, default=30000)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    binary = os.path.join(tempfile.gettempdir(), "podnet-serial-pingpong")
    subprocess.run(["gcc", "-O2", "-o", binary, str(REPO / "bench/serial_pingpong.c")], check=True)
    btf = Btf.load()
    subjects: dict[str, Any] = {"floor (empty programs)": EmptyPrograms()}
    subjects.update({name: Build(btf, kw) for name, kw in BUILDS.items()})

    def run() -> float:
        out = subprocess.run([binary, str(a.iterations), "1"], check=True, capture_output=True, text=True)
        return float(out.stdout)

    costs: dict[str, list[float]] = {name: [] for name in subjects}
    baseline: list[float] = []
    for _ in range(a.rounds):
        order = [None, *subjects]
        random.shuffle(order)
        got: dict[str | None, float] = {}
        for name in order:
            if name is not None:
                subjects[name].attach()
            try:
                got[name] = run()
            finally:
                if name is not None:
                    subjects[name].stop()
        baseline.append(got[None])
        for name in subjects:
            costs[name].append((got[name] - got[None]) / 4)
    report = {
        "baseline_ns_per_event": statistics.median(baseline) / 4,
        "ns_per_event": {name: statistics.median(v) for name, v in costs.items()},
        "rounds": a.rounds,
        "iterations": a.iterations,
    }
    print(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
