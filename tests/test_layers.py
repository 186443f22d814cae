"""The package rule of docs/architecture.md, checked on every import under src/ (lazy ones
and those under TYPE_CHECKING included).

A package may import only packages of lower layers (and itself); packages of one layer never
import each other; no package names another package's private modules or names (those
starting with ``_``). The Conductor and the API load no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kvcake"

# Lowest first. Kept in step with the table in docs/architecture.md.
LAYERS: list[set[str]] = [
    {"common"},
    {"ops", "transfer"},
    {"wire"},
    {"text"},
    {"model"},
    {"store"},
    {"engine"},
    {"api"},
    {"conductor", "worker", "vllm"},
    {"sim", "cli_flags", "cli_errors"},
    {"cluster"},
    {"bench", "chaos"},
    {"cli", "__init__"},
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def _package(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, names) of every kvcake import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []


def _edges() -> Iterator[tuple[str, str, str, list[str]]]:
    """(where, importing package, imported module, names) of cross-package imports."""
    for path in sorted(SRC.rglob("*.py")):
        source = _package(path)
        for line, module, names in _imports(path):
            parts = module.split(".")
            if parts[0] != "kvcake" or len(parts) < 2 or parts[1] == source:
                continue
            where = f"{path.relative_to(SRC.parent)}:{line}"
            yield where, source, module, names


def test_every_package_has_a_layer() -> None:
    packages = {_package(path) for path in SRC.rglob("*.py")} - {"data"}
    assert packages - RANK.keys() == set(), "add new packages to LAYERS (and the docs)"


def test_imports_go_down_the_layers() -> None:
    wrong = [f"{where}: {source} (layer {RANK[source]}) imports {module} (layer "
             f"{RANK[module.split('.')[1]]})" for where, source, module, _ in _edges()
             if RANK[module.split(".")[1]] >= RANK[source]]
    assert wrong == []


def test_no_package_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for _, source, module, _ in _edges():
        graph.setdefault(source, set()).add(module.split(".")[1])
    assert _cycle(graph) is None


def test_no_reach_into_private_modules_or_names() -> None:
    reaches = [f"{where}: {source} imports {module} {names}" for where, source, module, names
               in _edges() if any(part.startswith("_") for part in module.split(".")[1:])
               or any(name.startswith("_") for name in names)]
    assert reaches == []


def test_the_conductor_and_the_api_load_no_torch() -> None:
    # torch is the engine's extra: the Conductor process must start without it
    assert _printed("import sys, kvcake.cli, kvcake.cluster.commands, kvcake.conductor.run, "
                    "kvcake.api.app, kvcake.store.master.run; print('torch' in sys.modules)") \
        == "False"


def test_a_command_loads_no_model_converter_until_it_converts() -> None:
    # every kvcake process imports the CLI first: gguf and numpy (half a second of a child's
    # start) are for converting a GGUF once, not for parsing flags
    assert _printed("import sys, kvcake.cli, kvcake.model; "
                    "print(sorted(m for m in ('gguf', 'numpy') if m in sys.modules))") == "[]"


def _printed(code: str) -> str:
    """What a fresh interpreter running ``code`` prints."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    return result.stdout.strip()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path, node, target]
            if target not in state and (found := visit(target, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


@pytest.mark.parametrize(("graph", "cyclic"), [
    ({"a": {"b"}, "b": {"c"}}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"a"}}, True),
])
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], cyclic: bool) -> None:
    assert (_cycle(graph) is not None) == cyclic
