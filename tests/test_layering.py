"""The code's walls, checked on the source: no import cycle between the project's modules
(counting imports inside functions), data_pipeline never imports seer or cluster, methods import
nothing from the engine, and the training loop has no backend-specific branch."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("seer", "data_pipeline", "cluster")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    # a package's __init__ is imported with its submodules: leave package -> own submodule edges out
    return {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_imports_itself_through_a_loop():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("data_pipeline"):
            assert not {t for t in targets if t.startswith(("seer", "cluster"))}, module
        if module.startswith("seer.methods"):
            assert not {t for t in targets if t.startswith("seer.engine")}, module


def test_training_loop_has_no_backend_branch():
    text = (REPO / "seer" / "engine" / "train.py").read_text()
    assert "data.backend" not in text and "dali" not in text.lower()
