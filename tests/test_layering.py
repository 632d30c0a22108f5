"""The package's layers import only downward, and no module imports itself back in a cycle.

The layers, bottom first (README, CONTRIBUTING): core; analysis and the solver (siblings);
unconstrained; rewrite and tuning (siblings); backends; measure; latency; pipeline; then the
package root and the CLI (cli.py, and cli_models.py, which loads what --model names).
Imports under ``if TYPE_CHECKING:`` are annotations only and are exempt; every other import,
including one inside a function, counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "fxprune"

LAYERS = {
    "core": 0,
    "analysis": 1,
    "solver": 1,
    "unconstrained": 2,
    "rewrite": 3,
    "tuning": 3,
    "backends": 4,
    "measure": 5,
    "latency": 6,
    "pipeline": 7,
    "__init__": 8,
    "__main__": 8,
    "cli": 8,
    "cli_models": 8,
}
TOP = 8  # the package root, __main__ and the CLI (cli, cli_models) may import each other


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Absolute fxprune imports outside ``if TYPE_CHECKING:`` blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "fxprune":
                    found.extend(f"fxprune.{a.name}" for a in child.names)
                elif child.module.startswith("fxprune."):
                    found.append(child.module)
            elif isinstance(child, ast.Import):
                found.extend(a.name for a in child.names if a.name.startswith("fxprune"))
            visit(child)

    visit(tree)
    return found


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _module(path)
        g.add_node(src)
        for dst in _runtime_imports(ast.parse(path.read_text(), str(path))):
            g.add_edge(src, dst)
    return g


def test_every_module_is_in_a_layer():
    unknown = sorted(m for m in _graph() if _layer(m) not in LAYERS)
    assert not unknown, f"add these to LAYERS (and to CONTRIBUTING's layout): {unknown}"


def test_layers_import_only_downward():
    upward = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, b in _graph().edges
        if LAYERS.get(_layer(b), 99) > LAYERS.get(_layer(a), -1)
        or (LAYERS[_layer(a)] == LAYERS.get(_layer(b)) < TOP and _layer(a) != _layer(b))
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = _graph()
    # a package importing its own submodules (re-exports) is not a cycle between modules
    g.remove_edges_from([(a, b) for a, b in list(g.edges) if b.startswith(a + ".")])
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles
