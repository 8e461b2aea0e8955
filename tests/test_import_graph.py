"""The import graph between tailorlm's packages, read from the source with ``ast`` (nothing is imported).

A unit is a subpackage (``data``, ``methods``, ``bench``, ...) or a top-level module (``metrics``,
``files``); ``tailorlm`` itself is the package's ``__init__``. Every import counts, at the top of a file,
inside a function or under ``TYPE_CHECKING``: an import moved into a function still ties the two packages
together, it only hides the cycle from import order until some call path runs it.

Every unit may import only what ``MAY_IMPORT`` lists for it, which makes the dependencies run one way
(docs/development.md, "Layout"): ``kinds -> engine -> store -> train`` and ``data -> methods -> bench``,
with ``perf`` measuring from outside and the CLI on top. The terminal UI libraries are imported by the CLI
alone.
"""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "tailorlm"

# What each unit may import besides itself. Foundations (single modules) import nothing or each other.
MAY_IMPORT: dict[str, frozenset[str]] = {
    unit: frozenset(allowed)
    for unit, allowed in {
        "tailorlm": (),
        "files": (),
        "progress": (),
        "settings": (),
        "device": (),
        "metrics": (),
        "kinds": (),
        "precision": ("device", "files", "settings"),
        "models": ("device", "files", "precision", "settings"),
        "engine": ("kinds", "models"),
        "store": ("engine", "files", "kinds"),
        "train": ("engine", "kinds", "models", "progress", "store"),
        "data": ("metrics",),
        "methods": ("data", "engine", "files", "kinds", "metrics", "models", "progress", "store", "train"),
        "bench": ("data", "engine", "files", "methods", "metrics", "progress", "train"),
        "perf": (
            "cluster",
            "data",
            "device",
            "engine",
            "files",
            "kinds",
            "methods",
            "models",
            "precision",
            "progress",
            "serve",
            "settings",
            "store",
            "train",
            "users",
        ),
        "users": ("data", "engine", "files", "kinds", "methods", "models", "progress", "store", "train"),
        "serve": (
            "data",
            "engine",
            "files",
            "kinds",
            "methods",
            "models",
            "progress",
            "settings",
            "store",
            "train",
            "users",
        ),
        "doctor": ("device", "models", "precision", "settings"),
        # Ray (training groups on workers, replicas behind Ray Serve): beside the local backends it scales.
        "cluster": ("engine", "kinds", "models", "progress", "serve", "settings", "store", "train", "users"),
        "cli": (
            "bench",
            "cluster",
            "data",
            "device",
            "doctor",
            "engine",
            "files",
            "kinds",
            "methods",
            "metrics",
            "models",
            "perf",
            "precision",
            "progress",
            "serve",
            "settings",
            "store",
            "users",
        ),
    }.items()
}
CHECKED: tuple[str, ...] = tuple(MAY_IMPORT)
UI_LIBRARIES = ("rich", "typer")

Graph = dict[str, dict[str, list[str]]]  # unit -> imported unit -> ["data/lamp.py:24", ...]


def module_name(path: Path) -> str:
    """``src/tailorlm/data/lamp.py`` -> ``tailorlm.data.lamp``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """``tailorlm.data.lamp`` -> ``data``, ``tailorlm.metrics`` -> ``metrics``, ``tailorlm`` stays."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def is_module(module: str) -> bool:
    """Whether ``module`` is a file or a package folder under ``src``."""
    path = SRC.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path.is_dir() and any(path.glob("*.py")))


def imported_modules(
    source: str, module: str, is_package: bool, exists: Callable[[str], bool] = is_module
) -> Iterator[tuple[str, int]]:
    """Every tailorlm module ``source`` imports, with its line: ``from tailorlm.data import lamp`` names
    ``tailorlm.data.lamp``, ``from tailorlm.data import load_task`` names ``tailorlm.data``. ``exists``
    tells a submodule from a name defined in the package."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative: one level is the module's own package, each further level one package up.
                package = module.split(".") if is_package else module.split(".")[:-1]
                parts = package[: len(package) - (node.level - 1)]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            found = [f"{base}.{a.name}" if exists(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        for name in found:
            if name == ROOT or name.startswith(ROOT + "."):
                yield name, node.lineno


def import_graph() -> tuple[Graph, list[str]]:
    """The unit graph of everything under ``src/tailorlm``, and the imports that name no module there:
    of a unit that does not exist, from anywhere (a deleted package); of a missing module inside a unit
    that exists, only from or into ``CHECKED``, like the other rules here."""
    graph: Graph = {}
    missing: list[str] = []
    for path in sorted((SRC / ROOT).rglob("*.py")):
        module = module_name(path)
        where = path.relative_to(SRC / ROOT).as_posix()
        source = unit_of(module)
        # setdefault: a unit that imports nothing of tailorlm's is still a node
        edges = graph.setdefault(source, defaultdict(list))
        for name, line in imported_modules(path.read_text("utf-8"), module, path.name == "__init__.py"):
            target = unit_of(name)
            if not is_module(name):
                checked = source in CHECKED or target in CHECKED
                if checked or not is_module(f"{ROOT}.{target}"):
                    missing.append(f"{where}:{line} imports {name}")
                continue
            if target != source:
                edges[target].append(f"{where}:{line}")
    return graph, missing


def cycle_through(graph: Graph, start: str) -> list[str] | None:
    """The shortest import path from ``start`` back to itself (``[start, ..., start]``), or None.
    Breadth first from ``start``; the graph has no self-edges, so a path back has at least two units."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        unit = queue.popleft()
        for target in graph.get(unit, {}):
            if target == start:
                path = [unit]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if target not in came_from:
                came_from[target] = unit
                queue.append(target)
    return None


def describe(graph: Graph, edges: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {a} -> {b}  ({', '.join(graph[a][b])})" for a, b in edges)


@pytest.fixture(scope="module")
def walked() -> tuple[Graph, list[str]]:
    return import_graph()


@pytest.fixture(scope="module")
def graph(walked: tuple[Graph, list[str]]) -> Graph:
    return walked[0]


def test_the_walker_reads_every_kind_of_import():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import tailorlm.bench.runner\n"
        "from tailorlm import metrics, __version__\n"
        "from . import splits\n"
        "from ..methods.recipes import Recipe\n"
        "if TYPE_CHECKING:\n"
        "    from tailorlm.engine import x\n"
        "def later():\n"
        "    from tailorlm.cli import app\n"
    )
    # The modules of a made-up tree, so that the walker's test does not move with the real one.
    modules = {"tailorlm.metrics", "tailorlm.data.splits", "tailorlm.methods.recipes", "tailorlm.engine.x"}
    found = [name for name, _ in imported_modules(source, "tailorlm.data.lamp", False, modules.__contains__)]
    assert found == [
        "tailorlm.bench.runner",
        "tailorlm.metrics",
        "tailorlm",
        "tailorlm.data.splits",
        "tailorlm.methods.recipes",
        "tailorlm.engine.x",
        "tailorlm.cli",
    ]
    assert [unit_of(name) for name in found] == [
        "bench",
        "metrics",
        "tailorlm",
        "data",
        "methods",
        "engine",
        "cli",
    ]


def test_imports_name_modules_that_exist(walked):
    """An import of a module that is gone (a moved package, say) fails only when its line runs, which for
    an import inside a function may be in no test at all."""
    _, missing = walked
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_every_unit_is_placed(graph):
    assert "data" in graph, f"walked the wrong folder ({SRC}): found {sorted(graph)}"
    unplaced = sorted(set(graph) - set(MAY_IMPORT))
    assert not unplaced, f"units with no place in MAY_IMPORT (give each its allowed imports): {unplaced}"


@pytest.mark.parametrize("unit", sorted(MAY_IMPORT))
def test_imports_follow_the_layers(graph, unit):
    extra = [(unit, target) for target in graph.get(unit, {}) if target not in MAY_IMPORT[unit]]
    assert not extra, f"tailorlm.{unit} may import only {sorted(MAY_IMPORT[unit])}; it imports:\n" + describe(
        graph, extra
    )


def test_only_the_cli_imports_terminal_ui_libraries():
    found = []
    for path in sorted((SRC / ROOT).rglob("*.py")):
        if path.relative_to(SRC / ROOT).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            found += [
                f"{path.relative_to(SRC).as_posix()}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[0] in UI_LIBRARIES
            ]
    assert not found, "progress and printing reach the CLI through callbacks; found:\n" + "\n".join(found)


@pytest.mark.parametrize("unit", CHECKED)
def test_no_import_cycle_through(graph, unit):
    cycle = cycle_through(graph, unit)
    assert cycle is None, f"import cycle through {unit}: {' -> '.join(cycle)}\n" + describe(
        graph, list(pairwise(cycle))
    )
