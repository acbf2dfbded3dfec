#!/usr/bin/env python3
"""Kernel run time per event of the hot path, this tree's programs against another tree's,
both attached at once to the same events: the kernel's own per-program statistics
(kernel.bpf_stats_enabled: run time and run count per program) divide the same
workload's events between them, so a noisy machine slows both alike. Each round swaps
which build is attached first. Figures include bpf_stats' own cost (~55 ns per run here)
in both.

    git worktree add /tmp/base <commit>
    .venv/bin/python bench/ab_runtime.py --base-bpf /tmp/base/bpf [--rounds 10] [--iterations 30000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOT = ("sock_send_length", "sock_recv_length")
BUILDS = {"tp_btf, requests http": {}, "raw tracepoints, requests http": {"tp_btf": False}}


def load(bpf_dir: Path, **kw: Any) -> Any:
    import exporter.kernel.programs as programs
    from exporter.kernel.btf import Btf
    from exporter.kernel.offsets import resolve_offsets

    btf = Btf.load()
    saved = programs.BPF_DIR
    programs.BPF_DIR = bpf_dir
    try:
        specs = [p for p in programs.PROGRAMS if p.name == "tcp_traffic"]
        return programs.load_programs(btf, resolve_offsets(btf), programs.MapSizes(), specs, **kw)
    finally:
        programs.BPF_DIR = saved


def hot_fds(progs: Any) -> dict[str, int]:
    fds = progs.program_fds()
    return {h: fds[h] for h in HOT}


def main() -> int:
    from exporter.kernel.bpfstats import prog_run_stats

    ap = argparse.ArgumentParser()
    ap.add_argument("--base-bpf", required=True, type=Path, help="bpf/ of the tree to compare with")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=30000)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    binary = os.path.join(tempfile.gettempdir(), "podnet-serial-pingpong")
    subprocess.run(["gcc", "-O2", "-o", binary, str(REPO / "bench/serial_pingpong.c")], check=True)
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = stats.read_text().strip()
    stats.write_text("1")
    report: dict[str, Any] = {"rounds": a.rounds, "iterations": a.iterations}
    try:
        for build, kw in BUILDS.items():
            for mode in ("byte", "http"):
                per: dict[str, list[float]] = {"this tree": [], "base": []}
                for r in range(a.rounds):
                    order = [("this tree", REPO / "bpf"), ("base", a.base_bpf)]
                    if r % 2:
                        order.reverse()
                    loaded = {name: load(path, **kw) for name, path in order}
                    try:
                        start = {
                            n: {h: prog_run_stats(fd) for h, fd in hot_fds(p).items()}
                            for n, p in loaded.items()
                        }
                        subprocess.run(
                            [binary, str(a.iterations), "1", mode], check=True, capture_output=True
                        )
                        for n, p in loaded.items():
                            ns = runs = 0
                            for h, fd in hot_fds(p).items():
                                t1, c1 = prog_run_stats(fd) or (0, 0)
                                t0, c0 = start[n][h] or (0, 0)
                                ns, runs = ns + t1 - t0, runs + c1 - c0
                            per[n].append(ns / max(runs, 1))
                    finally:
                        for p in loaded.values():
                            with contextlib.suppress(Exception):
                                p.close()
                report[f"{build}, {mode}"] = {n: statistics.median(v) for n, v in per.items()}
                print(build, mode, {n: round(statistics.median(v), 1) for n, v in per.items()}, flush=True)
    finally:
        stats.write_text(before)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
