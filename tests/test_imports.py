"""The package's import graph: lower layers never import higher ones, and nothing imports in a circle."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "hiermodel"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The hiermodel modules a file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hiermodel"):
            for alias in node.names:  # `from hiermodel.data import sources` imports a module
                candidate = f"{node.module}.{alias.name}"
                is_module = (REPO / Path(*candidate.split("."))).with_suffix(".py").exists()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("hiermodel"))
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in PACKAGE.rglob("*.py")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dependency in sorted(graph.get(module, ())):
            if state.get(dependency) == "open":
                found.append(stack[stack.index(dependency):] + [dependency])
            elif dependency not in state:
                visit(dependency)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_the_scan_sees_imports_inside_functions_and_finds_a_planted_circle():
    graph = import_graph()
    assert "hiermodel.run" in graph["hiermodel.compress.integer_lm"]  # imported inside from_run
    assert cycles({**graph, "hiermodel.storage": {"hiermodel.cli"}}) != []


def test_no_module_imports_in_a_circle():
    assert cycles(import_graph()) == []


def imports_from(graph, lower: tuple[str, ...], higher: tuple[str, ...]) -> dict:
    return {m: sorted(d for d in deps if d.startswith(higher)) for m, deps in graph.items()
            if m.startswith(lower) and any(d.startswith(higher) for d in deps)}


def test_no_module_imports_the_cli_and_lower_layers_do_not_import_higher_ones():
    graph = import_graph()
    assert [m for m, deps in graph.items() if "hiermodel.cli" in deps] == []
    layers = ["hiermodel.text", "hiermodel.data", "hiermodel.models", "hiermodel.train", "hiermodel.compress"]
    for i, layer in enumerate(layers[:-1]):
        assert imports_from(graph, tuple(layers[:i + 1]), tuple(layers[i + 1:])) == {}, layer
