"""The layout keeps the promises of docs/architecture.md: imports point down the layer
table, the import graph of `gateway/` has no cycle, no module grows past 600 lines, and
tests live in the folder of the package they cover."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gateway"

# Top to bottom, as in docs/architecture.md: a module imports only from layers below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("composition", ("gateway.app", "gateway.cli", "gateway.config", "gateway.__main__")),
    ("edge", ("gateway.edge", "gateway.agent")),
    ("ingest", ("gateway.ingest",)),
    ("forwarding", ("gateway.forward", "gateway.events")),
    ("audit", ("gateway.audit",)),
    ("policy", ("gateway.policy",)),
    ("mapping", ("gateway.mapping",)),
    ("codecs", ("gateway.hl7", "gateway.fhir")),
    ("canonical", ("gateway.canonical",)),
    ("store", ("gateway.store",)),
    ("telemetry", ("gateway.telemetry",)),
]
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


MODULES = _modules()


def _imports(module: str, path: Path) -> Iterator[str]:
    """Every gateway module this one imports, at any depth (lazy imports included)."""
    package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                kept = parts[: len(parts) - node.level + (1 if package else 0)]
                base = ".".join([*kept, base] if base else kept)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name


GRAPH = {module: set(_imports(module, path)) for module, path in MODULES.items()}


def _layer(module: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = [m for m in MODULES if m != "gateway" and _layer(m) is None]
    assert not unplaced, f"modules outside the layer table: {unplaced}"


def test_imports_point_down_the_layer_table() -> None:
    upward = []
    for module, imported in GRAPH.items():
        here = _layer(module)
        for target in imported:
            there = _layer(target)
            if here is not None and there is not None and there < here:
                upward.append(f"{module} ({LAYERS[here][0]}) imports {target} "
                              f"({LAYERS[there][0]})")
    assert not upward, "\n".join(sorted(upward))


def test_the_import_graph_has_no_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_is_over_600_lines() -> None:
    long = {m: n for m, p in MODULES.items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_tests_live_in_the_folder_of_their_package() -> None:
    tests = ROOT / "tests"
    loose = sorted(p.name for p in tests.glob("test_*.py"))
    assert not loose, f"test files outside a package folder: {loose}"
    folders = {p.parent.name for p in tests.rglob("test_*.py")}
    assert folders <= {"hl7", "mapping", "fhir", "store", "policy", "audit", "forward", "edge",
                       "ingest", "telemetry", "system", "security", "agent", "events"}, folders
