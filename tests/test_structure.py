"""The shipped code's shape: no import cycle, no module over 800 lines, settings that import nothing of the project."""

from __future__ import annotations

import ast
from pathlib import Path

TIER = "unit"  # see tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("fed_unlearn", "server", "clients")
MAX_LINES = 800


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules ``module`` imports, inside functions too; ``if TYPE_CHECKING:`` blocks do not count."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import mod`` imports the module; ``from mod import name`` the module
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def import_cycles(root: Path, packages: tuple[str, ...]) -> list[list[str]]:
    """The strongly connected groups of more than one module in the import graph (Tarjan)."""
    files = _modules(root, packages)
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_checker_finds_a_deferred_cycle_and_ignores_a_typing_only_one(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import y\n")
    (pkg / "d.py").write_text("from pkg.c import z\n")
    assert import_cycles(tmp_path, ("pkg",)) == [["pkg.a", "pkg.b"]]


def test_shipped_code_has_no_import_cycle():
    assert import_cycles(ROOT, SHIPPED) == []


def test_settings_reader_imports_nothing_of_the_project():
    files = _modules(ROOT, ("fed_unlearn",))
    assert _imports(files["fed_unlearn.settings"], "fed_unlearn.settings", set(files)) == set()


def test_no_shipped_module_is_over_800_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules(ROOT, SHIPPED).values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_imports_go_the_documented_way():
    """docs/development.md "What may import what": the strategy's parts never import the strategy, and so on."""
    files = _modules(ROOT, SHIPPED)
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}
    importers = {m: {a for a, deps in graph.items() if m in deps} for m in files}
    parts = {"requests", "outbox", "intake", "stepping", "compose", "records", "wire", "replies", "client"}
    assert not importers["fed_unlearn.flower.strategy"] & {f"fed_unlearn.flower.{p}" for p in parts}
    assert importers["server.experiment"] <= {"server.server_app"}
    assert not any(d.startswith("server") for m in files if m.startswith("clients") for d in graph[m])
    assert not any(d.startswith("fed_unlearn.flower.") for d in graph["fed_unlearn.config"])
    assert "fed_unlearn.config" not in {d for m in files if m.startswith("fed_unlearn.unlearning") for d in graph[m]}
