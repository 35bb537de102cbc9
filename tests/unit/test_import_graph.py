"""The package's import graph: no circles, and the layers point one way.

Walks every module under ng_jax/ with `ast` (no imports executed), records its project imports at
module level and inside functions alike, and fails on any cycle of modules, naming it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "ng_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from pkg import name` of a submodule counts as it)."""
    modules = {_module_name(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `from a.b import func` -> a.b
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + ".") and t.startswith("ng_jax"):
                    deps.add(t)
        # a package's __init__ is imported by its submodules implicitly; only explicit imports count
        graph[name] = {d for d in deps if not (modules[d].name == "__init__.py" and not modules[d].read_text().strip())}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
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


def test_find_cycle_finds_a_planted_cycle_and_none_in_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("low, high", [
    ("ng_jax.losses", ("ng_jax.",)),               # the paper's maths imports nothing of the project ...
    ("ng_jax.models", ("ng_jax.rl", "ng_jax.eval", "ng_jax.rewards")),  # models know no training or rewards
    ("ng_jax.models.weights", ()),
    ("ng_jax.rewards", ("ng_jax.rl", "ng_jax.eval")),  # rewards know images and prompts, not the loop
    ("ng_jax.sharding", ("ng_jax.",)),
])
def test_layers_point_one_way(low, high):
    graph = import_graph()
    allowed = {"ng_jax.losses": {"ng_jax.flow"}}.get(low, set())
    bad = sorted((m, d) for m, deps in graph.items() if m == low or m.startswith(low + ".")
                 for d in deps if d.startswith(high) and d not in allowed and not d.startswith(low))
    assert not bad, f"{low} must not import {high}: {bad}"


def test_models_weights_import_nets_never_the_reverse():
    graph = import_graph()
    bad = sorted((m, d) for m, deps in graph.items() if m.startswith("ng_jax.models.nets")
                 for d in deps if d.startswith("ng_jax.models.weights"))
    assert not bad, f"networks must not import their loaders: {bad}"
