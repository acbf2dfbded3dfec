"""BPF_PROG_TEST_RUN for raw-tracepoint programs: run a program once with given args."""

from __future__ import annotations

import ctypes as ct

from exporter.kernel.bpf_syscall import bpf

_BPF_PROG_TEST_RUN = 10


class _TestAttr(ct.Structure):
    _fields_ = [
        ("prog_fd", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("data_in", ct.c_uint64),
        ("data_out", ct.c_uint64),
        ("repeat", ct.c_uint32),
        ("duration", ct.c_uint32),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("ctx_in", ct.c_uint64),
        ("ctx_out", ct.c_uint64),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


def run_raw_tp(prog_fd: int, *args: int) -> int:
    ctx = (ct.c_uint64 * len(args))(*args)
    attr = _TestAttr(prog_fd=prog_fd, ctx_size_in=ct.sizeof(ctx), ctx_in=ct.addressof(ctx))
    try:
        bpf(_BPF_PROG_TEST_RUN, attr)
    except OSError as e:
        raise OSError(e.errno, f"BPF_PROG_TEST_RUN: {e.strerror}") from None
    return int(attr.retval)
