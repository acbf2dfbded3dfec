"""Pure-Python reader of the kernel's BTF (BPF Type Format) type information.

podnet needs a handful of struct offsets and raw tracepoint signatures at start-up so that its BPF
programs match the running kernel.  Reading /sys/kernel/btf/vmlinux directly keeps bpftool and pahole
off the node.  The format is described in the kernel's Documentation/bpf/btf.rst.

Only vmlinux-style (base) BTF is supported; split BTF of kernel modules numbers its types after the
base BTF's and would need the base loaded alongside it.
"""

from __future__ import annotations

import enum
import itertools
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, NamedTuple

DEFAULT_PATH: Final = "/sys/kernel/btf/vmlinux"

_MAGIC: Final = 0xEB9F
_VERSION: Final = 1
_HEADER_LEN: Final = 24
_TYPE_LEN: Final = 12
# Real typedef chains and anonymous struct nesting are a handful of levels deep; anything deeper is
# a reference cycle in corrupt data and must not turn into a RecursionError.
_MAX_DEPTH: Final = 64
_DEFAULT_POINTER_SIZE: Final = 8

_UNSUPPORTED_HINT: Final = (
    "this kernel is not supported by this podnet version (please report it with 'uname -r')"
)
_NO_BTF_HINT: Final = "the kernel needs CONFIG_DEBUG_INFO_BTF=y (check: ls /sys/kernel/btf/vmlinux)"


class BtfError(Exception):
    """One-line, user-facing message that names the problem and the fix."""


@dataclass(frozen=True)
class FieldInfo:
    offset: int  # byte offset from the start of the outer struct
    size: int  # byte size of the field's type (after resolving typedef/const/volatile)
    bit_offset: int  # bit offset from the start of the outer struct
    bitfield_size: int  # 0 unless the member is a bitfield


class Kind(enum.IntEnum):
    VOID = 0  # not stored in BTF: type id 0 means void
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


_MAX_KIND: Final = max(Kind)

# Bytes of kind-specific data after struct btf_type: a fixed part plus a part per vlen entry.
# Indexed by kind number so the load-time scan needs no per-type branching.
_FIXED_EXTRA: Final = (0, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 4, 0, 0)
_ENTRY_EXTRA: Final = (0, 0, 0, 0, 12, 12, 8, 0, 0, 0, 0, 0, 0, 8, 0, 12, 0, 0, 0, 12)

# Only these kinds are ever looked up by name; indexing FUNC/VAR/DECL_TAG names would slow loading.
_NAMED_KINDS: Final = frozenset(
    {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FWD, Kind.TYPEDEF, Kind.FLOAT}
)
# Kinds that do not change the layout of the type they wrap.
_TRANSPARENT: Final = frozenset({Kind.TYPEDEF, Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPE_TAG})
_QUALIFIERS: Final = {Kind.CONST: "const", Kind.VOLATILE: "volatile", Kind.RESTRICT: "restrict"}
_COMPOSITE: Final = frozenset({Kind.STRUCT, Kind.UNION})
_SIZED: Final = frozenset(
    {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FLOAT, Kind.DATASEC}
)


class _Type(NamedTuple):
    kind: Kind
    name_off: int
    vlen: int
    kind_flag: bool
    size_or_type: int
    data_pos: int  # absolute position of the kind-specific data


class _Member(NamedTuple):
    name_off: int
    type_id: int
    bit_offset: int
    bitfield_size: int


class _Codec(NamedTuple):
    """Pre-compiled unpackers for one byte order (BTF is written in the producer's byte order)."""

    header: struct.Struct
    u32: struct.Struct
    u32x2: struct.Struct
    u32x3: struct.Struct


def _codec(prefix: str) -> _Codec:
    return _Codec(
        header=struct.Struct(prefix + "HBBIIIII"),
        u32=struct.Struct(prefix + "I"),
        u32x2=struct.Struct(prefix + "II"),
        u32x3=struct.Struct(prefix + "III"),
    )


class _Layout(NamedTuple):
    """Absolute byte ranges of the two sections inside the blob."""

    type_start: int
    type_end: int
    str_start: int
    str_end: int


class Btf:
    """Parsed BTF blob.  Loading only indexes type positions and names; members are decoded on demand."""

    def __init__(self, data: bytes, source: str, codec: _Codec, layout: _Layout) -> None:
        self._data = data
        self._source = source
        self._codec = codec
        self._layout = layout
        self._offsets, self._by_name = self._scan()
        self._strings: tuple[dict[bytes, int], dict[bytes, list[int]]] | None = None
        self._pointer_size: int | None = None
        self._render_cache: dict[int, str] = {}
        self._func_ids: dict[str, int | None] = {}

    # ----------------------------------------------------------------------------------- construction

    @classmethod
    def load(cls, path: str | os.PathLike[str] = DEFAULT_PATH) -> Btf:
        source = os.fspath(path)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BtfError(_garbled_message(source, e.strerror or str(e))) from None
        return cls.from_bytes(data, source)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Btf:
        data = bytes(data)
        codec = _detect_byte_order(data, source)
        layout = _parse_header(data, source, codec)
        return cls(data, source, codec, layout)

    def _scan(self) -> tuple[list[int], dict[int, list[int]]]:
        """Walk the type section once, recording where each type starts and which ids carry a name.

        This is the only per-type Python loop; it runs ~150k times for vmlinux, so it stays minimal.
        """
        data = self._data
        pos, end = self._layout.type_start, self._layout.type_end
        unpack = self._codec.u32x2.unpack_from
        fixed, per_entry, named = _FIXED_EXTRA, _ENTRY_EXTRA, _NAMED_KINDS
        offsets = [0]  # placeholder for void so that type id == list index
        by_name: dict[int, list[int]] = {}
        while pos < end:
            if pos + _TYPE_LEN > end:
                raise self._garbled(f"type {len(offsets)} is truncated at the end of the type section")
            name_off, info = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            if kind == 0 or kind > _MAX_KIND:
                raise self._garbled(f"type {len(offsets)} has unknown kind {kind}")
            if name_off and kind in named:
                ids = by_name.get(name_off)
                if ids is None:
                    by_name[name_off] = [len(offsets)]
                else:
                    ids.append(len(offsets))
            offsets.append(pos)
            pos += _TYPE_LEN + fixed[kind] + per_entry[kind] * (info & 0xFFFF)
        if pos != end:
            raise self._garbled(f"type {len(offsets) - 1} extends beyond the end of the type section")
        return offsets, by_name

    # ----------------------------------------------------------------------------------- public API

    @property
    def source(self) -> str:
        return self._source

    @property
    def type_count(self) -> int:
        """Number of types, not counting void."""
        return len(self._offsets) - 1

    def field(self, struct: str, path: str) -> FieldInfo:
        parts = _split_path(struct, path)
        kind, name = _split_tagged_name(struct, default=Kind.STRUCT)
        type_id, bit_offset, bitfield_size = self._composite_id(name, kind), 0, 0
        for depth, part in enumerate(parts):
            container = self._strip(type_id)
            if container.kind not in _COMPOSITE:
                walked = ".".join(parts[:depth])
                raise self._unsupported(
                    f"has field '{walked}' in {_tag(kind)} {name} of type '{self._render(type_id)}', "
                    f"which is not an embedded struct or union, so '{path}' cannot be resolved"
                )
            names = self._name_offsets(part)
            member = self._find_member(container, names, set()) if names else None
            if member is None:
                raise self._unsupported(f"has no field '{path}' in {_tag(kind)} {name}")
            type_id = member.type_id
            bit_offset += member.bit_offset
            bitfield_size = member.bitfield_size
        size = self._size_of(type_id, 0)
        bit_offset, bitfield_size = self._legacy_int_bitfield(type_id, size, bit_offset, bitfield_size)
        return FieldInfo(
            offset=bit_offset // 8, size=size, bit_offset=bit_offset, bitfield_size=bitfield_size
        )

    def offsetof(self, struct: str, path: str) -> int:
        info = self.field(struct, path)
        if info.bit_offset % 8:
            what = f"a {info.bitfield_size}-bit bitfield" if info.bitfield_size else "a field"
            raise BtfError(
                f"kernel BTF ({self._source}): field '{path}' in {struct} is {what} at bit "
                f"{info.bit_offset}, which has no byte offset; read it with field() instead"
            )
        return info.offset

    def sizeof(self, type_name: str) -> int:
        base = type_name.strip()
        if base.endswith("*"):
            return self._pointer_bytes()
        kind, name = _split_tagged_name(base, default=Kind.VOID)
        if kind in _COMPOSITE:
            return self._get(self._composite_id(name, kind)).size_or_type
        candidates = (
            [Kind.ENUM, Kind.ENUM64]
            if kind == Kind.ENUM
            else [Kind.STRUCT, Kind.UNION, Kind.TYPEDEF, Kind.INT, Kind.FLOAT, Kind.ENUM, Kind.ENUM64]
        )
        for candidate in candidates:
            type_id = self._lookup(name, candidate)
            if type_id is not None:
                return self._size_of(type_id, 0)
        raise self._unsupported(f"has no type '{base}'")

    def has_struct(self, name: str) -> bool:
        kind, bare = _split_tagged_name(name, default=Kind.STRUCT)
        return self._lookup(bare, kind) is not None

    def tracepoint_type_id(self, tracepoint: str) -> int | None:
        """Id of the tracepoint's `btf_trace_<name>` typedef: what a BTF-typed tracepoint
        program (tp_btf) names as its attach target."""
        return self._lookup(f"btf_trace_{tracepoint}", Kind.TYPEDEF)

    def func_id(self, name: str) -> int | None:
        """Id of the kernel function `name` (a FUNC type): what a BPF iterator program names
        as its attach target (bpf_iter_<target>). FUNC names are not indexed at load, so
        this scans the types once per name (~150k for vmlinux); start-up only."""
        if name not in self._func_ids:
            self._func_ids[name] = self._scan_func(name)
        return self._func_ids[name]

    def _scan_func(self, name: str) -> int | None:
        wanted = set(self._name_offsets(name))
        if not wanted:
            return None
        unpack = self._codec.u32x2.unpack_from
        for type_id in range(1, len(self._offsets)):
            name_off, info = unpack(self._data, self._offsets[type_id])
            if name_off in wanted and (info >> 24) & 0x1F == Kind.FUNC:
                return type_id
        return None

    def raw_tracepoint_args(self, tracepoint: str) -> list[str] | None:
        typedef = self._lookup(f"btf_trace_{tracepoint}", Kind.TYPEDEF)
        if typedef is None:
            return None
        pointer = self._strip(self._get(typedef).size_or_type)
        proto = self._strip(pointer.size_or_type) if pointer.kind == Kind.PTR else pointer
        if pointer.kind != Kind.PTR or proto.kind != Kind.FUNC_PROTO:
            raise self._garbled(f"typedef btf_trace_{tracepoint} is not a pointer to a function prototype")
        params = list(self._params(proto))
        if not params:
            raise self._garbled(f"typedef btf_trace_{tracepoint} lacks the leading 'void *' context argument")
        return [self._render(param, 0) for param in params[1:]]

    # ------------------------------------------------------------------------------- type decoding

    def _get(self, type_id: int) -> _Type:
        if type_id == 0:
            return _Type(Kind.VOID, 0, 0, False, 0, 0)
        if not 0 < type_id < len(self._offsets):
            raise self._garbled(f"reference to type {type_id}, but the last type is {self.type_count}")
        pos = self._offsets[type_id]
        name_off, info, size_or_type = self._codec.u32x3.unpack_from(self._data, pos)
        return _Type(
            kind=Kind((info >> 24) & 0x1F),
            name_off=name_off,
            vlen=info & 0xFFFF,
            kind_flag=bool(info >> 31),
            size_or_type=size_or_type,
            data_pos=pos + _TYPE_LEN,
        )

    def _strip(self, type_id: int) -> _Type:
        """Follow typedefs and qualifiers to the type that determines the layout."""
        for _ in range(_MAX_DEPTH):
            t = self._get(type_id)
            if t.kind not in _TRANSPARENT:
                return t
            type_id = t.size_or_type
        raise self._garbled(f"type chain starting at type {type_id} is a cycle or too deep")

    def _members(self, t: _Type) -> Iterator[_Member]:
        unpack = self._codec.u32x3.unpack_from
        for i in range(t.vlen):
            name_off, type_id, offset = unpack(self._data, t.data_pos + i * 12)
            if t.kind_flag:
                yield _Member(name_off, type_id, offset & 0xFFFFFF, offset >> 24)
            else:
                yield _Member(name_off, type_id, offset, 0)

    def _params(self, proto: _Type) -> Iterator[int]:
        unpack = self._codec.u32x2.unpack_from
        for i in range(proto.vlen):
            yield unpack(self._data, proto.data_pos + i * 8)[1]

    def _array(self, t: _Type) -> tuple[int, int]:
        """(element type id, number of elements) of an ARRAY type."""
        elem: int
        nelems: int
        elem, _index_type, nelems = self._codec.u32x3.unpack_from(self._data, t.data_pos)
        return elem, nelems

    def _find_member(
        self, container: _Type, names: tuple[int, ...], searched: set[int], depth: int = 0
    ) -> _Member | None:
        """Depth-first search in declaration order, descending into anonymous structs and unions.

        C forbids a name from appearing twice across a struct and its anonymous members, so the first
        hit is the only one.  Names are compared as string-section offsets to avoid decoding them.
        `searched` holds the anonymous types already searched in vain: corrupt data where one type is
        reachable many ways must not make the search exponential.
        """
        if depth > _MAX_DEPTH:
            raise self._garbled("anonymous struct members are nested too deeply (cycle?)")
        for member in self._members(container):
            if member.name_off in names:
                return member
            if member.name_off:
                continue
            inner = self._strip(member.type_id)
            if inner.kind not in _COMPOSITE or inner.data_pos in searched:
                continue
            searched.add(inner.data_pos)
            found = self._find_member(inner, names, searched, depth + 1)
            if found is not None:
                return found._replace(bit_offset=found.bit_offset + member.bit_offset)
        return None

    def _legacy_int_bitfield(self, type_id: int, size: int, bit_offset: int, bits: int) -> tuple[int, int]:
        """Old producers encoded bitfields in the INT type itself (offset and width) instead of kind_flag."""
        t = self._strip(type_id)
        if bits or t.kind != Kind.INT:
            return bit_offset, bits
        encoding = self._codec.u32.unpack_from(self._data, t.data_pos)[0]
        nr_bits, int_offset = encoding & 0xFF, (encoding >> 16) & 0xFF
        if nr_bits and (nr_bits != size * 8 or int_offset):
            return bit_offset + int_offset, nr_bits
        return bit_offset, 0

    def _size_of(self, type_id: int, depth: int) -> int:
        if depth > _MAX_DEPTH:
            raise self._garbled(f"type chain at type {type_id} is a cycle or too deep")
        t = self._get(type_id)
        if t.kind in _SIZED:
            return t.size_or_type
        if t.kind == Kind.PTR:
            return self._pointer_bytes()
        if t.kind == Kind.ARRAY:
            elem, nelems = self._array(t)
            return nelems * self._size_of(elem, depth + 1)
        if t.kind in _TRANSPARENT or t.kind == Kind.VAR:
            return self._size_of(t.size_or_type, depth + 1)
        raise self._unsupported(f"has type '{self._render(type_id)}' ({t.kind.name}), which has no size")

    def _pointer_bytes(self) -> int:
        # BTF has no pointer size; the kernel's long has the same width on every Linux ABI.
        if self._pointer_size is None:
            long_id = self._lookup("long int", Kind.INT)
            self._pointer_size = self._get(long_id).size_or_type if long_id else _DEFAULT_POINTER_SIZE
        return self._pointer_size

    # --------------------------------------------------------------------------------------- names

    def _name(self, name_off: int) -> str:
        start = self._layout.str_start + name_off
        if not self._layout.str_start <= start < self._layout.str_end:
            raise self._garbled(f"name offset {name_off} lies outside the string section")
        # The header check guarantees the section ends in NUL, so index() always succeeds.
        end = self._data.index(b"\0", start, self._layout.str_end)
        return self._data[start:end].decode("utf-8", errors="replace")

    def _name_offsets(self, name: str) -> tuple[int, ...]:
        """All string-section offsets holding exactly `name` (usually one: producers deduplicate)."""
        if self._strings is None:
            self._strings = self._index_strings()
        first, duplicates = self._strings
        key = name.encode("utf-8", "surrogatepass")  # lone surrogates simply match nothing
        offset = first.get(key)
        if offset is None or not key:
            return ()
        return (offset, *duplicates.get(key, ()))

    def _index_strings(self) -> tuple[dict[bytes, int], dict[bytes, list[int]]]:
        """Map each string to its offset(s), built on the first name lookup.

        Splitting and zipping run in C, which makes one full index (~25 ms for vmlinux) cheaper than
        scanning the 2 MB section once per looked-up name.
        """
        section = self._data[self._layout.str_start : self._layout.str_end]
        strings = section.split(b"\0")[:-1]  # the section ends in NUL, leaving an empty last piece
        offsets = list(itertools.accumulate((len(s) + 1 for s in strings), initial=0))[:-1]
        # Reversed so that the first occurrence of a repeated string wins.
        first = dict(zip(reversed(strings), reversed(offsets), strict=True))
        duplicates: dict[bytes, list[int]] = {}
        if len(first) < len(strings):
            for string, offset in zip(strings, offsets, strict=True):
                if first[string] != offset:
                    duplicates.setdefault(string, []).append(offset)
        return first, duplicates

    def _ids_named(self, name: str) -> list[int]:
        ids: list[int] = []
        for name_off in self._name_offsets(name):
            ids.extend(self._by_name.get(name_off, ()))
        return sorted(ids)

    def _lookup(self, name: str, kind: Kind) -> int | None:
        """First type of `kind` called `name`; for structs and unions prefer a complete definition."""
        ids = [i for i in self._ids_named(name) if self._get(i).kind == kind]
        if not ids:
            return None
        if kind in _COMPOSITE:
            # vmlinux BTF can hold several same-named structs; empty ones are placeholders.
            return next((i for i in ids if self._get(i).size_or_type), ids[0])
        return ids[0]

    def _composite_id(self, name: str, kind: Kind) -> int:
        type_id = self._lookup(name, kind)
        if type_id is None:
            raise self._unsupported(f"has no {_tag(kind)} '{name}'")
        return type_id

    # ------------------------------------------------------------------------------------ rendering

    def _render(self, type_id: int, depth: int = 0) -> str:
        """C spelling of a type as used in declarations, e.g. 'const struct sock *'."""
        # Cached so that corrupt data sharing one prototype many times cannot make rendering exponential.
        cached = self._render_cache.get(type_id)
        if cached is None:
            cached = self._render_cache[type_id] = self._render_uncached(type_id, depth)
        return cached

    def _render_uncached(self, type_id: int, depth: int) -> str:
        if depth > _MAX_DEPTH:
            raise self._garbled(f"type chain at type {type_id} is a cycle or too deep")
        t = self._get(type_id)
        if t.kind == Kind.PTR:
            return self._render_pointer(t, depth)
        if t.kind in _QUALIFIERS:
            inner = self._render(t.size_or_type, depth + 1)
            # "const struct sock *" is a pointer to const; a const pointer is spelled "struct sock *const".
            qualifier = _QUALIFIERS[t.kind]
            return f"{inner}{qualifier}" if inner.endswith("*") else f"{qualifier} {inner}"
        if t.kind in (Kind.TYPE_TAG, Kind.VAR):
            return self._render(t.size_or_type, depth + 1)  # e.g. __user: irrelevant to the C type
        if t.kind == Kind.ARRAY:
            elem, nelems = self._array(t)
            return f"{self._render(elem, depth + 1)}[{nelems}]"
        if t.kind == Kind.FUNC_PROTO:
            return self._render_proto(t, "", depth)
        return self._render_named(t)

    def _render_pointer(self, t: _Type, depth: int) -> str:
        target = self._get(t.size_or_type)
        if target.kind == Kind.FUNC_PROTO:
            return self._render_proto(target, "(*)", depth)
        inner = self._render(t.size_or_type, depth + 1)
        return f"{inner}*" if inner.endswith("*") else f"{inner} *"

    def _render_proto(self, proto: _Type, declarator: str, depth: int) -> str:
        params = [self._render(p, depth + 1) if p else "..." for p in self._params(proto)]
        ret = self._render(proto.size_or_type, depth + 1)
        return f"{ret} {declarator}({', '.join(params) or 'void'})"

    def _render_named(self, t: _Type) -> str:
        name = self._name(t.name_off) if t.name_off else "(anon)"
        if t.kind == Kind.VOID:
            return "void"
        if t.kind in (Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64):
            return f"{_tag(t.kind)} {name}"
        if t.kind == Kind.FWD:
            return f"{'union' if t.kind_flag else 'struct'} {name}"
        return name

    # --------------------------------------------------------------------------------------- errors

    def _garbled(self, reason: str) -> BtfError:
        return BtfError(_garbled_message(self._source, reason))

    def _unsupported(self, what: str) -> BtfError:
        return BtfError(f"kernel BTF ({self._source}) {what}; {_UNSUPPORTED_HINT}")


# ------------------------------------------------------------------------------------------ helpers


def _garbled_message(source: str, reason: str) -> str:
    return f"cannot read kernel BTF at {source}: {reason}; {_NO_BTF_HINT}"


def _detect_byte_order(data: bytes, source: str) -> _Codec:
    if len(data) < _HEADER_LEN:
        raise BtfError(_garbled_message(source, f"file is {len(data)} bytes, shorter than the BTF header"))
    for prefix in ("<", ">"):
        if struct.unpack_from(prefix + "H", data)[0] == _MAGIC:
            return _codec(prefix)
    raise BtfError(_garbled_message(source, f"bad magic 0x{data[0]:02x}{data[1]:02x}, this is not BTF"))


def _parse_header(data: bytes, source: str, codec: _Codec) -> _Layout:
    _magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = codec.header.unpack_from(data)

    def fail(reason: str) -> BtfError:
        return BtfError(_garbled_message(source, reason))

    if version != _VERSION:
        raise fail(f"unsupported BTF version {version}")
    if not _HEADER_LEN <= hdr_len <= len(data):
        raise fail(f"header length {hdr_len} is invalid for a {len(data)}-byte file")
    body = len(data) - hdr_len
    if type_off + type_len > body:
        raise fail(f"type section ({type_off}+{type_len}) runs past the end of the file")
    if str_off + str_len > body:
        raise fail(f"string section ({str_off}+{str_len}) runs past the end of the file")
    str_start, str_end = hdr_len + str_off, hdr_len + str_off + str_len
    # Every name lookup relies on the section starting with the empty name and ending in NUL.
    if str_len == 0 or data[str_start] != 0 or data[str_end - 1] != 0:
        raise fail("string section is empty or not NUL-delimited")
    return _Layout(hdr_len + type_off, hdr_len + type_off + type_len, str_start, str_end)


def _tag(kind: Kind) -> str:
    return {Kind.UNION: "union", Kind.ENUM: "enum", Kind.ENUM64: "enum"}.get(kind, "struct")


def _split_tagged_name(name: str, default: Kind) -> tuple[Kind, str]:
    """'struct sock' -> (STRUCT, 'sock'); a bare name gets `default`."""
    words = name.split()
    tags = {"struct": Kind.STRUCT, "union": Kind.UNION, "enum": Kind.ENUM}
    if len(words) == 2 and words[0] in tags:
        return tags[words[0]], words[1]
    return default, " ".join(words)


def _split_path(struct: str, path: str) -> list[str]:
    parts = path.split(".")
    if not all(part.isidentifier() for part in parts):
        raise BtfError(
            f"invalid field path '{path}' for {struct}: expected dotted member names such as "
            "'__sk_common.skc_net' (array indexing and pointers are not supported)"
        )
    return parts
