#!/usr/bin/env python3
"""Cost of the exporter at cluster scale: poll time, scrape time, memory and CPU for N pods.

    .venv/bin/python bench/scale.py [--pods 10,1000,5000] [--polls 7] [--scrapes 30]
                                    [--max-series N] [--otlp [--exports 10]] [--json OUT]

Needs root (cgroups, BPF). Each size runs in a fresh child process, so its memory numbers are
its own. A child loads the real programs (exporter.kernel.programs.load_programs), creates N pod
cgroups in the kubelet layout (systemd driver, containerd) under a private parent below the
cgroup2 mount, loads a matching PodList into the pod store, and fills the kernel maps directly
with BCC table updates: every pod gets flows to two pod peers of other workloads and one
external address, connection and event counters, 8 RTT and 4 connect-time histogram slots,
and 4 request-duration slots for a server and a client role, so every pod family has N
pods' series.
Values are spread over all CPUs, as the per-CPU maps hold them. It then times the exporter's
own code: Poller.poll_once (map read, cgroup resolution and dead-cgroup check, snapshot,
rendering of text and OpenMetrics, plain and gzip) and HTTP scrapes of /metrics from the
aiohttp routes the exporter serves (the pre-rendered snapshot), and reads VmRSS and VmHWM.
The cgroups are removed when the child ends.

With --otlp, after that, each child also times OTLP export per protocol (gRPC, then OTLP/HTTP
protobuf): it starts the real receiver of tests/otlp_receivers.py on 127.0.0.1, builds the
OtlpConfig as `podnet-exporter run --otlp-endpoint ... --otlp-protocol ...` does
(exporter.app.config.resolve, no OTEL_* variables: exponential histograms, cumulative, no
compression; interval one day so only explicit exports run) and an exporter.export.otlp.OtlpPusher whose
get_snapshot returns the poller's latest snapshot, as service wires it. Before each timed
export_now() it polls once, so every export has a new snapshot to send (the pusher sends a
snapshot only once). Per export: wall time, the exporting thread's CPU time (time.thread_time),
the process's CPU time (which also counts the in-process receiver and gRPC's threads), and what
the receiver accepted: requests, protobuf bytes and data points, checked against the snapshot's
series. One untimed export first (connection set-up).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes as ct
import http.client
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NODE = "bench-node"
PODS_PER_WORKLOAD = 10
NAMESPACES = 20
RTT_SLOTS = range(70, 78)  # around 2^-12 .. 2^-10 s: 0.2-1 ms
CONNECT_SLOTS = range(74, 78)
REQUEST_SLOTS = range(80, 84)

_T = TypeVar("_T")


def vm_kib(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- simulated pods -----------------------------------------------------------------------------


class BenchPod:
    def __init__(self, i: int) -> None:
        self.i = i
        self.uid = str(uuid.uuid4())
        self.container_id = secrets.token_hex(32)
        self.namespace = f"ns-{i % NAMESPACES:02d}"
        self.workload = f"wl-{i // PODS_PER_WORKLOAD:04d}"
        self.hash = "7c9f8d6b5"
        self.name = f"{self.workload}-{self.hash}-{i:05d}"
        self.ip = f"10.200.{i // 250}.{i % 250 + 1}"
        self.cgroup_id = 0

    def cgroup_chain(self) -> list[str]:
        uid_ = self.uid.replace("-", "_")
        return [
            "kubepods.slice",
            "kubepods-burstable.slice",
            f"kubepods-burstable-pod{uid_}.slice",
            f"cri-containerd-{self.container_id}.scope",
        ]

    def pod_json(self) -> dict[str, Any]:
        rs = f"{self.workload}-{self.hash}"
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "labels": {"app": self.workload, "pod-template-hash": self.hash},
                "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": rs, "controller": True}
                ],
            },
            "spec": {"nodeName": NODE},
            "status": {
                "podIP": self.ip,
                "podIPs": [{"ip": self.ip}],
                "containerStatuses": [{"name": "app", "containerID": f"containerd://{self.container_id}"}],
            },
        }


class PodCgroups:
    """N pod cgroups below <cgroup2>/podnet-bench-<pid>.slice; removed by close() (also at exit
    and on SIGTERM). Empty cgroups only: nothing runs in them."""

    def __init__(self, root: str, pods: list[BenchPod]) -> None:
        self.base = os.path.join(root, f"podnet-bench-{os.getpid()}.slice")
        self.dirs: list[str] = []
        atexit.register(self.close)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        self._mkdir(self.base)
        made: set[str] = set()
        for pod in pods:
            path = self.base
            for part in pod.cgroup_chain():
                path = os.path.join(path, part)
                if path not in made:
                    self._mkdir(path)
                    made.add(path)
            pod.cgroup_id = os.stat(path).st_ino

    def _mkdir(self, path: str) -> None:
        self.dirs.append(path)
        os.mkdir(path)

    def close(self) -> None:
        for d in reversed(self.dirs):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(d)
        self.dirs.clear()


def fill_maps(programs: Any, pods: list[BenchPod], gen: int = 0) -> dict[str, int]:
    """Write every pod's entries into the kernel maps, in generation `gen` (what the programs
    count in until the next poll); returns entries written per map."""
    from exporter.kernel import bpf_structs as bs

    written: dict[str, int] = {}

    def put(program: str, name: str, key: Any, fields: dict[str, Any] | int) -> None:
        """One entry, the same value on every CPU except `cpu_extra` fields (+cpu index)."""
        try:
            table = programs.table(program, name)
        except KeyError:  # a map this version of the programs does not have
            table = None
        if table is None:
            return
        leaf = table.Leaf()
        for cpu in range(len(leaf)):
            if isinstance(fields, int):
                leaf[cpu] = fields + cpu
                continue
            for field, value in fields.items():
                if isinstance(value, list):
                    getattr(leaf[cpu], field)[:] = value
                else:
                    setattr(leaf[cpu], field, value + cpu)
        table[key] = leaf
        written[name] = written.get(name, 0) + 1

    external = bytes(10) + b"\xff\xff" + bytes([203, 0, 113, 7])
    n = len(pods)
    conn = {"opened": [10, 5], "closed": [9, 4], "active": [1, 1], "failed": [1, 1, 0, 1]}
    events = {"retransmits": 3, "resets_sent": 1, "resets_received": 1}
    hist = {"count": 5, "sum_ns": 2_500_000}
    request_key = getattr(bs, "RequestKey", None)
    for pod in pods:
        cg = pod.cgroup_id
        i = pod.i
        peers = [pods[(i + PODS_PER_WORKLOAD) % n].ip, pods[(i + 3 * PODS_PER_WORKLOAD + 1) % n].ip]
        for peer in [*(bytes(10) + b"\xff\xff" + socket.inet_aton(ip) for ip in peers), external]:
            key = bs.TcpFlowGenKey(bs.TcpFlowKey(cg, (ct.c_uint8 * 16).from_buffer_copy(peer)), gen, 0)
            put("tcp_traffic", "tcp_flow_bytes", key, {"sent": 1000 + i, "received": 2000 + i})
        put("tcp_state", "tcp_conn_by_cgroup", bs.CgroupGenKey(cg, gen, 0), conn)
        put("tcp_events", "tcp_events_by_cgroup", bs.CgroupGenKey(cg, gen, 0), events)
        for slot in RTT_SLOTS:
            put("tcp_traffic", "tcp_rtt_hist", bs.HistKey(cg, slot, gen), hist)
        for slot in CONNECT_SLOTS:
            put("tcp_state", "tcp_connect_duration_hist", bs.HistKey(cg, slot, gen), hist)
        if request_key is not None and "request_hist" in bs.MAP_TYPES:
            # (role, protocol, method, status class) codes: a server and a client GET, 2xx.
            for role in (1, 2):
                for slot in REQUEST_SLOTS:
                    put("tcp_traffic", "request_hist", request_key(cg, role, 2, 1, 2, slot, gen, 0), hist)
        elif request_key is not None:  # the layout before request_hist
            for role in (1, 2):
                put("tcp_traffic", "requests_by_cgroup", request_key(cg, role, 2, 1, 2, 0), 7)
            for slot in REQUEST_SLOTS:
                put("tcp_traffic", "request_duration_hist", bs.HistKey(cg, slot, 1 | 2 << 8), hist)
    return written


# ---- timing -------------------------------------------------------------------------------------


class Stages:
    """Wall time of each wrapped call, per poll."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., _T]) -> Callable[..., _T]:
        def timed(*args: Any, **kwargs: Any) -> _T:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - t0

        return timed


class Server:
    """The exporter's HTTP routes on an aiohttp loop in a thread, serving `snapshots`."""

    def __init__(self, snapshots: Any) -> None:
        from aiohttp import web

        from exporter.export.http_app import SNAPSHOTS, add_routes

        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app[SNAPSHOTS] = snapshots
        add_routes(app)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def scrape(self, headers: dict[str, str]) -> tuple[float, int]:
        """(seconds, body bytes) of one GET /metrics on a new connection, as a scraper sees it."""
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/metrics", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, resp.status
        finally:
            conn.close()
        return time.perf_counter() - t0, len(body)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def receiver_points(requests: list[Any]) -> int:
    """Data points in a receiver's ExportMetricsServiceRequests."""
    n = 0
    for req in requests:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    if kind is not None:
                        n += len(getattr(metric, kind).data_points)
    return n


def otlp_config(endpoint: str, protocol: str) -> Any:
    """The OtlpConfig `podnet-exporter run` builds for these flags (no OTEL_* variables)."""
    from exporter.app.config import parse_args, resolve

    argv = ["run", "--otlp-endpoint", endpoint, "--otlp-protocol", protocol, "--otlp-interval", "86400"]
    cfg = resolve(parse_args(argv)[1], {}).otlp
    assert cfg is not None and cfg.histogram == "exponential" and cfg.temporality == "cumulative", cfg
    return cfg


def run_otlp(poller: Any, snapshots: Any, exports: int) -> dict[str, Any]:
    """Time `exports` OtlpPusher.export_now() calls per protocol against a real local receiver."""
    sys.path.insert(0, str(REPO / "tests"))
    import otlp_receivers as rx
    from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
    from opentelemetry.sdk.metrics.export import AggregationTemporality
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from exporter.export import otlp

    out: dict[str, Any] = {}
    snap = snapshots.current.snapshot
    series = sum(len(v) for v in snap.samples.values()) + sum(len(v) for v in snap.histograms.values())
    # Where the time goes, once, outside the pusher: Snapshot -> SDK points, then SDK -> protobuf.
    t0 = time.perf_counter()
    families = otlp.snapshot_metrics(snap, start_ns=time.time_ns())
    t1 = time.perf_counter()
    requests = list(
        otlp._requests(
            families,
            Resource({}),
            InstrumentationScope(otlp.SCOPE_NAME),
            AggregationTemporality.CUMULATIVE,
            otlp.MAX_POINTS_PER_REQUEST,
        )
    )
    t2 = time.perf_counter()
    for data, _ in requests:
        encode_metrics(data)
    t3 = time.perf_counter()
    out["split"] = {"convert": t1 - t0, "requests": t2 - t1, "encode": t3 - t2}
    out["series"] = series
    del families, requests

    for protocol in ("grpc", "http/protobuf"):
        receiver = rx.make_receiver(protocol)
        pusher = None
        try:
            pusher = otlp.OtlpPusher(
                otlp_config(receiver.endpoint, protocol),
                node_name=NODE,
                cluster_name="bench",
                get_snapshot=lambda: snapshots.current.snapshot,
            )
            runs: list[dict[str, float]] = []
            for k in range(exports + 1):
                snapshots.current = poller.poll_once()
                want = sum(len(v) for v in snapshots.current.snapshot.samples.values())
                want += sum(len(v) for v in snapshots.current.snapshot.histograms.values())
                receiver.clear()
                wall0, cpu0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
                ok = pusher.export_now()
                run = {
                    "wall": time.perf_counter() - wall0,
                    "cpu": time.thread_time() - cpu0,
                    "process_cpu": time.process_time() - proc0,
                }
                got = receiver.requests
                assert ok, f"{protocol}: export failed"
                run["requests"] = len(got)
                run["bytes"] = sum(r.ByteSize() for r in got)
                run["points"] = receiver_points(got)
                run["series"] = want
                if k > 0:  # the first one sets up the connection
                    runs.append(run)
            missing = [r["series"] - r["points"] for r in runs if r["points"] != r["series"]]
            out[protocol] = {key: summary([r[key] for r in runs]) for key in runs[0]}
            out[protocol]["exports"] = len(runs)
            out[protocol]["mismatched_exports"] = len(missing)
            out[protocol]["ok_failed"] = list(pusher.stats[:2])
        finally:
            if pusher is not None:
                pusher.shutdown()
            rx.close_receiver(receiver)
    return out


def run_one(
    n: int, polls: int, scrapes: int, max_series: int, profile: bool = False, otlp_exports: int = 0
) -> dict[str, Any]:
    import exporter.app.poller as poller_mod
    from exporter.export.http_app import SnapshotStore
    from exporter.export.prometheus import Exposition
    from exporter.kernel.btf import Btf
    from exporter.kernel.maps import MapReader
    from exporter.kernel.offsets import resolve_offsets
    from exporter.kernel.programs import MapSizes, load_programs
    from exporter.metrics.model import BucketLayout
    from exporter.metrics.peers import PeerResolver
    from exporter.pods.cgroups import CgroupIndex, find_cgroup2_mount
    from exporter.pods.identity import IdentityResolver
    from exporter.pods.metadata import PodStore
    from exporter.pods.pods import parse_pod_list

    out: dict[str, Any] = {"pods": n, "rss_start_kib": vm_kib("VmRSS")}
    btf = Btf.load()
    programs = load_programs(btf, resolve_offsets(btf), MapSizes())
    out["rss_programs_loaded_kib"] = vm_kib("VmRSS")
    root = find_cgroup2_mount()
    pods = [BenchPod(i) for i in range(n)]
    cgroups = PodCgroups(root, pods)
    server: Server | None = None
    try:
        store = PodStore()
        doc = {"apiVersion": "v1", "kind": "List", "items": [p.pod_json() for p in pods]}
        parsed, problems = parse_pod_list(json.dumps(doc).encode(), "bench")
        assert not problems, problems[:3]
        store.replace_all(parsed)
        t0 = time.perf_counter()
        out["map_entries_written"] = fill_maps(programs, pods)
        out["fill_seconds"] = time.perf_counter() - t0

        index = CgroupIndex(root)
        index.rescan()
        stages = Stages()
        exposition = Exposition(BucketLayout(0))
        parts = poller_mod.PollerParts(
            programs=programs,
            reader=MapReader(programs),
            resolver=IdentityResolver(index, store),
            peers=PeerResolver(store),
            store=store,
            pods_file=None,
            exposition=exposition,
            max_series=max_series,
        )
        parts.reader.read = stages.wrap("read", parts.reader.read)  # type: ignore[method-assign]
        parts.resolver.resolve = stages.wrap("resolve", parts.resolver.resolve)  # type: ignore[method-assign]
        parts.resolver.dead = stages.wrap("dead_check", parts.resolver.dead)  # type: ignore[method-assign]
        exposition.render = stages.wrap("render", exposition.render)  # type: ignore[method-assign]
        poller_mod.build_snapshot = stages.wrap("snapshot", poller_mod.build_snapshot)  # type: ignore[attr-defined]
        snapshots = SnapshotStore(exposition)
        poller = poller_mod.Poller(parts, snapshots, interval=5.0)
        settle = getattr(poller_mod, "settle_heap", None)
        if settle is not None:  # what service does once the poller exists
            settle()
        out["rss_settled_kib"] = vm_kib("VmRSS")

        per_poll: list[dict[str, float]] = []
        rendered = None
        for k in range(polls + 1):
            # Every pod active in every interval (the worst case): the programs have counted
            # into the current generation since the last poll. Not timed: kernel work.
            fill_maps(programs, pods, gen=parts.reader.generation)
            stages.current = {}
            wall0, cpu0 = time.perf_counter(), time.thread_time()
            rendered = poller.poll_once()
            stages.current["total"] = time.perf_counter() - wall0
            stages.current["cpu"] = time.thread_time() - cpu0
            if k == 0:
                out["first_poll"] = dict(stages.current)  # cold: cgroup tree walk, path parsing
            else:
                per_poll.append(dict(stages.current))
        assert rendered is not None
        snapshots.current = rendered
        # Saving the totals after a poll (exporter.app.checkpoint; the poller does it when
        # maps are pinned, which this benchmark's programs are not).
        from exporter.app.checkpoint import Checkpoint, SavedState

        with tempfile.TemporaryDirectory() as tmp:
            saver = Checkpoint(tmp, "bench")
            saved = SavedState(poller.ledger, poller.retired, poller.counters_since)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                assert saver.save(saved, (1,))
                times.append(time.perf_counter() - t0)
            out["checkpoint_save"] = summary(times)
            out["checkpoint_bytes"] = saver.path.stat().st_size
        # Memory as the exporter holds it between polls (before anything reads a plain body).
        out["rss_polled_kib"] = vm_kib("VmRSS")
        out["rss_anon_polled_kib"] = vm_kib("RssAnon")
        out["hwm_polled_kib"] = vm_kib("VmHWM")
        out["poll"] = {key: summary([p.get(key, 0.0) for p in per_poll]) for key in per_poll[0]}
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(poller.poll_once)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
        snap = rendered.snapshot
        out["series"] = {name: len(s) for name, s in snap.samples.items() if s} | {
            name: len(h) for name, h in snap.histograms.items() if h
        }
        out["series_dropped_total"] = {
            s.labels[0]: s.value for s in snap.samples.get("podnet_exporter_series_dropped", ()) if s.value
        }
        out["unresolved"] = parts.resolver.unresolved
        plain = zlib.decompress(rendered.text_gzip, 31)
        out["body_bytes"] = {
            "text": len(plain),
            "text_gzip": len(rendered.text_gzip),
            "openmetrics_gzip": len(rendered.openmetrics_gzip),
        }
        out["text_lines"] = plain.count(b"\n")
        del plain

        server = Server(snapshots)
        scrape: dict[str, dict[str, float]] = {}
        for label, headers in (
            ("text_gzip", {"Accept-Encoding": "gzip"}),
            ("openmetrics_gzip", {"Accept": "application/openmetrics-text", "Accept-Encoding": "gzip"}),
            # Last: the first plain scrape of a snapshot decompresses and keeps its body.
            ("text", {}),
        ):
            server.scrape(headers)  # warm-up
            scrape[label] = summary([server.scrape(headers)[0] for _ in range(scrapes)])
            out[f"rss_after_{label}_kib"] = vm_kib("VmRSS")
        out["scrape"] = scrape
        out["rss_end_kib"] = vm_kib("VmRSS")
        out["rss_anon_end_kib"] = vm_kib("RssAnon")
        out["rss_file_end_kib"] = vm_kib("RssFile")
        out["hwm_kib"] = vm_kib("VmHWM")
        if otlp_exports:
            out["otlp"] = run_otlp(poller, snapshots, otlp_exports)
            out["rss_after_otlp_kib"] = vm_kib("VmRSS")
            out["hwm_after_otlp_kib"] = vm_kib("VmHWM")
    finally:
        if server is not None:
            server.close()
        programs.close()
        cgroups.close()
    return out


# ---- report -------------------------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| pods | series (lines) | poll ms | read | resolve + dead check | snapshot | render + gzip "
        "| CPU ms/poll | scrape ms gzip / plain | RSS MiB (anon) | RSS MiB scraped, peak |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p = r["poll"]
        series = sum(v for k, v in r["series"].items() if not k.startswith("podnet_exporter_"))
        scraped = (r["rss_after_openmetrics_gzip_kib"], r["hwm_polled_kib"])
        rows.append(
            f"| {r['pods']:,} | {series:,} ({r['text_lines']:,}) | {ms(p['total']['median'])} "
            f"| {ms(p['read']['median'])} "
            f"| {ms(p['resolve']['median'] + p['dead_check']['median'])} "
            f"| {ms(p['snapshot']['median'])} | {ms(p['render']['median'])} | {ms(p['cpu']['median'])} "
            f"| {ms(r['scrape']['text_gzip']['median'])} / {ms(r['scrape']['text']['median'])} "
            f"| {mib(r['rss_polled_kib'])} ({mib(r['rss_anon_polled_kib'])}) "
            f"| {', '.join(mib(x) for x in scraped)} |"
        )
    return "\n".join(rows)


def otlp_table(results: list[dict[str, Any]], interval: float = 60.0) -> str:
    rows = [
        "| protocol | pods | series | export ms | thread CPU ms | process CPU ms | CPU % at "
        f"{interval:g} s | requests | MB sent | points received |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for protocol in ("grpc", "http/protobuf"):
        for r in results:
            o = r.get("otlp", {}).get(protocol)
            if o is None:
                continue
            cpu = o["cpu"]["median"]
            rows.append(
                f"| {protocol} | {r['pods']:,} | {o['series']['median']:,.0f} | {ms(o['wall']['median'])} "
                f"| {ms(cpu)} | {ms(o['process_cpu']['median'])} | {cpu / interval * 100:.2f} "
                f"| {o['requests']['median']:.0f} | {o['bytes']['median'] / 1e6:.2f} "
                f"| {o['points']['median']:,.0f} ({o['mismatched_exports']} of {o['exports']} short) |"
            )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", default="10,1000,5000", help="comma-separated pod counts")
    ap.add_argument("--polls", type=int, default=7, help="warm polls timed per size")
    ap.add_argument("--scrapes", type=int, default=30, help="scrapes timed per size and format")
    ap.add_argument("--max-series", type=int, default=10000, help="the exporter's --max-series")
    ap.add_argument("--otlp", action="store_true", help="also time OTLP export (gRPC and HTTP) per size")
    ap.add_argument("--exports", type=int, default=10, help="with --otlp: exports timed per protocol")
    ap.add_argument("--json", default="", help="write all results here")
    ap.add_argument("--profile", action="store_true", help="with --one: cProfile one poll to stderr")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        exports = a.exports if a.otlp else 0
        print(json.dumps(run_one(a.one, a.polls, a.scrapes, a.max_series, a.profile, exports)))
        return 0
    if os.geteuid() != 0:
        print("bench/scale.py needs root (cgroups, BPF)", file=sys.stderr)
        return 2
    results = []
    for n in (int(x) for x in a.pods.split(",")):
        print(f"{n} pods ...", file=sys.stderr, flush=True)
        child = subprocess.run(
            [
                *(sys.executable, __file__, "--one", str(n), "--polls", str(a.polls)),
                *("--scrapes", str(a.scrapes), "--max-series", str(a.max_series)),
                *(("--otlp", "--exports", str(a.exports)) if a.otlp else ()),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            print(child.stderr[-4000:], file=sys.stderr)
            return 1
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    report = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "max_series": a.max_series,
        "results": results,
    }
    print(table(results))
    if a.otlp:
        print()
        print(otlp_table(results))
        for r in results:
            split = r["otlp"]["split"]
            print(
                f"{r['pods']} pods, one export outside the pusher: convert {ms(split['convert'])} ms, "
                f"split {ms(split['requests'])} ms, encode {ms(split['encode'])} ms"
            )
    for r in results:
        if r["series_dropped_total"]:
            print(f"{r['pods']} pods: series dropped by the cap: {r['series_dropped_total']}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
