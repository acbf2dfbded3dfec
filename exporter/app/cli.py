"""Command line entry point: `podnet-exporter run | doctor | reset | bpf-source`.

Every anticipated failure ends as one line on stderr and a non-zero exit, never a
traceback."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from exporter.app.checkpoint import StateLock, StateLockError
from exporter.app.config import ConfigError, parse_args, resolve
from exporter.app.service import ServeError, serve
from exporter.export.web_config import WebConfigError
from exporter.kernel.btf import Btf, BtfError
from exporter.kernel.headers import PODNET_ENV, find_tree
from exporter.kernel.offsets import resolve_offsets
from exporter.kernel.pins import PinError, remove_tree
from exporter.kernel.programs import (
    BPF_DIR,
    PROGRAMS,
    MapSizes,
    ProgramLoadError,
    check_hook,
    program_cflags,
    variants,
)
from exporter.pods.cgroups import CgroupError
from exporter.pods.pods import PodsFileError

_PROG = "podnet-exporter"
FATAL = (
    ConfigError,
    BtfError,
    CgroupError,
    PodsFileError,
    ProgramLoadError,
    ServeError,
    PinError,
    StateLockError,
    WebConfigError,
)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def bpf_source(preprocessed: bool) -> int:
    """Print what the loader would compile: the offsets and flags per program, then the C."""
    btf = Btf.load()
    offsets = resolve_offsets(btf)
    if preprocessed:  # BCC compiles: point it at a usable headers tree first, or fail in one line
        headers = find_tree(os.environ.get(PODNET_ENV) or None)
        if not headers.ok:
            raise ProgramLoadError(headers.reason)
        headers.use()
    print("// resolved kernel struct offsets (from /sys/kernel/btf/vmlinux)")
    for macro, value in sorted(offsets.values.items()):
        print(f"#define {macro} {value}")
    for macro, why in sorted(offsets.missing.items()):
        print(f"// {macro} unresolved: {why}")
    for spec in PROGRAMS:
        nargs = {h.tracepoint: check_hook(btf, h)[1] for h in spec.hooks}
        flags = program_cflags(spec, offsets, MapSizes(), nargs) + list(variants(spec)[0].cflags)
        print(f"\n// ===== {spec.source} =====\n// cflags: {' '.join(flags)}")
        others = [" ".join(v.cflags) or "(none)" for v in variants(spec)[1:]]
        print(f"// fallback builds, in order, add instead: {'; '.join(others)}")
        if preprocessed:
            from bcc import BPF, DEBUG_PREPROCESSOR

            sys.stdout.flush()
            os.dup2(1, 2)  # BCC prints the preprocessed source on stderr
            BPF(src_file=str(spec.source).encode(), cflags=flags, debug=DEBUG_PREPROCESSOR).cleanup()
        else:
            print(spec.source.read_text())
    if not preprocessed:
        for header in sorted(BPF_DIR.glob("*.h")):
            print(f"\n// ===== {header} =====\n{header.read_text()}")
    return 0


def reset(pin_dir: str, state_dir: str) -> int:
    """Remove every pinned map and program under `pin_dir` (detaching the programs) and
    the totals saved in `state_dir`. Refused while an exporter uses them."""
    lock = StateLock(state_dir)
    lock.acquire(timeout=0)
    builds, totals = [], []
    if pin_dir and os.path.isdir(pin_dir):
        for name in sorted(os.listdir(pin_dir)):
            remove_tree(os.path.join(pin_dir, name))
            builds.append(os.path.join(pin_dir, name))
    if os.path.isdir(state_dir):
        for name in sorted(os.listdir(state_dir)):
            if name.startswith(("totals-", ".totals-")):
                os.unlink(os.path.join(state_dir, name))
                totals.append(os.path.join(state_dir, name))
    listed = "".join(f"\n  {path}" for path in builds + totals)
    print(
        f"removed {len(builds)} pinned build(s), their programs detached, "
        f"and {len(totals)} totals file(s){listed}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        command, ns = parse_args(args)
        if command == "doctor":
            from exporter.app import doctor

            config = resolve(ns, os.environ)
            return doctor.main(
                config.cgroup_root,
                kernel_headers=config.kernel_headers,
                pin_dir=config.pin_dir,
                tls=config.tls,
            )
        if command == "bpf-source":
            return bpf_source(ns.preprocessed)
        if command == "reset":
            config = resolve(ns, os.environ)
            return reset(config.pin_dir, config.state_dir)
        config = resolve(ns, os.environ)
        _setup_logging(config.log_level)
        if asyncio.run(serve(config)):
            # Stopped during start-up: a daemon thread may still be inside BCC's compiler.
            # Exit now, as the kernel would on SIGKILL (unpinned programs detach with their
            # fds), rather than let interpreter teardown run C++ destructors under it.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0
    except FATAL as e:
        print(f"{_PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except BaseExceptionGroup as eg:  # raised from inside the task group
        fatal, rest = eg.split(FATAL)
        if fatal is None or rest is not None:
            raise
        print(f"{_PROG}: error: {fatal.exceptions[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `podnet-exporter bpf-source | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
