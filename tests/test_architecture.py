"""The package's shape: floors that import only downward, and no import cycle.

Every import inside ``blip2cli`` counts, including those deferred into functions: a deferred import
hides a dependency from the reader but not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import blip2cli

PACKAGE = Path(blip2cli.__file__).parent

# Lowest first. A module may import from its own floor and the floors below, never from one above.
FLOORS = [
    {"runtime"},  # errors, atomic writes, JSON, progress, process groups, devices and dtypes, downloads, run dirs
    {"config", "images", "integrity", "recipes"},  # recipe loading, image reading, checkpoint verification
    {"models"},  # networks, checkpoint formats, name resolution, decoding
    {"data"},  # datasets, preparation, CapFilt
    {"api", ""},  # the Python API (``blip2cli.load``, ``blip2cli.api``)
    {"train"},  # pretraining
    {"eval"},  # benchmarks
    {"cli", "__main__"},  # commands: parse, call one function, render
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The ``blip2cli`` modules a file imports, each as the deepest module that exists."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(_existing(f"{target}.{alias.name}") or target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "blip2cli" or m.startswith("blip2cli.")}


def _existing(module: str) -> str | None:
    path = PACKAGE.parent / Path(*module.split("."))
    return module if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() else None


def floor_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"{module}: on no floor; add its folder to FLOORS in {__file__}")


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_floor():
    for module in graph():
        floor_of(module)


def test_no_import_runs_upward():
    upward = [f"{m} (floor {floor_of(m)}) imports {t} (floor {floor_of(t)})"
              for m, targets in graph().items() for t in sorted(targets) if floor_of(t) > floor_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = graph()
    # A package's __init__ re-exporting its modules is not a cycle of design; its modules importing it would be.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_deferred_and_relative_imports(tmp_path):
    """The checks above would pass vacuously if the walk missed imports: it finds the ones it must."""
    edges = graph()
    assert "blip2cli.runtime.errors" in edges["blip2cli.config"]
    assert "blip2cli.models.resolve" in edges["blip2cli.api"]
    assert any(t.startswith("blip2cli.api") for t in edges["blip2cli"])  # deferred, inside ``load``
