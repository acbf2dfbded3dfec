"""The exporter needs CAP_BPF and CAP_PERFMON and nothing else (Linux 5.11+, where BPF
memory is charged to the memory cgroup instead of RLIMIT_MEMLOCK): run it as a container
runtime would, uid 0 with every other capability removed from the bounding set, and check
that everything attaches and the numbers are still exact. The Helm chart's default
securityContext asks for exactly these two."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from exporter_proc import ExporterProcess
from hostprobe import refusal_under
from podsim import SimCluster
from test_requests import pair
from test_tcp_metrics import client, finish, full_labels, serve
from test_tls import assert_counted, exporter_args, py_client, py_server, stop, total_of, until_counted

ONLY_BPF_AND_PERFMON = ["setpriv", "--bounding-set=-all,+bpf,+perfmon"]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_runs_with_only_cap_bpf_and_cap_perfmon(
    cluster: SimCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pods_file = str(tmp_path_factory.mktemp("caps") / "pods.json")
    a = cluster.add_pod("capped-client", workload="cappedc")
    b = cluster.add_pod("capped-server", workload="cappeds")
    cluster.write_pods_file(pods_file)
    exp = ExporterProcess(["--pods-file", pods_file, "--poll-interval", "0.3"], prefix=ONLY_BPF_AND_PERFMON)
    try:
        exp.wait_ready()
        status = Path(f"/proc/{exp.proc.pid}/status").read_text()
        cap_eff = int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)
        assert cap_eff == (1 << 38) | (1 << 39), hex(cap_eff)  # CAP_PERFMON | CAP_BPF
        server = serve(b, 8080, connections=4, reply=321)
        client(a, b.ip, 8080, 4, 1234, 321)
        finish(server)
        s = exp.fresh_scrape()
        attached = s.series("podnet_exporter_program_attached")
        assert attached and all(s.value("podnet_exporter_program_attached", **ls) == 1 for ls in attached)
        assert s.value("podnet_tcp_sent_bytes_total", **full_labels(a)) == 4 * 1234
        assert s.value("podnet_tcp_received_bytes_total", **full_labels(b)) == 4 * 1234
        assert s.value("podnet_exporter_unresolved_cgroups") == 0
        # The build these two capabilities allow on this host (probed under the same
        # limits): the preferred one needs nothing more where the kernel offers it, and a
        # fallback is never silent.
        refused = refusal_under(ONLY_BPF_AND_PERFMON)
        (info,) = s.series("podnet_exporter_build_info")
        assert info["data_path"] == ("raw_tracepoint" if refused else "tp_btf"), (refused, info)
        if refused:
            assert "not the preferred build" in exp.log_path.read_text(errors="replace")
        # Without CAP_SYS_ADMIN the pods' network namespaces cannot be entered to list the
        # connections open before a fresh start: said, and counted, not silent.
        assert s.value("podnet_exporter_errors_total", stage="seed_connections") >= 2
        assert "could not list the connections of" in exp.log_path.read_text(errors="replace")
    finally:
        assert exp.stop() == 0, exp.log()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_tls_with_the_charts_capabilities(
    cluster: SimCluster, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # One exporter with TLS on the host at a time, as on a node: two exporters' uprobes on one
    # library were seen to miss a process's calls.
    pods_file = str(tmp_path_factory.mktemp("tlscaps") / "pods.json")
    # The chart's securityContext with config.tls=openssl: CAP_BPF, CAP_PERFMON (uprobes are
    # perf events) and CAP_SYS_PTRACE (other processes' maps and /proc/<pid>/root).
    prefix = ["setpriv", "--bounding-set=-all,+bpf,+perfmon,+sys_ptrace"]
    c, srv = pair(cluster, pods_file, "tlscaps")
    exp = ExporterProcess(exporter_args(pods_file), prefix=prefix)
    try:
        exp.wait_ready()
        server, ca = py_server(srv, 8443, tmp_path)
        try:
            truth = py_client(c, srv.ip, 8443, ca, 12)
            s = until_counted(exp, total_of((c, srv), 12, "http"))
        finally:
            stop(server)
        assert_counted(s, c, srv, "http", truth)
        assert s.value("podnet_exporter_tls_libraries", state="attached") >= 1
    finally:
        assert exp.stop() == 0, exp.log()
