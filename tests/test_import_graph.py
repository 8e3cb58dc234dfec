"""The project's import graph: no cycles between project modules and the package layering holds.

Every ``import`` counts, module-level and inside functions alike: a function-level import that closes a
cycle still ties the two modules together (neither can be understood, tested or moved alone), and a
function-level ``import torch`` in ``graph_engine`` still breaks that package's torch-free contract.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("graph_engine", "ml", "assets", "omnisage_pipeline")
#: Third-party top-level packages each project package must never import (README, "Layout").
FORBIDDEN = {"graph_engine": {"torch", "dagster"}, "ml": {"dagster"}}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file for every module of the project packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            modules[_module_name(root, path)] = path
    return modules


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import anywhere in ``tree`` loads: ``import a.b`` yields ``a.b`` and
    ``from a import b`` yields ``a.b`` (``b`` may be a submodule of ``a`` or a name defined in it)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, module, is_package)
            names.update(base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports: a name resolves to its longest prefix that is a project
    module, so ``from ml.losses import x`` and ``from ml import losses`` are both edges to ``ml.losses``."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for name in imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            prefixes = (".".join(parts[:end]) for end in range(len(parts), 0, -1))
            target = next((p for p in prefixes if p in modules), None)
            if target is not None and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def cycle_groups(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module: every module of one imports, through
    the others, every other (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(start: str) -> None:
        # Iterative Tarjan: the graph is deep enough that recursion is a needless risk.
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per group of ``cycle_groups``."""
    return [_cycle_in(graph, group) for group in cycle_groups(graph)]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's smallest module (breadth-first back to it)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle in component {sorted(component)}")


def test_checker_finds_cycles_and_function_level_imports(tmp_path):
    """The checker itself: a function-level import closing a cycle and a relative import are both seen."""
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "__init__.py").write_text("")
    (tmp_path / "ml" / "a.py").write_text("from ml.b import f\n")
    (tmp_path / "ml" / "b.py").write_text("def f():\n    from . import c\n")
    (tmp_path / "ml" / "c.py").write_text("def g():\n    import ml.a\n")
    (tmp_path / "ml" / "d.py").write_text("from ml import a\n")
    graph = import_graph(project_modules(tmp_path, ("ml",)))
    assert graph["ml.d"] == {"ml.a"}
    assert find_cycles(graph) == [["ml.a", "ml.b", "ml.c", "ml.a"]]
    graph["ml.c"] = set()
    assert find_cycles(graph) == []


def test_no_import_cycles():
    """No cycle between project modules (module- or function-level imports)."""
    graph = import_graph(project_modules())
    groups = cycle_groups(graph)
    report = [
        f"{' -> '.join(_cycle_in(graph, group))}  (modules in this cycle group: {', '.join(sorted(group))})"
        for group in groups
    ]
    assert not groups, "import cycles:\n" + "\n".join(report)


def layering_violations(modules: dict[str, Path], package: str) -> list[str]:
    """``module imports name`` for every import of a package ``FORBIDDEN`` in ``package``'s modules."""
    bad = []
    for module, path in modules.items():
        if module.split(".")[0] != package:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in sorted(imported_names(tree, module, path.name == "__init__.py")):
            if name.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{module} imports {name}")
    return bad


def test_layering_checker_sees_function_level_imports(tmp_path):
    (tmp_path / "graph_engine").mkdir()
    (tmp_path / "graph_engine" / "a.py").write_text("import numpy\n\ndef f():\n    from torch import nn\n")
    modules = project_modules(tmp_path, ("graph_engine",))
    assert layering_violations(modules, "graph_engine") == ["graph_engine.a imports torch.nn"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    """graph_engine imports no torch/dagster and ml no dagster, not even inside a function."""
    bad = layering_violations(project_modules(), package)
    assert not bad, "\n".join(bad)
