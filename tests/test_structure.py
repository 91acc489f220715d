"""The package stays readable: no function longer than 80 lines, and no import cycle between its modules.

Both walk the source of every module of `mmpl_fast` and `mmpl_fast.kernels` with `ast` (nothing is imported).
An import counts wherever it is written: at module level, inside a function, or under ``if TYPE_CHECKING``
(a cycle that only a lazy import keeps from failing is still a cycle of the design). ``from pkg import name``
depends on ``pkg.name`` when that is a module, else on ``pkg`` itself (its ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import mmpl_fast
import mmpl_fast.kernels

MAX_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for the package and its kernels."""
    out = {}
    for pkg in (mmpl_fast, mmpl_fast.kernels):
        root = Path(pkg.__file__).resolve().parent
        for file in sorted(root.rglob("*.py")):
            if pkg is mmpl_fast and "kernels" in file.relative_to(root).parts:
                continue  # a symlink into kernels/: walked as mmpl_fast.kernels
            parts = [*pkg.__name__.split("."), *file.relative_to(root).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


MODULES = _modules()


def _long_functions(limit: int) -> list[str]:
    found = []
    for name, file in MODULES.items():
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{name}.{node.name} ({length} lines, {file.name}:{node.lineno})")
    return found


def _imports(name: str, file: Path) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            deps |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names}
    return {d for d in deps if d in MODULES and d != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle through them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(_path_through(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_through(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One cycle inside a strongly connected component: a -> ... -> a (breadth-first from its first module)."""
    start = min(comp)
    parent = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & comp):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return sorted(comp)


def test_the_walk_sees_the_package():
    assert {"mmpl_fast.pipeline", "mmpl_fast.kernels.stage_attention", "mmpl_fast.scheduler.execute"} <= set(MODULES)
    assert "mmpl_fast.kernels" in MODULES and not any(".kernels.kernels" in m for m in MODULES)


def test_no_function_is_longer_than_80_lines():
    long = _long_functions(MAX_LINES)
    assert not long, "functions over 80 lines:\n  " + "\n  ".join(long)


def test_the_length_check_finds_a_long_function():
    tree = ast.parse("def f():\n" + "    x = 1\n" * 90)
    (node,) = tree.body
    assert node.end_lineno - node.lineno + 1 > MAX_LINES


def test_no_import_cycles():
    graph = {name: _imports(name, file) for name, file in MODULES.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_modules():
    deps = _imports("mmpl_fast.pipeline", MODULES["mmpl_fast.pipeline"])
    assert {"mmpl_fast._generation", "mmpl_fast.request", "mmpl_fast.scheduler.execute"} <= deps
    assert "mmpl_fast.pipeline" not in _imports("mmpl_fast._generation", MODULES["mmpl_fast._generation"])
