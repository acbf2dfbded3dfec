"""`podnet-exporter doctor`: checks every prerequisite of `run` and says how to fix each."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporter.kernel.bpf_syscall import BPF_MAP_TYPE_ARRAY, BpfSyscallError, create_map
from exporter.kernel.btf import Btf, BtfError
from exporter.kernel.headers import find_tree
from exporter.kernel.kernel_probe import preferred_build_refused, probe_preferred_build
from exporter.kernel.offsets import resolve_offsets
from exporter.kernel.pins import DEFAULT_ROOT, is_bpffs
from exporter.kernel.programs import PROGRAMS, MapSizes, ProgramLoadError, check_hook, load_programs
from exporter.pods.cgroups import CgroupError, find_cgroup2_mount

CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> Check:
    caps = _caps()
    if os.geteuid() == 0 and caps & (1 << CAP_SYS_ADMIN):
        return Check("privileges", True, "running as root with CAP_SYS_ADMIN")
    has = (caps >> CAP_BPF) & 1 and (caps >> CAP_PERFMON) & 1
    if has:
        return Check("privileges", True, "CAP_BPF and CAP_PERFMON present")
    return Check(
        "privileges",
        False,
        "neither root nor CAP_BPF+CAP_PERFMON",
        "run as root, or grant CAP_BPF, CAP_PERFMON (and CAP_SYS_RESOURCE on old kernels)",
    )


def check_bpf_syscall() -> Check:
    # BPF_MAP_CREATE of a one-entry array: the cheapest proof the syscall works for us.
    try:
        os.close(create_map(BPF_MAP_TYPE_ARRAY, 4, 4, 1))
    except (OSError, BpfSyscallError) as e:
        return Check(
            "bpf syscall",
            False,
            f"bpf(BPF_MAP_CREATE) failed: {e.strerror if isinstance(e, OSError) else e}",
            "run as root; check sysctl kernel.unprivileged_bpf_disabled and any seccomp profile",
        )
    return Check("bpf syscall", True, "bpf() works")


def check_data_path(btf: Btf | None) -> Check:
    """Which build of the hot path this host allows, before anything compiles: the loader
    falls back by itself, but a host that forces the costlier build must say why."""
    if btf is None:
        return Check("data path", False, "cannot probe without BTF", "fix kernel BTF first")
    refused = preferred_build_refused(probe_preferred_build(btf))
    if refused:
        return Check(
            "data path",
            False,
            f"raw tracepoints (costlier per event), because {refused}",
            "allow tp_btf programs (CAP_BPF + CAP_PERFMON, Linux 5.11+), BPF_F_MMAPABLE arrays and "
            "stack maps; the exporter runs either way",
            required=False,
        )
    return Check("data path", True, "BTF-typed tracepoints allowed (tp_btf, mapped arrays, stack maps)")


def check_btf() -> tuple[Check, Btf | None]:
    try:
        btf = Btf.load()
        resolve_offsets(btf)
    except BtfError as e:
        return Check("kernel BTF", False, str(e), "use a kernel built with CONFIG_DEBUG_INFO_BTF=y"), None
    return Check(
        "kernel BTF", True, "/sys/kernel/btf/vmlinux readable; all required struct fields found"
    ), btf


def check_tracepoints(btf: Btf | None) -> list[Check]:
    if btf is None:
        return [Check("tracepoints", False, "cannot check without BTF", "fix kernel BTF first")]
    out = []
    seen: set[str] = set()
    for spec in PROGRAMS:
        for hook in spec.hooks:
            if hook.tracepoint in seen:
                continue
            seen.add(hook.tracepoint)
            why, _ = check_hook(btf, hook)
            out.append(
                Check(
                    f"tracepoint {hook.tracepoint}",
                    why is None,
                    why or "present",
                    f"without it: no {', '.join(spec.metrics)}",
                    required=False,
                )
            )
    if not any(c.ok for c in out):
        out.append(Check("tracepoints", False, "no tracepoint podnet uses exists", "use Linux 5.15 or newer"))
    return out


def check_cgroup(root: str | None) -> Check:
    try:
        path = root or find_cgroup2_mount()
    except CgroupError as e:
        return Check("cgroup v2", False, str(e))
    if not Path(path, "cgroup.controllers").exists():
        return Check(
            "cgroup v2",
            False,
            f"{path} is not a cgroup v2 mount",
            "pass the cgroup2 mount point with --cgroup-root",
        )
    return Check("cgroup v2", True, f"mounted at {path}")


def check_bcc() -> Check:
    try:
        import bcc
        from bcc.version import __version__ as v
    except Exception as e:
        return Check(
            "BCC",
            False,
            f"cannot import bcc: {e}",
            "apt-get install python3-bpfcc (never PyPI's 'bcc'); then make setup",
        )
    return Check("BCC", True, f"bcc {v} from {Path(bcc.__file__).parent}")


def check_headers(kernel_headers: str | None) -> Check:
    """The headers tree BCC will compile against, checked before anything compiles: a tree
    without kconfig.h or the generated headers makes libbcc crash, not fail."""
    tree = find_tree(kernel_headers)
    if not tree.ok:
        return Check("kernel headers", False, tree.detail, tree.fix)
    tree.use()  # what check_load and run compile against
    return Check("kernel headers", True, tree.detail)


# Either exists on a kernel with CONFIG_UPROBES (the perf PMU needs no tracefs mount).
UPROBE_PATHS = ("/sys/bus/event_source/devices/uprobe", "/sys/kernel/tracing/uprobe_events")


def check_tls(tls: str) -> Check:
    """--tls openssl attaches uprobes to every process's libssl, which needs uprobes in the kernel
    and, to read other containers' /proc/<pid>/maps and root, CAP_SYS_PTRACE."""
    uprobes = next((path for path in UPROBE_PATHS if os.path.exists(path)), None)
    if tls != "openssl":
        where = f"uprobes available ({uprobes})" if uprobes else "no uprobes in this kernel"
        return Check("TLS", True, f"--tls {tls}: TLS connections count as turns; {where}", required=False)
    if uprobes is None:
        return Check(
            "TLS",
            False,
            f"--tls openssl, but this kernel has no uprobes (neither {' nor '.join(UPROBE_PATHS)})",
            "use a kernel built with CONFIG_UPROBES=y (and CONFIG_UPROBE_EVENTS=y), or --tls off",
            required=False,
        )
    caps = _caps()
    if not caps & (1 << CAP_SYS_PTRACE):
        return Check(
            "TLS",
            False,
            f"--tls openssl, uprobes available ({uprobes}), but no CAP_SYS_PTRACE: other containers' "
            "libssl cannot be found",
            "grant SYS_PTRACE (and hostPID: true in a pod; the Helm chart does both with config.tls=openssl)",
            required=False,
        )
    return Check(
        "TLS", True, f"--tls openssl: uprobes available ({uprobes}), CAP_SYS_PTRACE present", required=False
    )


def check_mount(name: str, path: str, fstype: str) -> Check:
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    ok = any(line.split(" ")[1:3] == [path, fstype] for line in mounts if line.count(" ") >= 2)
    return Check(
        name,
        ok,
        f"{path} {'mounted' if ok else 'not mounted'}",
        f"mount -t {fstype} {fstype if fstype != 'bpf' else 'bpf'} {path} "
        "(optional: raw tracepoints need neither)",
        required=False,
    )


def check_pins(pin_dir: str) -> Check:
    """Counters survive restarts only with a bpffs to pin into; `run` refuses to start
    without one unless told --pin-dir none."""
    if not pin_dir:
        return Check(
            "pinned state",
            False,
            "--pin-dir none: counters restart from zero whenever the exporter does",
            "pass --pin-dir on a bpf filesystem to keep them",
            required=False,
        )
    parent = pin_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent) or "/"
    if not is_bpffs(parent):
        return Check(
            "pinned state",
            False,
            f"{parent} is not a bpf filesystem",
            "mount -t bpf bpf /sys/fs/bpf, or --pin-dir none (counters then restart with the exporter)",
        )
    builds = sorted(os.listdir(pin_dir)) if os.path.isdir(pin_dir) else []
    links = sum(1 for b in builds for n in _listdir(os.path.join(pin_dir, b)) if "_link_" in n)
    left = f"{len(builds)} build(s) pinned, {links} hook(s) attached" if builds else "nothing pinned yet"
    return Check("pinned state", True, f"{pin_dir} on bpffs; {left}")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def check_load(btf: Btf, kernel_headers: str | None = None) -> Check:
    try:
        progs = load_programs(btf, resolve_offsets(btf), MapSizes(1024), kernel_headers=kernel_headers)
    except ProgramLoadError as e:
        return Check("compile and attach", False, str(e), "see the checks above")
    attached = sum(h.attached for h in progs.hooks)
    hot = progs.builds.get("tcp_traffic", "not attached")
    passed = progs.passed_over.get("tcp_traffic", [])
    progs.close()
    if passed:
        return Check(
            "compile and attach",
            False,
            f"{attached} of {len(progs.hooks)} programs attached and detached; hot path: {hot}, "
            f"the costlier fallback, because: {'; '.join(passed)}",
            "the exporter runs, at a higher cost per event; see the reasons above",
            required=False,
        )
    return Check(
        "compile and attach",
        True,
        f"{attached} of {len(progs.hooks)} programs attached and detached; hot path: {hot}",
    )


def run_checks(
    cgroup_root: str | None,
    kernel_headers: str | None = None,
    pin_dir: str = DEFAULT_ROOT,
    tls: str = "off",
) -> list[Check]:
    checks = [check_privileges(), check_bpf_syscall()]
    btf_check, btf = check_btf()
    checks.append(btf_check)
    checks += check_tracepoints(btf)
    checks.append(check_data_path(btf))
    checks += [
        check_cgroup(cgroup_root),
        check_bcc(),
        check_headers(kernel_headers),
        check_mount("tracefs", "/sys/kernel/tracing", "tracefs"),
        check_pins(pin_dir),
        check_tls(tls),
    ]
    if btf is not None and all(c.ok for c in checks if c.required):
        checks.append(check_load(btf, kernel_headers))
    return checks


def main(
    cgroup_root: str | None,
    out: Callable[[str], None] = print,
    kernel_headers: str | None = None,
    pin_dir: str = DEFAULT_ROOT,
    tls: str = "off",
) -> int:
    checks = run_checks(cgroup_root, kernel_headers, pin_dir, tls)
    for c in checks:
        mark = "ok" if c.ok else ("FAIL" if c.required else "warn")
        line = f"[{mark:>4}] {c.name}: {c.detail}"
        if not c.ok and c.fix:
            line += f" -> fix: {c.fix}"
        out(line)
    failed = [c for c in checks if c.required and not c.ok]
    out(
        "podnet-exporter can run on this host"
        if not failed
        else f"podnet-exporter cannot run here: {len(failed)} check(s) failed"
    )
    sys.stdout.flush()
    return 1 if failed else 0
