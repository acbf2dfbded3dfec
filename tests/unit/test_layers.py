"""The layering of exporter/ (the table in exporter/__init__.py), checked on the source with `ast`.

Every import counts, wherever it is written (module level, inside a function, under
TYPE_CHECKING), and so does everything it imports in turn: a layer must not reach a
forbidden one through another module either.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from collections.abc import Mapping, Set
from pathlib import Path

import exporter

PACKAGE = "exporter"
ROOT = Path(exporter.__file__).resolve().parent

ALLOWED: dict[str, frozenset[str]] = {
    "pods": frozenset(),
    "metrics": frozenset({"pods"}),
    "export": frozenset({"metrics", "pods"}),
    "kernel": frozenset({"metrics"}),
    "app": frozenset({"kernel", "pods", "metrics", "export"}),
}
"""layer -> the other layers it may import (directly or transitively)."""

ROOT_LAYER = "root"
"""The package itself (exporter/__init__.py: __version__): every layer may import it."""
ENTRY_LAYER = "entry"
"""Other modules directly in exporter/ (__main__, command shims): may import anything,
imported by nothing."""


def module_name(path: Path, root: Path, package: str = PACKAGE) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, known: Set[str]) -> str | None:
    """The module `name` names: itself, or its longest known prefix (an attribute import)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports_of(source: str, module: str, is_package: bool, known: Set[str]) -> set[str]:
    """Modules of `known` that `module`'s source imports, with the packages they are in."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg.
            names = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        for name in names:
            target = _resolve(name, known)
            while target is not None and target != module:
                found.add(target)
                target = target.rpartition(".")[0] or None  # importing a.b.c runs a and a.b
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {
        name: imports_of(path.read_text(), name, path.name == "__init__.py", known)
        for name, path in files.items()
    }


def layer_of(module: str, package: str = PACKAGE) -> str:
    parts = module.split(".")
    if parts == [package]:
        return ROOT_LAYER
    if len(parts) >= 2 and parts[1] in ALLOWED:
        return parts[1]
    return ENTRY_LAYER


def _paths(graph: Mapping[str, Set[str]], start: str) -> dict[str, list[str]]:
    """Every module reachable from `start`, with a shortest import chain to it."""
    chains = {start: [start]}
    todo = deque([start])
    while todo:
        here = todo.popleft()
        for nxt in sorted(graph.get(here, ())):
            if nxt not in chains:
                chains[nxt] = [*chains[here], nxt]
                todo.append(nxt)
    return chains


def violations(
    graph: Mapping[str, Set[str]], allowed: Mapping[str, Set[str]] = ALLOWED, package: str = PACKAGE
) -> list[str]:
    """One line per (module, forbidden module it reaches), naming both and the chain."""
    out = []
    for module in sorted(graph):
        layer = layer_of(module, package)
        if layer == ROOT_LAYER:
            ok: Set[str] = {ROOT_LAYER}
        elif layer == ENTRY_LAYER:
            ok = {ROOT_LAYER, ENTRY_LAYER, *allowed}
        else:
            ok = {ROOT_LAYER, layer, *allowed[layer]}
        for target, chain in sorted(_paths(graph, module).items()):
            target_layer = layer_of(target, package)
            if target_layer in ok and not (target_layer == ENTRY_LAYER and target != module):
                continue
            may = ", ".join(sorted(ok - {ROOT_LAYER, layer})) or "no other layer"
            out.append(
                f"{module} ({layer}) imports {target} ({target_layer}) via {' -> '.join(chain)}; "
                f"{layer} may import: {may}"
            )
    return out


# ---- the real tree ------------------------------------------------------------------------


def test_exporter_obeys_the_layering() -> None:
    graph = import_graph()
    assert "exporter.kernel.maps" in graph and "exporter.pods.kube" in graph  # the walk saw the tree
    problems = violations(graph)
    assert not problems, "layering broken (see exporter/__init__.py):\n" + "\n".join(problems)


def test_every_module_is_in_a_layer() -> None:
    """A new flat module in exporter/ would escape every rule but the entry-point one."""
    entry = {m for m in import_graph() if layer_of(m) == ENTRY_LAYER}
    assert entry == {"exporter.__main__"}


def test_each_layer_says_what_it_owns() -> None:
    for layer in ALLOWED:
        init = ROOT / layer / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} needs a docstring saying what the {layer} layer owns"


def test_the_documented_table_is_the_checked_one() -> None:
    doc = exporter.__doc__ or ""
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ALLOWED:
            may = cells[2]
            rows[cells[0]] = frozenset() if may == "(none)" else frozenset(re.split(r",\s*", may))
    assert rows == ALLOWED


# ---- the checker itself can fail ----------------------------------------------------------


def test_a_direct_forbidden_import_is_reported() -> None:
    graph = {
        "exporter.metrics.model": {"exporter.kernel.bpf_structs"},
        "exporter.kernel.bpf_structs": set(),
    }
    problems = violations(graph)
    assert len(problems) == 1
    assert "exporter.metrics.model (metrics) imports exporter.kernel.bpf_structs (kernel)" in problems[0]
    assert "metrics may import: pods" in problems[0]


def test_a_transitive_forbidden_import_is_reported_with_its_chain() -> None:
    graph = {
        "exporter.pods.kube": {"exporter.metrics.snapshot"},
        "exporter.metrics.snapshot": {"exporter.kernel.maps"},
        "exporter.kernel.maps": set(),
    }
    problems = violations(graph)
    assert (
        "exporter.pods.kube (pods) imports exporter.kernel.maps (kernel) via "
        "exporter.pods.kube -> exporter.metrics.snapshot -> exporter.kernel.maps" in "\n".join(problems)
    )
    assert any(
        p.startswith("exporter.metrics.snapshot (metrics) imports exporter.kernel.maps") for p in problems
    )


def test_importing_app_or_an_entry_point_is_reported() -> None:
    graph = {
        "exporter.export.http_app": {"exporter.app.poller"},
        "exporter.app.poller": {"exporter.__main__"},
        "exporter.__main__": {"exporter.app.cli"},
        "exporter.app.cli": set(),
    }
    problems = "\n".join(violations(graph))
    assert "exporter.export.http_app (export) imports exporter.app.poller (app)" in problems
    assert "exporter.app.poller (app) imports exporter.__main__ (entry)" in problems


def test_the_parser_finds_every_kind_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / "exporter"
    for d in ("kernel", "metrics", "pods"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text('"""doc"""\n')
    (pkg / "__init__.py").write_text('__version__ = "0"\n')
    (pkg / "kernel" / "maps.py").write_text("X = 1\n")
    (pkg / "kernel" / "btf.py").write_text("Y = 1\n")
    (pkg / "pods" / "kube.py").write_text("Z = 1\n")
    (pkg / "metrics" / "model.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from exporter import __version__\n"
        "from . import snapshot\n"
        "if TYPE_CHECKING:\n"
        "    from exporter.kernel import maps\n"
        "def f() -> None:\n"
        "    import exporter.kernel.btf\n"
    )
    (pkg / "metrics" / "snapshot.py").write_text("from ..pods.kube import Z\n")
    graph = import_graph(pkg)
    assert graph["exporter.metrics.model"] == {
        "exporter",
        "exporter.metrics.snapshot",
        "exporter.metrics",
        "exporter.kernel",
        "exporter.kernel.maps",
        "exporter.kernel.btf",
    }
    assert graph["exporter.metrics.snapshot"] == {"exporter", "exporter.pods", "exporter.pods.kube"}
    problems = violations(graph)
    assert any(
        p.startswith("exporter.metrics.model (metrics) imports exporter.kernel.maps (kernel)")
        for p in problems
    )
    assert any(
        p.startswith("exporter.metrics.model (metrics) imports exporter.kernel.btf (kernel)")
        for p in problems
    )
    assert not any(p.startswith("exporter.metrics.snapshot") for p in problems)  # metrics -> pods is allowed
