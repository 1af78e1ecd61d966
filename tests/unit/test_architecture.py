"""The package's import structure, read from the source with ``ast`` (nothing is imported).

Every import counts: module level, inside functions, under ``TYPE_CHECKING``. ``from pkg import
name`` depends on ``pkg.name`` when that is a module of the package, else on ``pkg``; relative
imports are resolved; importing ``a.b.c`` is a dependency on ``a.b.c`` only (the implicit import of
its parent packages is ignored: a package's ``__init__`` importing its own submodules is no cycle).
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "tvlars_scale"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE
TRAINER_MAX_LINES = 360


@dataclass(frozen=True)
class Import:
    """One dependency of ``source`` on ``target``, from line ``line`` of ``source``'s file."""

    source: str
    target: str
    line: int


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports_of(name: str, path: Path, known: Mapping[str, Path]) -> Iterator[Import]:
    """Every module ``name`` (file ``path``) imports, as absolute dotted names."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # The package a relative import starts from: the module itself for an __init__.
                parts = name.split(".") if is_package else name.split(".")[:-1]
                drop = node.level - 1
                if drop >= len(parts):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top level")
                base = ".".join(parts[: len(parts) - drop])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                yield Import(name, submodule if submodule in known else origin, node.lineno)


def import_graph(package_dir: Path, package: str) -> tuple[dict[str, set[str]], list[Import]]:
    """The package's modules -> the package modules each imports (itself excluded), and every
    import of a name inside the package (including names that are not modules of it)."""
    known = module_files(package_dir, package)
    imports = [
        found
        for name, path in known.items()
        for found in _imports_of(name, path, known)
        if found.target == package or found.target.startswith(package + ".")
    ]
    graph: dict[str, set[str]] = {name: set() for name in known}
    for found in imports:
        if found.target in known and found.target != found.source:
            graph[found.source].add(found.target)
    return graph, imports


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue  # a lone module that does not import itself
        cycles.append(_path_back(graph, start, members))
    return sorted(cycles)


def _path_back(graph: Mapping[str, set[str]], start: str, members: set[str]) -> list[str]:
    """A shortest path ``start -> ... -> start`` through ``members`` (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [start]
                    while node != start:
                        path.append(node)
                        node = parent[node]
                    return [start, *reversed(path[1:]), start]
                if nxt not in parent:
                    parent[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def _describe(cycle: list[str], imports: list[Import], modules: Mapping[str, Path]) -> str:
    steps = []
    for source, target in itertools.pairwise(cycle):
        line = min(i.line for i in imports if i.source == source and i.target == target)
        where = modules[source].relative_to(PACKAGE_DIR.parent)
        steps.append(f"{source} -> {target} ({where}:{line})")
    return "\n  ".join(steps)


@pytest.fixture(scope="module")
def package_graph() -> tuple[dict[str, set[str]], list[Import]]:
    return import_graph(PACKAGE_DIR, PACKAGE)


# --- the detector itself --------------------------------------------------------------------------


def test_find_cycles_on_a_synthetic_graph():
    graph = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"},
        "e": set(),
        "f": {"f"},  # imports itself
        "g": {"h"},
        "h": {"g", "a"},  # g <-> h, which also reaches the first cycle without closing one
    }
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["f", "f"], ["g", "h", "g"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []


def test_import_graph_on_a_synthetic_package(tmp_path: Path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .sub import helper\n",
        "sub/__init__.py": "from . import leaf\nfrom .leaf import VALUE\n",
        "sub/leaf.py": "import os\n\ndef f():\n    from pkg import top\n",
        "sub/helper.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..top import X\n",
        "top.py": "import pkg.sub.leaf\nfrom pkg.sub import CONSTANT\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    graph, imports = import_graph(root, "pkg")
    assert graph == {
        "pkg": {"pkg.sub.helper"},
        "pkg.sub": {"pkg.sub.leaf"},  # `from . import leaf` and `from .leaf import VALUE`
        "pkg.sub.helper": {"pkg.top"},  # under TYPE_CHECKING, two levels up
        "pkg.sub.leaf": {"pkg.top"},  # inside a function; `os` is not the package's
        "pkg.top": {"pkg.sub.leaf", "pkg.sub"},  # CONSTANT is a name, not a module
    }
    assert all(i.target.startswith("pkg") for i in imports)
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.top", "pkg.sub"]]


# --- the package ----------------------------------------------------------------------------------


def test_package_has_no_import_cycle(package_graph):
    graph, imports = package_graph
    assert len(graph) > 10, f"found only {sorted(graph)} under {PACKAGE_DIR}"
    cycles = find_cycles(graph)
    modules = module_files(PACKAGE_DIR, PACKAGE)
    report = "\n".join(f"cycle:\n  {_describe(c, imports, modules)}" for c in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) among {PACKAGE} modules:\n{report}"


def test_optim_imports_nothing_else_from_the_package(package_graph):
    _, imports = package_graph
    assert any(i.source.startswith(f"{PACKAGE}.optim.") for i in imports)  # the parser sees optim
    outside = sorted(
        f"{i.source} (line {i.line}) imports {i.target}"
        for i in imports
        if (i.source == f"{PACKAGE}.optim" or i.source.startswith(f"{PACKAGE}.optim."))
        and not (i.target == f"{PACKAGE}.optim" or i.target.startswith(f"{PACKAGE}.optim."))
    )
    assert not outside, "the optimizers must stand alone:\n" + "\n".join(outside)


def test_only_paper_imports_paper(package_graph):
    _, imports = package_graph
    paper = f"{PACKAGE}.paper"

    def in_paper(name: str) -> bool:
        return name == paper or name.startswith(paper + ".")

    offenders = sorted(
        f"{i.source} (line {i.line}) imports {i.target}"
        for i in imports
        if in_paper(i.target) and not in_paper(i.source)
    )
    assert not offenders, f"only {paper} may import {paper}:\n" + "\n".join(offenders)


def test_trainer_is_short():
    lines = len((PACKAGE_DIR / "trainer.py").read_text(encoding="utf-8").splitlines())
    assert lines <= TRAINER_MAX_LINES, (
        f"{PACKAGE}/trainer.py has {lines} lines (at most {TRAINER_MAX_LINES})"
    )
