"""bpf(2) for what BCC 0.26 lacks: loading a program BCC compiled as a BTF-typed
tracepoint program (tp_btf) or as a BPF iterator, attaching it, and reading an iterator.

A tp_btf program runs on the same raw tracepoint as BCC's RAW_TRACEPOINT_PROBE, but the
verifier knows its arguments' kernel types: fields are read with plain loads (no
bpf_probe_read_kernel call, ~35 ns each here) and socket-local storage is available. An
iterator over a socket-storage map lets userspace read every socket's state, which no
map lookup can enumerate. BCC compiles the C and relocates its maps; this module only
hands the instructions to the kernel with the attach target's BTF id.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

_NR_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}

_BPF_PROG_LOAD = 5
_BPF_RAW_TRACEPOINT_OPEN = 17
_BPF_LINK_CREATE = 28
_BPF_ITER_CREATE = 33
_BPF_PROG_TYPE_TRACING = 26
_BPF_TRACE_RAW_TP = 23
_BPF_TRACE_ITER = 28
_LOG_SIZE = 1 << 20


class BpfSyscallError(Exception):
    """One line: what the kernel refused and, for the verifier, its last words."""


class _ProgLoadAttr(ctypes.Structure):
    # union bpf_attr, BPF_PROG_LOAD member (UAPI, fields in kernel order; zero tail).
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("_tail", ctypes.c_uint8 * 64),
    ]


class _RawTpOpenAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("_tail", ctypes.c_uint8 * 20)]


class _IterLinkAttr(ctypes.Structure):
    # BPF_LINK_CREATE member: prog_fd, target_fd, attach_type, flags, iter_info, iter_info_len.
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iter_info", ctypes.c_uint64),
        ("iter_info_len", ctypes.c_uint32),
        ("_tail", ctypes.c_uint8 * 36),
    ]


class _IterCreateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("_tail", ctypes.c_uint8 * 8)]


_libc = ctypes.CDLL(None, use_errno=True)


_MACHINE = os.uname().machine
_NR = _NR_BPF.get(_MACHINE)


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(2) with `attr` as the command's part of union bpf_attr; raises OSError."""
    if _NR is None:
        raise BpfSyscallError(f"bpf(2) syscall number unknown on {_MACHINE}")
    ret = int(_libc.syscall(ctypes.c_long(_NR), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _verifier_summary(log: bytes) -> str:
    lines = [ln.strip() for ln in log.decode(errors="replace").splitlines() if ln.strip()]
    # The verifier's reason is the last line that is not its statistics.
    for ln in reversed(lines):
        if not ln.startswith(("processed ", "verification time", "stack depth")):
            return ln
    return ""


def _load_tracing(bcc_obj: Any, function: str, attach_type: int, btf_id: int, license: bytes) -> int:
    from bcc import lib  # the same libbcc that compiled bcc_obj

    name = function.encode()
    start = lib.bpf_function_start(bcc_obj.module, name)
    size = lib.bpf_function_size(bcc_obj.module, name)
    if not start or not size:
        raise BpfSyscallError(f"function {function} is not in the compiled program")
    log = ctypes.create_string_buffer(_LOG_SIZE)
    lic = ctypes.create_string_buffer(license)
    attr = _ProgLoadAttr(
        prog_type=_BPF_PROG_TYPE_TRACING,
        insn_cnt=size // 8,
        insns=ctypes.cast(start, ctypes.c_void_p).value or 0,
        license=ctypes.addressof(lic),
        prog_name=name[:15],
        expected_attach_type=attach_type,
        attach_btf_id=btf_id,
    )
    try:
        return bpf(_BPF_PROG_LOAD, attr)
    except OSError as first:
        # Load again with the verifier's log only on failure: logging slows loading.
        attr.log_level, attr.log_size, attr.log_buf = 1, _LOG_SIZE, ctypes.addressof(log)
        try:
            return bpf(_BPF_PROG_LOAD, attr)
        except OSError as e:
            why = _verifier_summary(log.value)
            raise BpfSyscallError(
                f"kernel refused program {function}: {e.strerror or first}" + (f" ({why})" if why else "")
            ) from None


def load_tp_btf(bcc_obj: Any, function: str, type_id: int, license: bytes = b"GPL") -> int:
    """Load `function` of a compiled BCC module as a tp_btf program attached to the
    tracepoint whose `btf_trace_*` typedef has `type_id`. Returns the program fd."""
    return _load_tracing(bcc_obj, function, _BPF_TRACE_RAW_TP, type_id, license)


def load_iter(bcc_obj: Any, function: str, func_id: int, license: bytes = b"GPL") -> int:
    """Load `function` as a BPF iterator program for the target whose `bpf_iter_<target>`
    kernel function has BTF id `func_id`. Returns the program fd."""
    return _load_tracing(bcc_obj, function, _BPF_TRACE_ITER, func_id, license)


def attach_map_iter(prog_fd: int, map_fd: int) -> int:
    """A link running the iterator program over the map `map_fd`; each iter_read() walks
    the map anew."""
    info = (ctypes.c_uint32 * 2)(map_fd, 0)  # union bpf_iter_link_info: map.map_fd
    attr = _IterLinkAttr(
        prog_fd=prog_fd,
        attach_type=_BPF_TRACE_ITER,
        iter_info=ctypes.addressof(info),
        iter_info_len=ctypes.sizeof(info),
    )
    try:
        return bpf(_BPF_LINK_CREATE, attr)
    except OSError as e:
        raise BpfSyscallError(f"creating the map iterator failed: {e.strerror}") from None


def iter_read(link_fd: int, chunk: int = 1 << 16) -> bytes:
    """Everything the iterator program writes in one walk (bpf_seq_write records)."""
    fd = bpf(_BPF_ITER_CREATE, _IterCreateAttr(link_fd=link_fd))
    try:
        parts: list[bytes] = []
        while True:
            part = os.read(fd, chunk)
            if not part:
                return b"".join(parts)
            parts.append(part)
    finally:
        os.close(fd)


def attach_tp_btf(prog_fd: int) -> int:
    """Attach a loaded tp_btf program to its tracepoint; closing the returned link fd
    detaches it."""
    try:
        return bpf(_BPF_RAW_TRACEPOINT_OPEN, _RawTpOpenAttr(name=0, prog_fd=prog_fd))
    except OSError as e:
        raise BpfSyscallError(f"attaching tp_btf program failed: {e.strerror}") from None
