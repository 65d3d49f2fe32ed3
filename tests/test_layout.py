"""The package's layout (docs/architecture.md): no import circle, dependencies run one way
(tools -> compiler -> runtime), and no two modules share a name.

Imports are read from the source (module level and inside functions, not under
``if TYPE_CHECKING:``), so a lazy import that hides a circle still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
# Where each part of the package lives on disk (``passes/`` installs as umup_fx.passes).
SOURCES = {"umup_fx": ROOT / "umup_fx", "umup_fx.passes": ROOT / "passes"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join([package, *parts])] = (path, is_package)
    return found


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(module, names, level) of every import outside ``if TYPE_CHECKING:``."""
    out = []
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.ImportFrom):
                out.append((child.module or "", [a.name for a in child.names], child.level))
            elif isinstance(child, ast.Import):
                out += [(a.name, [], 0) for a in child.names]
            stack.append(child)
    return out


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    for name, (path, is_package) in modules.items():
        graph.add_node(name)
        package = name if is_package else name.rpartition(".")[0]
        for module, names, level in _imports(ast.parse(path.read_text())):
            if level:
                base = package.rsplit(".", level - 1)[0] if level > 1 else package
                module = f"{base}.{module}" if module else base
            if not module.startswith("umup_fx"):
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            if not targets and module in modules:
                targets = [module]
            for target in targets:
                if target != name:
                    graph.add_edge(name, target)
    return graph


def layer(module: str) -> str:
    if module.startswith("umup_fx.runtime"):
        return "runtime"
    if module.startswith("umup_fx.transfer") or module == "umup_fx.__main__":
        return "tools"
    if module == "umup_fx":
        return "api"
    return "compiler"


def test_no_import_circle() -> None:
    graph = import_graph()
    assert graph.number_of_edges() > 50  # the reader found the imports at all
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles)


def test_dependencies_run_one_way() -> None:
    rank = {"runtime": 0, "compiler": 1, "tools": 2, "api": 3}
    upward = [
        f"{a} -> {b}"
        for a, b in import_graph().edges
        if rank[layer(b)] > rank[layer(a)] and b != "umup_fx.errors"
    ]
    assert not upward, "imports against the layering (tools -> compiler -> runtime): " + ", ".join(upward)


def test_no_two_modules_share_a_name() -> None:
    leaves: dict[str, list[str]] = {}
    for name, (_, is_package) in _modules().items():
        if not is_package:
            leaves.setdefault(name.rpartition(".")[2], []).append(name)
    shared = {k: v for k, v in leaves.items() if len(v) > 1}
    assert not shared, f"modules sharing a name: {shared}"


def test_the_layering_check_catches_a_circle() -> None:
    graph = import_graph()
    graph.add_edge("umup_fx.errors", "umup_fx.transform")  # transform imports errors
    assert list(nx.simple_cycles(graph))
