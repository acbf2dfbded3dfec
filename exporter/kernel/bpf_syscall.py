"""bpf(2) for what BCC 0.26 lacks: loading a program BCC compiled as a BTF-typed
tracepoint program (tp_btf) and attaching it, and mapping an array map into memory.

A tp_btf program runs on the same raw tracepoint as BCC's RAW_TRACEPOINT_PROBE, but the
verifier knows its arguments' kernel types: fields are read with plain loads (no
bpf_probe_read_kernel call, ~35 ns each here) and socket-local storage is available. BCC
compiles the C and relocates its maps; this module only hands the instructions to the
kernel with the attach target's BTF id. A mapped array (BPF_F_MMAPABLE) is read in place,
with no syscall per element.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

_NR_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}

_BPF_MAP_CREATE = 0
_BPF_PROG_LOAD = 5
_BPF_RAW_TRACEPOINT_OPEN = 17
_BPF_PROG_TYPE_TRACING = 26
_BPF_TRACE_RAW_TP = 23
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


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("_tail", ctypes.c_uint8 * 108),
    ]


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


BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_STACK = 23
BPF_F_MMAPABLE = 1 << 10


def create_map(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0) -> int:
    """BPF_MAP_CREATE; returns the map fd (the caller closes it). Raises OSError."""
    attr = _MapCreateAttr(
        map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries, map_flags=flags
    )
    return bpf(_BPF_MAP_CREATE, attr)


def _verifier_summary(log: bytes) -> str:
    lines = [ln.strip() for ln in log.decode(errors="replace").splitlines() if ln.strip()]
    # The verifier's reason is the last line that is not its statistics.
    for ln in reversed(lines):
        if not ln.startswith(("processed ", "verification time", "stack depth")):
            return ln
    return ""


def load_tp_btf(bcc_obj: Any, function: str, type_id: int, license: bytes = b"GPL") -> int:
    """Load `function` of a compiled BCC module as a tp_btf program attached to the
    tracepoint whose `btf_trace_*` typedef has `type_id`. Returns the program fd."""
    from bcc import lib  # the same libbcc that compiled bcc_obj

    name = function.encode()
    start = lib.bpf_function_start(bcc_obj.module, name)
    size = lib.bpf_function_size(bcc_obj.module, name)
    if not start or not size:
        raise BpfSyscallError(f"function {function} is not in the compiled program")
    return load_tp_btf_insns(
        ctypes.cast(start, ctypes.c_void_p).value or 0, size // 8, function, type_id, license
    )


def load_tp_btf_insns(insns: int, count: int, function: str, type_id: int, license: bytes = b"GPL") -> int:
    """load_tp_btf for `count` instructions at address `insns`."""
    name = function.encode()
    log = ctypes.create_string_buffer(_LOG_SIZE)
    lic = ctypes.create_string_buffer(license)
    attr = _ProgLoadAttr(
        prog_type=_BPF_PROG_TYPE_TRACING,
        insn_cnt=count,
        insns=insns,
        license=ctypes.addressof(lic),
        prog_name=name[:15],
        expected_attach_type=_BPF_TRACE_RAW_TP,
        attach_btf_id=type_id,
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


def attach_tp_btf(prog_fd: int) -> int:
    """Attach a loaded tp_btf program to its tracepoint; closing the returned link fd
    detaches it."""
    try:
        return bpf(_BPF_RAW_TRACEPOINT_OPEN, _RawTpOpenAttr(name=0, prog_fd=prog_fd))
    except OSError as e:
        raise BpfSyscallError(f"attaching tp_btf program failed: {e.strerror}") from None


_PROT_READ = 0x1
_MAP_SHARED = 0x01
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class MappedArray:
    """An array map created with BPF_F_MMAPABLE, mapped read-only into this process: its
    elements are read where the kernel writes them (`elements`), without a syscall."""

    def __init__(self, address: int, length: int, elements: ctypes.Array[Any]) -> None:
        self._address = address
        self._length = length
        self.elements = elements

    def close(self) -> None:
        if self._length:
            _libc.munmap(self._address, self._length)
            self._length = 0


def map_array(map_fd: int, value_type: type[Any], entries: int) -> MappedArray:
    """Map the values of array map `map_fd` (`entries` values of `value_type`, whose size
    must be a multiple of 8, as the kernel lays them out)."""
    if ctypes.sizeof(value_type) % 8:
        raise BpfSyscallError(f"{value_type.__name__} is not 8-byte aligned: cannot map its array")
    page = os.sysconf("SC_PAGE_SIZE")
    length = -(-ctypes.sizeof(value_type) * entries // page) * page
    addr = _libc.mmap(None, length, _PROT_READ, _MAP_SHARED, map_fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise BpfSyscallError(f"mapping the array map into memory failed: {os.strerror(err)}")
    return MappedArray(addr, length, (value_type * entries).from_address(addr))


# ---- pinning (bpffs) ------------------------------------------------------------------

_BPF_OBJ_PIN = 6
_BPF_OBJ_GET = 7
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("_tail", ctypes.c_uint8 * 16),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _IdAttr(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
        ("_tail", ctypes.c_uint8 * 20),
    ]


def obj_pin(fd: int, path: str) -> None:
    """BPF_OBJ_PIN: the object (map, program, link) lives on at `path` in bpffs."""
    name = ctypes.create_string_buffer(path.encode())
    bpf(_BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(name), bpf_fd=fd))


def obj_get(path: str) -> int:
    """BPF_OBJ_GET: a new fd for the object pinned at `path` (the caller closes it)."""
    name = ctypes.create_string_buffer(path.encode())
    return bpf(_BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(name)))


def _info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    bpf(_BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=size, info=ctypes.addressof(buf)))
    return buf.raw


def map_id(fd: int) -> int:
    """The kernel's id of a map (struct bpf_map_info: type, id, ...): unique until reboot."""
    return int.from_bytes(_info(fd, 80)[4:8], "little")


def link_prog_id(fd: int) -> int:
    """The id of the program a link runs (struct bpf_link_info: type, id, prog_id, ...)."""
    return int.from_bytes(_info(fd, 64)[8:12], "little")


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(_BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))
