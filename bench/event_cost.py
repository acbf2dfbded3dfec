#!/usr/bin/env python3
"""What one send/recv event costs, per build of the hot path, in ns: a single-threaded
ping-pong over loopback (bench/serial_pingpong.c: four events per iteration, one CPU, no
scheduler in between) timed with each build attached and with nothing attached, in
shuffled rounds; the figure is the median over rounds of (with - without) / 4. Mode
"byte" exchanges 1 byte (no payload to recognise); mode "http" an HTTP/1.1 GET and a
1 KiB response written with writev(), so request tracking also reads the payloads.

Steadier than the throughput ratios of tcp_overhead.py (which are what users see), so it
is the tool for comparing builds. The programs are podnet's own, loaded in-process by
exporter.kernel.programs.load_programs (tcp_traffic only); only the two hot hooks are attached and
detached per run.

    .venv/bin/python bench/event_cost.py [--rounds N] [--iterations N] [--modes byte,http] [--json OUT]
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

from tcp_overhead import BUILDS, EmptyPrograms, LoadedBuild  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--iterations", type=int, default=30000)
    ap.add_argument("--modes", default="byte,http", type=lambda v: v.split(","))
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    binary = os.path.join(tempfile.gettempdir(), "podnet-serial-pingpong")
    subprocess.run(["gcc", "-O2", "-o", binary, str(REPO / "bench/serial_pingpong.c")], check=True)
    subjects: dict[str, Any] = {"floor (empty programs)": EmptyPrograms()}
    subjects.update({name: LoadedBuild(**kw, only_hot_path=True) for name, kw in BUILDS.items()})

    report: dict[str, Any] = {"rounds": a.rounds, "iterations": a.iterations}
    for mode in a.modes:

        def run(mode: str = mode) -> float:
            argv = [binary, str(a.iterations), "1", mode]
            return float(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)

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
        report[mode] = {
            "baseline_ns_per_event": statistics.median(baseline) / 4,
            "ns_per_event": {name: statistics.median(v) for name, v in costs.items()},
        }
    print(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
