"""Per-program run time and run count from the kernel (BPF_OBJ_GET_INFO_BY_FD), which it
keeps only while sysctl kernel.bpf_stats_enabled is 1."""

from __future__ import annotations

import ctypes as ct
from pathlib import Path

from exporter.kernel.bpf_syscall import BpfSyscallError, bpf

_BPF_OBJ_GET_INFO_BY_FD = 15


class _BpfProgInfo(ct.Structure):
    # Leading part of struct bpf_prog_info (uapi, append-only), up to run_cnt.
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
        ("ifindex", ct.c_uint32),
        ("gpl_compatible", ct.c_uint32),
        ("netns_dev", ct.c_uint64),
        ("netns_ino", ct.c_uint64),
        ("nr_jited_ksyms", ct.c_uint32),
        ("nr_jited_func_lens", ct.c_uint32),
        ("jited_ksyms", ct.c_uint64),
        ("jited_func_lens", ct.c_uint64),
        ("btf_id", ct.c_uint32),
        ("func_info_rec_size", ct.c_uint32),
        ("func_info", ct.c_uint64),
        ("nr_func_info", ct.c_uint32),
        ("nr_line_info", ct.c_uint32),
        ("line_info", ct.c_uint64),
        ("jited_line_info", ct.c_uint64),
        ("nr_jited_line_info", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32),
        ("jited_line_info_rec_size", ct.c_uint32),
        ("nr_prog_tags", ct.c_uint32),
        ("prog_tags", ct.c_uint64),
        ("run_time_ns", ct.c_uint64),
        ("run_cnt", ct.c_uint64),
    ]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


def stats_enabled(path: str = "/proc/sys/kernel/bpf_stats_enabled") -> bool:
    try:
        return Path(path).read_text().strip() == "1"
    except OSError:
        return False


def prog_run_stats(fd: int) -> tuple[int, int] | None:
    """(run_time_ns, run_cnt) of the program behind fd, or None if the kernel refuses."""
    info = _BpfProgInfo()
    attr = _InfoAttr(fd, ct.sizeof(info), ct.addressof(info))
    try:
        bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    except (OSError, BpfSyscallError):
        return None
    return int(info.run_time_ns), int(info.run_cnt)
