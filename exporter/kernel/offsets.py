"""Kernel struct offsets the eBPF programs need, resolved from the running kernel's BTF.

Kernel-internal headers on a node rarely match its kernel, and a field read through the
wrong layout is silently wrong; so each field is looked up by name in
/sys/kernel/btf/vmlinux and handed to the compiler as a -D macro.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from exporter.kernel.btf import Btf, BtfError


@dataclass(frozen=True)
class FieldSpec:
    macro: str
    parts: tuple[tuple[str, str], ...]
    """(struct, dotted member path) pairs whose offsets add up: nested through embedded
    members, never through pointers."""
    size: int
    """Size the C code reads; a different size in this kernel means a changed type."""
    since: str = ""
    """The first Linux release with this field, where older ones are known to lack it."""

    def describe(self) -> str:
        return " + ".join(f"{s}.{p}" for s, p in self.parts)


def _f(macro: str, size: int, *parts: tuple[str, str], since: str = "") -> FieldSpec:
    return FieldSpec(macro, parts, size, since)


# Fields used by bpf/podnet.h, hence by every program.
CORE_FIELDS: tuple[FieldSpec, ...] = (
    _f("PODNET_OFF_SKC_FAMILY", 2, ("sock", "__sk_common.skc_family")),
    _f("PODNET_OFF_SKC_STATE", 1, ("sock", "__sk_common.skc_state")),
    _f("PODNET_OFF_SKC_DADDR", 4, ("sock", "__sk_common.skc_daddr")),
    _f("PODNET_OFF_SKC_V6_DADDR", 16, ("sock", "__sk_common.skc_v6_daddr")),
    _f("PODNET_OFF_SK_PROTOCOL", 2, ("sock", "sk_protocol")),
    # Before 5.15 sock_cgroup_data was a union of a tagged `val` and bitfields.
    _f("PODNET_OFF_SK_CGROUP", 8, ("sock", "sk_cgrp_data"), ("sock_cgroup_data", "cgroup"), since="5.15"),
    _f("PODNET_OFF_CGROUP_KN", 8, ("cgroup", "kn")),
    _f("PODNET_OFF_KERNFS_ID", 8, ("kernfs_node", "id")),
)

# Fields only some programs use: a kernel without one loses those programs only.
EXTRA_FIELDS: dict[str, FieldSpec] = {
    f.macro: f
    for f in (
        _f("PODNET_OFF_SK_ERR", 4, ("sock", "sk_err")),
        # The socket cookie sock_diag reports: how connections that existed before a
        # fresh start are recognised when they close (tcp_state.bpf.c).
        _f("PODNET_OFF_SKC_COOKIE", 8, ("sock", "__sk_common.skc_cookie")),
        _f("PODNET_OFF_TCP_SRTT_US", 4, ("tcp_sock", "srtt_us")),
        _f("PODNET_OFF_SKB_CB", 48, ("sk_buff", "cb")),
        _f("PODNET_OFF_TCP_SKB_CB_GSO_SEGS", 2, ("tcp_skb_cb", "tcp_gso_segs")),
        # x86-64 syscall registers, to find a syscall's user buffer (HTTP recognition), and
        # a uprobe's arguments and return value (TLS: di, si, cx; ax).
        _f("PODNET_OFF_PT_REGS_DI", 8, ("pt_regs", "di")),
        _f("PODNET_OFF_PT_REGS_SI", 8, ("pt_regs", "si")),
        _f("PODNET_OFF_PT_REGS_CX", 8, ("pt_regs", "cx")),
        _f("PODNET_OFF_PT_REGS_AX", 8, ("pt_regs", "ax")),
        _f("PODNET_OFF_PT_REGS_DX", 8, ("pt_regs", "dx")),
        _f("PODNET_OFF_PT_REGS_ORIG_AX", 8, ("pt_regs", "orig_ax")),
    )
}


def resolve_field(btf: Btf, spec: FieldSpec) -> int:
    """Offset in bytes; BtfError (one line) when the field is absent or changed type."""
    total = 0
    for struct, path in spec.parts:
        try:
            info = btf.field(struct, path)
        except BtfError:
            if not spec.since:
                raise
            raise BtfError(
                f"kernel BTF has no {spec.describe()}: podnet needs Linux {spec.since} or newer "
                f"(this kernel: {os.uname().release})"
            ) from None
        if info.bitfield_size:
            raise BtfError(
                f"kernel field {struct}.{path} is a bitfield here; podnet cannot read it on this kernel"
            )
        total += info.offset
    last_struct, last_path = spec.parts[-1]
    size = btf.field(last_struct, last_path).size
    if size != spec.size:
        raise BtfError(
            f"kernel field {spec.describe()} is {size} bytes here, podnet expects {spec.size}; "
            "this kernel is not supported by this podnet version"
        )
    return total


@dataclass(frozen=True)
class Offsets:
    values: Mapping[str, int]
    """macro -> byte offset, for every field that resolved."""
    missing: Mapping[str, str]
    """macro -> why it did not resolve."""

    def cflags(self) -> list[str]:
        return [f"-D{m}={v}" for m, v in sorted(self.values.items())]


def resolve_offsets(btf: Btf) -> Offsets:
    """Core fields must all resolve (raises BtfError); extra ones are reported missing."""
    values = {spec.macro: resolve_field(btf, spec) for spec in CORE_FIELDS}
    missing: dict[str, str] = {}
    for macro, spec in EXTRA_FIELDS.items():
        try:
            values[macro] = resolve_field(btf, spec)
        except BtfError as e:
            missing[macro] = str(e)
    return Offsets(values, missing)
