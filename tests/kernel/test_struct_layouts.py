"""Every ctypes mirror in exporter.kernel.bpf_structs against the layout BCC compiled from
bpf/*.bpf.c: same size, and for structs the same field names at the same offsets with the
same sizes, recursively. A field added to a C struct and not to its mirror (or the other
way round) fails here, not as wrong numbers."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import pytest

from exporter.kernel.bpf_structs import MAP_TYPES
from exporter.kernel.btf import Btf
from exporter.kernel.offsets import resolve_offsets
from exporter.kernel.programs import LoadedPrograms, MapSizes, load_programs


def layout(t: Any, prefix: str = "") -> Iterator[tuple[str, int, int]]:
    """(dotted field, offset, size) of every scalar leaf; one entry for a scalar type."""
    if isinstance(t, type) and issubclass(t, ctypes.Structure | ctypes.Union):
        for name, ftype, *_ in t._fields_:
            field = getattr(t, name)
            for sub, off, size in layout(ftype, f"{prefix}{name}."):
                yield sub, field.offset + off, size
        return
    yield prefix.rstrip("."), 0, ctypes.sizeof(t)


@pytest.fixture(scope="module", params=[True, False], ids=["tp_btf", "raw"])
def progs(request: pytest.FixtureRequest) -> Iterator[LoadedPrograms]:
    btf = Btf.load()
    loaded = load_programs(btf, resolve_offsets(btf), MapSizes(1024), tp_btf=request.param)
    yield loaded
    loaded.close()


def test_every_mirror_matches_what_bcc_compiled(progs: LoadedPrograms) -> None:
    compared = []
    for name, (key_type, value_type) in MAP_TYPES.items():
        for program, obj in progs.objects.items():
            try:
                table = obj.get_table(name.encode())  # BCC's own types, derived from the C
            except KeyError:
                continue
            leaf = table.Leaf
            if issubclass(leaf, ctypes.Array) and not issubclass(value_type, ctypes.Array):
                leaf = leaf._type_  # a per-CPU map: BCC's value is one per CPU
            for what, mine, theirs in (("key", key_type, table.Key), ("value", value_type, leaf)):
                assert ctypes.sizeof(mine) == ctypes.sizeof(theirs), (program, name, what)
                if isinstance(mine, type) and issubclass(mine, ctypes.Structure):
                    # BCC names anonymous padding; compare the fields both sides name.
                    ours = {f: (o, s) for f, o, s in layout(mine) if not f.startswith("pad")}
                    bcc = {f: (o, s) for f, o, s in layout(theirs) if not f.startswith("__pad")}
                    assert ours == {f: bcc.get(f) for f in ours}, (program, name, what, bcc)
            compared.append(name)
    # Every mirror is checked by at least one of the two builds' programs.
    assert compared, "no map compared"


def test_every_mirrored_map_exists_in_some_build() -> None:
    seen: set[str] = set()
    btf = Btf.load()
    for tp_btf in (True, False):
        loaded = load_programs(btf, resolve_offsets(btf), MapSizes(1024), tp_btf=tp_btf)
        try:
            for obj in loaded.objects.values():
                for name in MAP_TYPES:
                    try:
                        obj.get_table(name.encode())
                    except KeyError:
                        continue
                    seen.add(name)
        finally:
            loaded.close()
    assert seen == set(MAP_TYPES), set(MAP_TYPES) - seen
