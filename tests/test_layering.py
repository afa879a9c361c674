"""The import layering of the project's packages, read from the source with ``ast``.

Every ``import`` counts: module level, inside functions and under ``if TYPE_CHECKING:`` alike,
since a deferred import still ties the modules together. :data:`LAYERS` is the order that the
package docstrings state (``quantdag/__init__.py``), lowest first: a module may import its own
package and packages of lower layers, not a package of its own layer or above.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_PACKAGES = ("conf", "quantdag", "tasks", "flows")

LAYERS: dict[str, int] = {
    "conf": 0,
    "quantdag": 0,  # the namespace package's __init__: a docstring only
    "quantdag.format": 1,
    "quantdag.model": 2,
    "quantdag.demo": 2,
    "quantdag.calibration": 3,
    "quantdag.evaluation": 3,
    "quantdag.runtime": 4,
    "tasks": 5,
    "flows": 6,
}
"""Package -> layer. A sub-package not named here (``tasks.watch``) belongs to its parent's entry,
except under :data:`NAMESPACES`."""

NAMESPACES = ("quantdag",)
"""Packages whose entry covers their ``__init__.py`` only: each sub-package needs an entry of its own."""


@dataclass(frozen=True)
class Import:
    """One project import: ``source`` imports ``target`` at ``path:line``."""

    source: str
    target: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} -> {self.target}"


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the top packages under ``root``."""
    modules: dict[str, Path] = {}
    for top in TOP_PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def project_imports(root: Path) -> tuple[dict[str, Path], list[Import], list[Import]]:
    """Every import between project modules under ``root``.

    ``from a.b import c`` names module ``a.b.c`` when that is a module, else ``a.b``; relative
    imports resolve against the importing module's package.

    Returns:
        ``(modules, imports, unresolved)``: the module files, the imports whose target is a
        module of the tree, and those naming a project module that does not exist.
    """
    modules = module_files(root)
    imports: list[Import] = []
    unresolved: list[Import] = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        rel = str(path.relative_to(root))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                targets = [f"{base_name}.{alias.name}" if f"{base_name}.{alias.name}" in modules else base_name
                           for alias in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                if target.split(".")[0] not in TOP_PACKAGES:
                    continue
                record = Import(name, target, rel, node.lineno)
                (imports if target in modules else unresolved).append(record)
    return modules, imports, unresolved


def layer_of(module: str) -> str:
    """The :data:`LAYERS` entry a module belongs to: its longest package prefix there."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS and (prefix == module or prefix not in NAMESPACES):
            return prefix
    raise KeyError(module)


def unlisted_modules(modules: dict[str, Path]) -> list[str]:
    """Modules that belong to no :data:`LAYERS` entry."""
    out = []
    for module in modules:
        try:
            layer_of(module)
        except KeyError:
            out.append(module)
    return out


def layer_violations(imports: list[Import]) -> list[str]:
    """Imports of a package of the same or a higher layer (a module's own package is allowed)."""
    out = []
    for imp in imports:
        source, target = layer_of(imp.source), layer_of(imp.target)
        if source != target and LAYERS[target] >= LAYERS[source]:
            out.append(f"{imp} ({source}, layer {LAYERS[source]}, imports {target}, layer {LAYERS[target]})")
    return out


def upward_imports(imports: list[Import]) -> list[str]:
    """Imports of ``tasks`` or ``flows`` from ``quantdag`` or ``conf``."""
    return [str(imp) for imp in imports
            if imp.source.split(".")[0] in ("quantdag", "conf") and imp.target.split(".")[0] in ("tasks", "flows")]


def import_cycles(imports: list[Import]) -> list[str]:
    """Every strongly connected group of modules (Tarjan), each with the imports that tie it.

    Returns:
        One entry per group of two or more modules (or a module importing itself): a cycle
        through the group's first module, then each import inside the group with its line.
    """
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    out = []
    for group in sorted(groups):
        members = set(group)
        path = _cycle_through(group[0], members, graph)
        edges = "; ".join(str(imp) for imp in imports if imp.source in members and imp.target in members)
        out.append(f"{' -> '.join(path)} [{edges}]")
    return out


def _cycle_through(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from ``start`` back to itself inside one strongly connected group."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{start} is in no cycle of {sorted(members)}")


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, Path], list[Import], list[Import]]:
    """:func:`project_imports` of this checkout, read once."""
    return project_imports(ROOT)


def test_every_module_has_a_layer(project) -> None:
    modules, _, _ = project
    assert len(modules) > 50, f"found only {len(modules)} modules under {ROOT}: is ROOT wrong?"
    missing = unlisted_modules(modules)
    assert not missing, f"modules of no package in LAYERS (add the package to the table): {missing}"


def test_every_project_import_names_a_module(project) -> None:
    _, _, unresolved = project
    assert not unresolved, "imports of project modules that do not exist:\n" + "\n".join(map(str, unresolved))


def test_quantdag_and_conf_never_import_tasks_or_flows(project) -> None:
    _, imports, _ = project
    found = upward_imports(imports)
    assert not found, "quantdag/ and conf/ must not import tasks or flows:\n" + "\n".join(found)


def test_packages_import_only_lower_layers(project) -> None:
    _, imports, _ = project
    found = layer_violations(imports)
    assert not found, "imports against the layer order (LAYERS):\n" + "\n".join(found)


def test_no_import_cycles(project) -> None:
    _, imports, _ = project
    found = import_cycles(imports)
    assert not found, f"{len(found)} import cycle(s) between modules:\n" + "\n".join(found)


def test_checks_find_planted_violations(tmp_path: Path) -> None:
    """The checks above on a small tree with one of each violation, so they can fail."""
    files = {
        "conf/__init__.py": "",
        "conf/schema.py": "def late():\n    from tasks import step\n",  # upward, function level
        "quantdag/__init__.py": "",
        "quantdag/format/__init__.py": "",
        "quantdag/format/a.py": "import typing\nif typing.TYPE_CHECKING:\n    from quantdag.format import b\n",
        "quantdag/format/b.py": "from . import c\n",
        "quantdag/format/c.py": "import quantdag.format.a\n",  # closes a -> b -> c -> a
        "quantdag/model/__init__.py": "from quantdag.runtime.locks import slot\n",  # a lower layer imports a higher one
        "quantdag/runtime/__init__.py": "",
        "quantdag/runtime/locks.py": "from quantdag.gone import thing\n",  # no such module
        "quantdag/extra/__init__.py": "",  # a sub-package without a layer
        "tasks/__init__.py": "",
        "tasks/step.py": "from conf.schema import late\n",  # closes conf.schema -> tasks.step
        "flows/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules, imports, unresolved = project_imports(tmp_path)
    assert unlisted_modules(modules) == ["quantdag.extra"]
    assert [str(i) for i in unresolved] == ["quantdag/runtime/locks.py:1: quantdag.runtime.locks -> quantdag.gone"]
    assert upward_imports(imports) == ["conf/schema.py:2: conf.schema -> tasks.step"]
    violations = layer_violations(imports)
    assert [v.split(" (")[0] for v in violations] == [
        "conf/schema.py:2: conf.schema -> tasks.step",
        "quantdag/model/__init__.py:1: quantdag.model -> quantdag.runtime.locks",
    ], violations
    cycles = import_cycles(imports)
    assert [c.split(" [")[0] for c in cycles] == [
        "conf.schema -> tasks.step -> conf.schema",
        "quantdag.format.a -> quantdag.format.b -> quantdag.format.c -> quantdag.format.a",
    ], cycles
