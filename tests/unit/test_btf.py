"""Tests for exporter.kernel.btf: synthetic blobs from a tiny BTF writer, fuzzing, and the running
kernel's BTF."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.kernel.btf import Btf, BtfError, FieldInfo

VMLINUX = Path("/sys/kernel/btf/vmlinux")
BPFTOOL = shutil.which("bpftool") or ("/usr/sbin/bpftool" if os.path.exists("/usr/sbin/bpftool") else None)

# Kind numbers from Documentation/bpf/btf.rst, spelled out independently of exporter.kernel.btf.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST = range(1, 11)
RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(11, 20)


# ------------------------------------------------------------------------------------------ BTF writer


class Member(NamedTuple):
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int = 0


@dataclass
class BtfWriter:
    """Builds BTF blobs type by type; each add method returns the new type's id."""

    byteorder: str = "<"
    dedup_strings: bool = True  # producers deduplicate, but the format does not require it
    _types: list[bytes] = field(default_factory=list)
    _strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    _string_offsets: dict[str, int] = field(default_factory=lambda: {"": 0})

    @property
    def next_id(self) -> int:
        return len(self._types) + 1

    def _str(self, name: str) -> int:
        if name and not self.dedup_strings:
            self._strings += name.encode() + b"\0"
            return len(self._strings) - len(name.encode()) - 1
        if name not in self._string_offsets:
            self._string_offsets[name] = len(self._strings)
            self._strings += name.encode() + b"\0"
        return self._string_offsets[name]

    def _u32(self, *values: int) -> bytes:
        return struct.pack(f"{self.byteorder}{len(values)}I", *values)

    def add(
        self, kind: int, name: str = "", vlen: int = 0, kind_flag: bool = False, size_or_type: int = 0
    ) -> int:
        info = (int(kind_flag) << 31) | (kind << 24) | vlen
        self._types.append(self._u32(self._str(name), info, size_or_type))
        return len(self._types)

    def _extra(self, *values: int) -> None:
        self._types[-1] += self._u32(*values)

    def int_(self, name: str, size: int, signed: bool = True, nr_bits: int = 0, bit_off: int = 0) -> int:
        type_id = self.add(INT, name, size_or_type=size)
        self._extra((int(signed) << 24) | (bit_off << 16) | (nr_bits or size * 8))
        return type_id

    def ptr(self, target: int) -> int:
        return self.add(PTR, size_or_type=target)

    def array(self, elem: int, nelems: int, index_type: int) -> int:
        type_id = self.add(ARRAY)
        self._extra(elem, index_type, nelems)
        return type_id

    def composite(self, name: str, size: int, members: list[Member], union: bool = False) -> int:
        kind_flag = any(m.bitfield_size for m in members)
        type_id = self.add(UNION if union else STRUCT, name, len(members), kind_flag, size)
        for m in members:
            offset = (m.bitfield_size << 24) | m.bit_offset if kind_flag else m.bit_offset
            self._extra(self._str(m.name), m.type_id, offset)
        return type_id

    def enum(self, name: str, values: dict[str, int], size: int = 4) -> int:
        type_id = self.add(ENUM, name, len(values), size_or_type=size)
        for value_name, value in values.items():
            self._extra(self._str(value_name), value & 0xFFFFFFFF)
        return type_id

    def fwd(self, name: str, union: bool = False) -> int:
        return self.add(FWD, name, kind_flag=union)

    def typedef(self, name: str, target: int) -> int:
        return self.add(TYPEDEF, name, size_or_type=target)

    def const(self, target: int) -> int:
        return self.add(CONST, size_or_type=target)

    def volatile(self, target: int) -> int:
        return self.add(VOLATILE, size_or_type=target)

    def type_tag(self, name: str, target: int) -> int:
        return self.add(TYPE_TAG, name, size_or_type=target)

    def func_proto(self, ret: int, params: list[int]) -> int:
        type_id = self.add(FUNC_PROTO, vlen=len(params), size_or_type=ret)
        for param in params:
            self._extra(0, param)
        return type_id

    def func(self, name: str, proto: int) -> int:
        return self.add(FUNC, name, vlen=1, size_or_type=proto)  # vlen carries the linkage (global)

    def raw_tracepoint(self, name: str, args: list[int]) -> int:
        void_ptr = self.ptr(0)
        return self.typedef(f"btf_trace_{name}", self.ptr(self.func_proto(0, [void_ptr, *args])))

    def build(self, magic: int = 0xEB9F, version: int = 1) -> bytes:
        types = b"".join(self._types)
        header = struct.pack(
            f"{self.byteorder}HBBIIIII", magic, version, 0, 24, 0, len(types), len(types), len(self._strings)
        )
        return header + types + bytes(self._strings)


def build_kernel_like(byteorder: str = "<", dedup_strings: bool = True) -> bytes:
    """A miniature of the vmlinux types podnet reads, with every construct the reader must handle."""
    w = BtfWriter(byteorder, dedup_strings)
    u8 = w.int_("unsigned char", 1, signed=False)
    u16 = w.int_("short unsigned int", 2, signed=False)
    uint = w.int_("unsigned int", 4, signed=False)
    int_ = w.int_("int", 4)
    w.int_("long int", 8)
    u64 = w.int_("long long unsigned int", 8, signed=False)
    u32 = w.typedef("u32", w.typedef("__u32", uint))
    be32 = w.typedef("__be32", w.typedef("__u32_alias", uint))
    be16 = w.typedef("__be16", u16)

    addr_pair = w.composite("", 8, [Member("skc_daddr", be32, 0), Member("skc_rcv_saddr", be32, 32)])
    addr_union = w.composite("", 8, [Member("skc_addrpair", u64, 0), Member("", addr_pair, 0)], union=True)
    port_pair = w.composite("", 4, [Member("skc_dport", be16, 0), Member("skc_num", u16, 16)])
    # Anonymous union inside an anonymous struct inside an anonymous union, as in sock_common.
    port_union = w.composite("", 4, [Member("skc_portpair", uint, 0), Member("", port_pair, 0)], union=True)
    in6_addr = w.composite("in6_addr", 16, [Member("s6_addr", w.array(u8, 16, int_), 0)])
    net_fwd = w.fwd("net")
    possible_net = w.typedef("possible_net_t", w.composite("", 8, [Member("net", w.ptr(net_fwd), 0)]))
    const_volatile_u32 = w.const(w.volatile(u32))
    sock_common = w.composite(
        "sock_common",
        136,
        [
            Member("", addr_union, 0),
            Member("", port_union, 96),
            Member("skc_family", u16, 128),
            Member("skc_reuse", u8, 152, 4),
            Member("skc_reuseport", u8, 156, 1),
            Member("skc_ipv6only", u8, 157, 1),
            Member("skc_bound_dev_if", int_, 160),
            Member("skc_net", possible_net, 384),
            Member("skc_v6_daddr", in6_addr, 448),
            Member("skc_flags", const_volatile_u32, 704),
        ],
    )
    sock_ptr = w.ptr(sock_common)  # placeholder pointer member target, replaced below by struct sock *
    cgroup_fwd = w.fwd("cgroup")
    cgrp_data = w.composite("sock_cgroup_data", 16, [Member("cgroup", w.ptr(cgroup_fwd), 0)])
    legacy_bits = w.int_("unsigned int", 4, signed=False, nr_bits=3, bit_off=2)
    legacy = w.composite("legacy_bits", 4, [Member("mode", legacy_bits, 0), Member("whole", uint, 0)])
    w.composite("dup", 0, [])  # zero-size placeholder first, as vmlinux BTF sometimes has
    w.fwd("dup")
    w.composite("dup", 8, [Member("first", u64, 0)])
    w.composite("dup", 16, [Member("second", u64, 64)])
    w.composite("only_empty", 0, [])
    w.typedef("struct_typedef", w.const(cgrp_data))
    sock = w.composite(
        "sock",
        784,
        [
            Member("__sk_common", sock_common, 0),
            Member("sk_err", int_, 2272),
            Member("sk_protocol", u16, 4256),
            Member("sk_type", u16, 4272),
            Member("sk_peer", sock_ptr, 4288),
            Member("sk_cgrp_data", w.typedef("cgrp_t", w.const(cgrp_data)), 5376),
            Member("sk_legacy", legacy, 5504),
            Member("sk_ports", w.array(be16, 4, int_), 5536),
            Member("sk_odd", u8, 5603, 3),
            Member("sk_tagged", w.type_tag("user", u32), 5632),
        ],
    )
    w.composite("tcp_sock", 2200, [Member("inet_conn", sock, 0), Member("srtt_us", u32, 13440)])
    w.composite("u_with_members", 8, [Member("a", uint, 0), Member("b", u64, 0)], union=True)
    rst_reason = w.enum("sk_rst_reason", {"SK_RST_REASON_NOT_SPECIFIED": 0})
    w.func("tcp_v4_rcv", w.func_proto(int_, [w.ptr(sock)]))

    sock_p = w.ptr(sock)
    const_sock_p = w.ptr(w.const(sock))
    const_int = w.const(int_)
    w.raw_tracepoint("sock_send_length", [sock_p, int_, int_])
    w.raw_tracepoint("inet_sock_set_state", [const_sock_p, const_int, const_int])
    w.raw_tracepoint("tcp_send_reset", [const_sock_p, w.const(rst_reason)])
    handler = w.ptr(w.func_proto(0, [sock_p, w.ptr(w.ptr(u8))]))
    w.raw_tracepoint("odd_args", [w.const(sock_p), handler, u32, w.array(int_, 2, int_)])
    w.raw_tracepoint("no_args", [])
    w.typedef("btf_trace_not_a_pointer", int_)
    w.typedef("btf_trace_no_context", w.ptr(w.func_proto(0, [])))
    return w.build()


KERNEL_LIKE = build_kernel_like()


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf.from_bytes(KERNEL_LIKE, "synthetic")


# --------------------------------------------------------------------------------- table-driven fields

FIELD_CASES = [
    # (struct, path, offset, size, bit_offset, bitfield_size)
    ("sock", "__sk_common.skc_daddr", 0, 4, 0, 0),
    ("sock", "__sk_common.skc_rcv_saddr", 4, 4, 32, 0),
    ("sock", "__sk_common.skc_addrpair", 0, 8, 0, 0),
    ("sock", "__sk_common.skc_dport", 12, 2, 96, 0),
    ("sock", "__sk_common.skc_num", 14, 2, 112, 0),
    ("sock", "__sk_common.skc_portpair", 12, 4, 96, 0),
    ("sock", "__sk_common.skc_family", 16, 2, 128, 0),
    ("sock", "__sk_common.skc_reuse", 19, 1, 152, 4),
    ("sock", "__sk_common.skc_reuseport", 19, 1, 156, 1),
    ("sock", "__sk_common.skc_bound_dev_if", 20, 4, 160, 0),
    ("sock", "__sk_common.skc_net", 48, 8, 384, 0),
    ("sock", "__sk_common.skc_net.net", 48, 8, 384, 0),  # through a typedef'd anonymous struct
    ("sock", "__sk_common.skc_v6_daddr", 56, 16, 448, 0),
    ("sock", "__sk_common.skc_v6_daddr.s6_addr", 56, 16, 448, 0),  # an array member
    ("sock", "__sk_common.skc_flags", 88, 4, 704, 0),  # const volatile typedef chain
    ("sock", "__sk_common", 0, 136, 0, 0),
    ("sock", "sk_err", 284, 4, 2272, 0),
    ("sock", "sk_protocol", 532, 2, 4256, 0),
    ("sock", "sk_type", 534, 2, 4272, 0),
    ("sock", "sk_peer", 536, 8, 4288, 0),  # pointer size comes from 'long int'
    ("sock", "sk_cgrp_data", 672, 16, 5376, 0),
    ("sock", "sk_cgrp_data.cgroup", 672, 8, 5376, 0),  # through typedef + const
    ("sock", "sk_legacy.mode", 688, 4, 5506, 3),  # bitfield encoded in the INT type
    ("sock", "sk_legacy.whole", 688, 4, 5504, 0),
    ("sock", "sk_ports", 692, 8, 5536, 0),
    ("sock", "sk_odd", 700, 1, 5603, 3),
    ("sock", "sk_tagged", 704, 4, 5632, 0),
    ("struct sock", "sk_err", 284, 4, 2272, 0),
    ("sock_common", "skc_daddr", 0, 4, 0, 0),
    ("sock_cgroup_data", "cgroup", 0, 8, 0, 0),
    ("tcp_sock", "srtt_us", 1680, 4, 13440, 0),
    ("tcp_sock", "inet_conn.__sk_common.skc_dport", 12, 2, 96, 0),
    ("dup", "first", 0, 8, 0, 0),  # first same-named struct with a non-zero size wins
    ("union u_with_members", "b", 0, 8, 0, 0),
]


@pytest.mark.parametrize(("struct_name", "path", "offset", "size", "bit_offset", "bits"), FIELD_CASES)
def test_field(
    btf: Btf, struct_name: str, path: str, offset: int, size: int, bit_offset: int, bits: int
) -> None:
    assert btf.field(struct_name, path) == FieldInfo(offset, size, bit_offset, bits)


VARIANTS = {
    "big-endian": build_kernel_like(">"),
    "duplicate-strings": build_kernel_like(dedup_strings=False),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_field_variants(variant: str) -> None:
    btf = Btf.from_bytes(VARIANTS[variant], variant)
    for struct_name, path, offset, size, bit_offset, bits in FIELD_CASES:
        assert btf.field(struct_name, path) == FieldInfo(offset, size, bit_offset, bits), (struct_name, path)
    assert btf.raw_tracepoint_args("inet_sock_set_state") == ["const struct sock *", "const int", "const int"]
    assert btf.sizeof("u32") == 4


def test_duplicate_strings_variant_really_duplicates() -> None:
    assert VARIANTS["duplicate-strings"].split(b"\0").count(b"dup") == 4  # 3 structs and a FWD
    assert KERNEL_LIKE.split(b"\0").count(b"dup") == 1


@pytest.mark.parametrize(
    ("struct_name", "path", "expected"),
    [
        ("sock", "__sk_common.skc_family", 16),
        ("sock", "sk_cgrp_data.cgroup", 672),
        ("sock", "__sk_common.skc_reuse", 19),  # a bitfield that happens to start on a byte boundary
    ],
)
def test_offsetof(btf: Btf, struct_name: str, path: str, expected: int) -> None:
    assert btf.offsetof(struct_name, path) == expected


@pytest.mark.parametrize("path", ["__sk_common.skc_reuseport", "sk_legacy.mode", "sk_odd"])
def test_offsetof_rejects_unaligned_bitfields(btf: Btf, path: str) -> None:
    with pytest.raises(BtfError, match=rf"field '{re.escape(path)}' in sock is a \d+-bit bitfield"):
        btf.offsetof("sock", path)


@pytest.mark.parametrize(
    ("type_name", "expected"),
    [
        ("struct sock", 784),
        ("sock", 784),
        ("sock_common", 136),
        ("u32", 4),
        ("__be16", 2),
        ("int", 4),
        ("unsigned int", 4),
        ("possible_net_t", 8),
        ("struct_typedef", 16),
        ("enum sk_rst_reason", 4),
        ("sk_rst_reason", 4),
        ("union u_with_members", 8),
        ("struct sock *", 8),
        ("char **", 8),
        ("dup", 8),
        ("only_empty", 0),
    ],
)
def test_sizeof(btf: Btf, type_name: str, expected: int) -> None:
    assert btf.sizeof(type_name) == expected


def test_has_struct(btf: Btf) -> None:
    assert btf.has_struct("sock")
    assert btf.has_struct("struct sock_common")
    assert btf.has_struct("only_empty")
    assert btf.has_struct("union u_with_members")
    assert not btf.has_struct("net")  # only a forward declaration
    assert not btf.has_struct("u32")  # a typedef
    assert not btf.has_struct("u_with_members")  # a union, not a struct
    assert not btf.has_struct("tcp_v4_rcv")


@pytest.mark.parametrize(
    ("tracepoint", "expected"),
    [
        ("sock_send_length", ["struct sock *", "int", "int"]),
        ("inet_sock_set_state", ["const struct sock *", "const int", "const int"]),
        ("tcp_send_reset", ["const struct sock *", "const enum sk_rst_reason"]),
        ("odd_args", ["struct sock *const", "void (*)(struct sock *, unsigned char **)", "u32", "int[2]"]),
        ("no_args", []),
        ("no_such_tp", None),
        ("", None),
    ],
)
def test_raw_tracepoint_args(btf: Btf, tracepoint: str, expected: list[str] | None) -> None:
    assert btf.raw_tracepoint_args(tracepoint) == expected


@pytest.mark.parametrize("tracepoint", ["not_a_pointer", "no_context"])
def test_raw_tracepoint_args_malformed(btf: Btf, tracepoint: str) -> None:
    with pytest.raises(BtfError, match=f"btf_trace_{tracepoint}"):
        btf.raw_tracepoint_args(tracepoint)


# ------------------------------------------------------------------------------------------ errors

UNSUPPORTED = "; this kernel is not supported by this podnet version (please report it with 'uname -r')"


def test_missing_field_message(btf: Btf) -> None:
    with pytest.raises(BtfError) as exc:
        btf.field("sock", "sk_cgrp_data_v2")
    assert (
        str(exc.value) == f"kernel BTF (synthetic) has no field 'sk_cgrp_data_v2' in struct sock{UNSUPPORTED}"
    )


@pytest.mark.parametrize(
    ("struct_name", "path", "message"),
    [
        ("sock", "__sk_common.skc_nope", "has no field '__sk_common.skc_nope' in struct sock"),
        ("sock", "skc_daddr", "has no field 'skc_daddr' in struct sock"),  # anonymous search is per level
        ("sock", "sk_peer.skc_daddr", "which is not an embedded struct or union"),  # never through pointers
        ("sock", "sk_err.x", "has field 'sk_err' in struct sock of type 'int'"),
        ("sock", "sk_ports.x", "of type '__be16[4]'"),
        ("no_such_struct", "x", "has no struct 'no_such_struct'"),
        ("net", "ns", "has no struct 'net'"),  # a FWD is not a definition
        ("u32", "x", "has no struct 'u32'"),
        ("union sock", "sk_err", "has no union 'sock'"),
    ],
)
def test_field_errors(btf: Btf, struct_name: str, path: str, message: str) -> None:
    with pytest.raises(BtfError) as exc:
        btf.field(struct_name, path)
    assert message in str(exc.value)
    assert str(exc.value).startswith("kernel BTF (synthetic) ")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("path", ["", ".", "sk_err.", "sk_ports[0]", "sk_peer->x", "a b"])
def test_invalid_paths(btf: Btf, path: str) -> None:
    with pytest.raises(BtfError, match="invalid field path"):
        btf.field("sock", path)


@pytest.mark.parametrize(
    ("type_name", "message"),
    [
        ("no_such_type", "has no type 'no_such_type'"),
        ("struct net", "has no struct 'net'"),  # only a forward declaration
        ("enum nope", "has no type 'enum nope'"),
        ("tcp_v4_rcv", "has no type 'tcp_v4_rcv'"),  # a function, not a type with a size
    ],
)
def test_sizeof_missing(btf: Btf, type_name: str, message: str) -> None:
    with pytest.raises(BtfError, match=re.escape(message)):
        btf.sizeof(type_name)


def test_sizeof_of_incomplete_type(btf: Btf) -> None:
    w = BtfWriter()
    w.typedef("opaque_t", w.fwd("opaque"))
    with pytest.raises(BtfError, match=r"has type 'struct opaque' \(FWD\), which has no size"):
        Btf.from_bytes(w.build()).sizeof("opaque_t")


# ---------------------------------------------------------------------------------- garbled input

NO_BTF = "; the kernel needs CONFIG_DEBUG_INFO_BTF=y (check: ls /sys/kernel/btf/vmlinux)"


def exercise(btf: Btf) -> None:
    """Run every query; on garbled data each may fail, but only with BtfError."""
    queries: list[Callable[[], object]] = [
        lambda: btf.field("sock", "__sk_common.skc_net.net"),
        lambda: btf.field("sock", "sk_legacy.mode"),
        lambda: btf.field("tcp_sock", "inet_conn.__sk_common.skc_dport"),
        lambda: btf.offsetof("sock", "sk_cgrp_data.cgroup"),
        lambda: btf.sizeof("sock"),
        lambda: btf.sizeof("u32"),
        lambda: btf.sizeof("struct sock *"),
        lambda: btf.has_struct("dup"),
        lambda: btf.raw_tracepoint_args("odd_args"),
        lambda: btf.raw_tracepoint_args("tcp_send_reset"),
    ]
    for query in queries:
        try:
            query()
        except BtfError as e:
            assert "\n" not in str(e)


def load_or_error(data: bytes) -> Btf | None:
    try:
        return Btf.from_bytes(data, "fuzz")
    except BtfError as e:
        assert str(e).startswith("cannot read kernel BTF at fuzz: ")
        assert str(e).endswith(NO_BTF)
        return None


def header_with(**changes: int) -> bytes:
    names = ["magic", "version", "flags", "hdr_len", "type_off", "type_len", "str_off", "str_len"]
    values = dict(zip(names, struct.unpack_from("<HBBIIIII", KERNEL_LIKE), strict=True))
    values.update(changes)
    return struct.pack("<HBBIIIII", *values.values()) + KERNEL_LIKE[24:]


def with_type_len(blob: bytes, length: int) -> bytes:
    return blob[:12] + struct.pack("<I", length) + blob[16:]


def struct_blob() -> bytes:
    w = BtfWriter()
    w.composite("s", 4, [Member("a", 1, 0)])
    return w.build()


def type_len() -> int:
    return int(struct.unpack_from("<I", KERNEL_LIKE, 12)[0])


@pytest.mark.parametrize("cut", [0, 1, 23, 24, 25, 100, len(KERNEL_LIKE) // 2, len(KERNEL_LIKE) - 1])
def test_truncated_blob(cut: int) -> None:
    with pytest.raises(BtfError, match=r"^cannot read kernel BTF at cut: .*CONFIG_DEBUG_INFO_BTF=y"):
        Btf.from_bytes(KERNEL_LIKE[:cut], "cut")


def test_every_truncation_is_rejected() -> None:
    for cut in range(len(KERNEL_LIKE)):
        with pytest.raises(BtfError):
            Btf.from_bytes(KERNEL_LIKE[:cut])


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"\x7fELF" + bytes(40), "bad magic"),
        (BtfWriter().build(magic=0x1234), "bad magic"),
        (BtfWriter().build(version=2), "unsupported BTF version 2"),
        (header_with(hdr_len=8), "header length 8"),
        (header_with(hdr_len=1 << 31), "header length"),
        (header_with(type_len=1 << 20), "type section"),
        (header_with(str_off=(1 << 32) - 1), "string section"),
        (header_with(str_len=0), "string section is empty"),
        (with_type_len(struct_blob(), 20), "type 1 extends beyond the end of the type section"),
        (with_type_len(struct_blob(), 8), "type 1 is truncated"),
        (with_type_len(KERNEL_LIKE, type_len() - 5), "is truncated"),
        (header_with(str_off=type_len() + 1, str_len=len(KERNEL_LIKE) - 24 - type_len() - 1), "NUL"),
    ],
)
def test_garbled_headers(blob: bytes, reason: str) -> None:
    with pytest.raises(BtfError) as exc:
        Btf.from_bytes(blob, "blob")
    assert str(exc.value).startswith("cannot read kernel BTF at blob: ")
    assert reason in str(exc.value)
    assert str(exc.value).endswith(NO_BTF)


def test_unknown_kind() -> None:
    w = BtfWriter()
    w.add(25, "future")
    with pytest.raises(BtfError, match="type 1 has unknown kind 25"):
        Btf.from_bytes(w.build())


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    with pytest.raises(BtfError) as exc:
        Btf.load(path)
    assert str(exc.value) == f"cannot read kernel BTF at {path}: No such file or directory{NO_BTF}"


def test_load_directory_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(BtfError, match=f"cannot read kernel BTF at {tmp_path}: "):
        Btf.load(tmp_path)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not btf at all, definitely not")
    with pytest.raises(BtfError, match="bad magic"):
        Btf.load(str(garbage))


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(KERNEL_LIKE)
    loaded = Btf.load(path)
    assert loaded.source == str(path)
    assert loaded.offsetof("sock", "__sk_common.skc_num") == 14


def test_out_of_range_references_are_reported() -> None:
    w = BtfWriter()
    w.composite("s", 8, [Member("dangling", 999, 0)])
    w.typedef("btf_trace_bad", 77)
    w.add(STRUCT, "t", 0, False, 4)
    btf = Btf.from_bytes(w.build(), "refs")
    with pytest.raises(BtfError, match="reference to type 999, but the last type is 3"):
        btf.field("s", "dangling")
    with pytest.raises(BtfError, match="reference to type 77"):
        btf.raw_tracepoint_args("bad")


def test_cycles_are_reported_not_recursed() -> None:
    w = BtfWriter()
    first = w.next_id
    w.typedef("a_t", first + 1)
    w.typedef("b_t", first)
    w.composite("loop", 4, [Member("x", first, 0)])
    anon_self = w.next_id
    w.composite("", 4, [Member("", anon_self, 0), Member("", anon_self, 0)])
    w.composite("outer", 4, [Member("", anon_self, 0)])
    proto = w.next_id
    w.func_proto(0, [w.next_id + 1])  # params point back at the prototype through a pointer
    w.ptr(proto)
    w.typedef("btf_trace_cyclic", w.ptr(w.func_proto(0, [w.ptr(0), w.ptr(proto)])))
    btf = Btf.from_bytes(w.build(), "cycle")
    with pytest.raises(BtfError, match="cycle"):
        btf.field("loop", "x")
    with pytest.raises(BtfError, match="cycle"):
        btf.sizeof("a_t")
    with pytest.raises(BtfError, match="has no field 'missing'"):
        btf.field("outer", "missing")
    with pytest.raises(BtfError, match="cycle"):
        btf.raw_tracepoint_args("cyclic")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_are_rejected(data: bytes) -> None:
    if data[:2] in (b"\x9f\xeb", b"\xeb\x9f"):
        btf = load_or_error(data)
        if btf is not None:
            exercise(btf)
        return
    with pytest.raises(BtfError, match="cannot read kernel BTF at <bytes>: "):
        Btf.from_bytes(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.binary(min_size=1, max_size=64))
def test_random_sections_behind_a_valid_header(types: bytes, strings: bytes) -> None:
    strings = b"\0" + strings + b"\0"
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    btf = load_or_error(header + types + strings)
    if btf is not None:
        exercise(btf)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(24, len(KERNEL_LIKE) - 1), st.integers(0, 255)), min_size=1, max_size=8)
)
def test_corrupted_kernel_like_blob(patches: list[tuple[int, int]]) -> None:
    data = bytearray(KERNEL_LIKE)
    for pos, value in patches:
        data[pos] = value
    btf = load_or_error(bytes(data))
    if btf is not None:
        exercise(btf)


@pytest.mark.skipif(BPFTOOL is None, reason="bpftool is not installed")
def test_writer_output_is_accepted_by_bpftool(tmp_path: Path) -> None:
    """Keeps the test writer honest: the reference implementation must read its blobs the same way."""
    assert BPFTOOL is not None
    path = tmp_path / "btf"
    path.write_bytes(KERNEL_LIKE)
    raw = subprocess.run(
        [BPFTOOL, "btf", "dump", "file", str(path), "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "STRUCT 'sock' size=784 vlen=10" in raw
    assert "'skc_reuse' type_id=1 bits_offset=152 bitfield_size=4" in raw
    assert "INT 'unsigned int' size=4 bits_offset=2 nr_bits=3 encoding=(none)" in raw
    assert "TYPEDEF 'btf_trace_sock_send_length'" in raw


# ------------------------------------------------------------------------------- the running kernel

KERNEL_FIELDS = [
    ("sock", "__sk_common.skc_family"),
    ("sock", "__sk_common.skc_daddr"),
    ("sock", "__sk_common.skc_v6_daddr"),
    ("sock", "__sk_common.skc_net"),
    ("sock", "__sk_common.skc_dport"),
    ("sock", "__sk_common.skc_num"),
    ("sock", "sk_protocol"),
    ("sock", "sk_type"),
    ("sock", "sk_err"),
    ("sock", "sk_cgrp_data"),
    ("sock_cgroup_data", "cgroup"),
    ("cgroup", "kn"),
    ("kernfs_node", "id"),
    ("tcp_sock", "srtt_us"),
    ("net", "ns"),
    ("ns_common", "inum"),
]

needs_vmlinux = pytest.mark.skipif(not VMLINUX.exists(), reason="kernel has no /sys/kernel/btf/vmlinux")


@pytest.fixture(scope="module")
def vmlinux() -> Btf:
    return Btf.load()


class RawType(NamedTuple):
    kind: str
    name: str
    attrs: dict[str, str]
    members: list[dict[str, str]]


@pytest.fixture(scope="module")
def bpftool_types() -> dict[int, RawType]:
    """The kernel's types as bpftool reads them: an independent reference for the offsets."""
    if BPFTOOL is None:
        pytest.skip("bpftool is not installed")
    raw = subprocess.run(
        [BPFTOOL, "btf", "dump", "file", str(VMLINUX), "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    types: dict[int, RawType] = {}
    current: RawType | None = None
    for line in raw.splitlines():
        if line.startswith("\t") and current is not None:
            name, _, rest = line.strip().partition(" ")
            attrs = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
            current.members.append({"name": name.strip("'"), **attrs})
            continue
        match = re.match(r"\[(\d+)\] (\w+) '([^']*)'(.*)", line)
        if match:
            attrs = dict(kv.split("=", 1) for kv in match[4].split() if "=" in kv)
            current = RawType(match[2], match[3], attrs, [])
            types[int(match[1])] = current
    return types


def reference_field(types: dict[int, RawType], struct_name: str, path: str) -> tuple[int, int]:
    """(bit offset, byte size) of a field, resolved from bpftool's dump."""

    def strip(type_id: int) -> int:
        while types[type_id].kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            type_id = int(types[type_id].attrs["type_id"])
        return type_id

    def size(type_id: int) -> int:
        t = types[strip(type_id)]
        if t.kind == "PTR":
            return 8
        if t.kind == "ARRAY":
            return int(t.attrs["nr_elems"]) * size(int(t.attrs["type_id"]))
        return int(t.attrs["size"])

    def find(type_id: int, name: str) -> tuple[int, int] | None:
        for m in types[type_id].members:
            member_type = int(m["type_id"])
            if m["name"] == name:
                return int(m["bits_offset"]), member_type
            if m["name"] == "(anon)" and types[strip(member_type)].kind in ("STRUCT", "UNION"):
                found = find(strip(member_type), name)
                if found:
                    return found[0] + int(m["bits_offset"]), found[1]
        return None

    type_id = next(
        i for i, t in types.items() if t.kind == "STRUCT" and t.name == struct_name and t.attrs["size"] != "0"
    )
    bits = 0
    for part in path.split("."):
        found = find(strip(type_id), part)
        assert found is not None, f"bpftool shows no {part} in {struct_name}.{path}"
        bits += found[0]
        type_id = found[1]
    return bits, size(type_id)


@needs_vmlinux
@pytest.mark.parametrize(("struct_name", "path"), KERNEL_FIELDS)
def test_kernel_fields_match_bpftool(
    vmlinux: Btf, bpftool_types: dict[int, RawType], struct_name: str, path: str
) -> None:
    bit_offset, size = reference_field(bpftool_types, struct_name, path)
    assert vmlinux.field(struct_name, path) == FieldInfo(bit_offset // 8, size, bit_offset, 0)
    assert vmlinux.offsetof(struct_name, path) == bit_offset // 8


@needs_vmlinux
def test_kernel_known_layout(vmlinux: Btf) -> None:
    # sock_common's head has been stable for many kernel releases; BPF programs everywhere rely on it.
    assert vmlinux.offsetof("sock", "__sk_common.skc_daddr") == 0
    assert vmlinux.offsetof("sock", "__sk_common.skc_rcv_saddr") == 4
    assert vmlinux.offsetof("sock", "__sk_common.skc_dport") == 12
    assert vmlinux.offsetof("sock", "__sk_common.skc_num") == 14
    assert vmlinux.offsetof("sock", "__sk_common.skc_family") == 16
    assert vmlinux.field("sock", "__sk_common.skc_v6_daddr").size == 16
    assert vmlinux.field("sock", "__sk_common.skc_net").size == 8
    assert vmlinux.field("ns_common", "inum").size == 4
    assert vmlinux.sizeof("struct sock_common") == vmlinux.field("sock", "__sk_common").size
    for _, path in KERNEL_FIELDS[:6]:
        assert vmlinux.offsetof("sock", path) < vmlinux.sizeof("sock_common")
    assert vmlinux.sizeof("struct sock") > 500
    assert vmlinux.sizeof("sock") == vmlinux.sizeof("struct sock")
    assert vmlinux.sizeof("u32") == 4
    assert vmlinux.sizeof("u64") == 8
    assert vmlinux.sizeof("struct sock *") == 8
    assert vmlinux.has_struct("sock")
    assert not vmlinux.has_struct("no_such_struct_podnet")
    assert vmlinux.type_count > 10_000


@needs_vmlinux
def test_kernel_raw_tracepoints(vmlinux: Btf) -> None:
    assert vmlinux.raw_tracepoint_args("sock_send_length") == ["struct sock *", "int", "int"]
    assert vmlinux.raw_tracepoint_args("inet_sock_set_state") == [
        "const struct sock *",
        "const int",
        "const int",
    ]
    assert vmlinux.raw_tracepoint_args("no_such_tp") is None


@needs_vmlinux
def test_kernel_missing_field_message(vmlinux: Btf) -> None:
    with pytest.raises(BtfError) as exc:
        vmlinux.field("sock", "no_such_field")
    assert (
        str(exc.value) == f"kernel BTF ({VMLINUX}) has no field 'no_such_field' in struct sock{UNSUPPORTED}"
    )


def test_pre_5_15_cgroup_layout_names_the_minimum_kernel() -> None:
    """Linux 5.10's sock_cgroup_data (a union of bitfields and a tagged `val`, no `cgroup`
    pointer): offset resolution fails with the kernel podnet needs, not a bare field name."""
    from exporter.kernel.offsets import CORE_FIELDS, resolve_field

    w = BtfWriter()
    u8, u16, u32, u64 = (
        w.int_(n, s, signed=False) for n, s in (("u8", 1), ("u16", 2), ("u32", 4), ("u64", 8))
    )
    bits = w.composite(
        "",
        8,
        [
            Member("is_data", u8, 0, 1),
            Member("no_refcnt", u8, 1, 1),
            Member("prioidx", u16, 16),
            Member("classid", u32, 32),
        ],
    )
    either = w.composite("", 8, [Member("", bits, 0), Member("val", u64, 0)], union=True)
    data = w.composite("sock_cgroup_data", 8, [Member("", either, 0)])
    w.composite("sock", 16, [Member("sk_cgrp_data", data, 0)])
    spec = next(f for f in CORE_FIELDS if f.macro == "PODNET_OFF_SK_CGROUP")
    with pytest.raises(
        BtfError,
        match=r"^kernel BTF has no sock.sk_cgrp_data \+ sock_cgroup_data.cgroup: podnet needs Linux 5\.15 ",
    ):
        resolve_field(Btf.from_bytes(w.build(), "5.10-like"), spec)
