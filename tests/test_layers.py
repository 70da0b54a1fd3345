"""The house runs one way, and no module imports in a circle:
fusion_errors, fusion_common < encoders < fusion_heads < zoo < recipes < benchmarks.

Read with ``ast`` (nothing is imported), so an import tucked inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"fusion_errors": 0, "fusion_common": 0, "encoders": 1, "fusion_heads": 2, "zoo": 3, "recipes": 4,
          "benchmarks": 5}


def _modules() -> dict[str, Path]:
    out = {"fusion_errors": ROOT / "fusion_errors.py"}
    for pkg in ("fusion_common", "encoders", "fusion_heads", "zoo", "recipes", "benchmarks"):
        for file in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(file.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = file
    return out


def _imports(name: str, file: Path, known: set[str]) -> list[tuple[str, int]]:
    """Project modules that ``name`` imports anywhere in its file, as (module, line)."""
    is_pkg = file.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            # the longest known module that t names (a.b.c -> a.b when c is a symbol)
            parts = t.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in known:
                    if cand != name:
                        found.append((cand, node.lineno))
                    break
    return found


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


GRAPH = {m: _imports(m, f, set(_modules())) for m, f in _modules().items()}


def test_every_package_is_found() -> None:
    assert {"zoo.model", "zoo.config", "recipes.task", "recipes.sweep.run", "recipes.tridigits.dataset"} <= set(GRAPH)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_from_a_higher_layer(module: str) -> None:
    bad = [f"{module}:{line} imports {dep}" for dep, line in GRAPH[module] if _layer(dep) > _layer(module)]
    assert not bad, "; ".join(bad)


def _ancestors(module: str) -> set[str]:
    """Packages whose __init__ runs when ``module`` is imported (an edge to them is not a real cycle)."""
    parts = module.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts))}


def test_no_import_cycles() -> None:
    edges = {m: {d for d, _ in deps if d not in _ancestors(m)} for m, deps in GRAPH.items()}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_detector_sees_a_function_level_import(tmp_path: Path) -> None:
    file = tmp_path / "mod.py"
    file.write_text("def f():\n    from recipes.cli import main\n")
    assert ("recipes.cli", 2) in _imports("zoo.fake", file, {"recipes.cli", "recipes"})
