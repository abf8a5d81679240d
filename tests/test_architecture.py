"""The layering the project promises (docs/architecture.md), read from the source's import statements.

Layers, lowest first: the transport-free core (``specdec_core``), the wire layer (``specdec``), the two
services, the client, the benchmarks. A module imports only from its own layer or lower ones, no import
statement anywhere (function-level ones included) closes a circle, the core imports no gRPC, the wire
layer no runtime, the client no torch, and the core's functions and classes stay short enough to read.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {
    "specdec_core": 0,
    "specdec": 1,
    "drafter_service": 2,
    "verifier_service": 2,
    "client": 3,
    "benchmarks": 4,
}
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 200


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in LAYERS
        for path in (ROOT / package).rglob("*.py")
        if "v1" not in path.relative_to(ROOT).parts  # generated protobuf stubs
    }


def _imported(module: str, path: Path) -> set[str]:
    """Every module name an import statement of ``module`` names (absolute; relative ones resolved)."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = node.module if not node.level else ".".join(p for p in (base, node.module) if p)
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)  # ``from pkg import module``
    return names


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    sources = _sources()
    edges: dict[str, set[str]] = {}
    for module, path in sources.items():
        deps = set()
        for name in _imported(module, path):
            while name and name not in sources:  # ``pkg.module.Class`` -> ``pkg.module``
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        edges[module] = deps
    return edges


@pytest.fixture(scope="module")
def external() -> dict[str, set[str]]:
    """module -> the top-level names of everything it imports."""
    return {m: {n.split(".")[0] for n in _imported(m, p)} for m, p in _sources().items()}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_no_module_imports_a_higher_layer(graph):
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m)]
    assert not upward


def test_the_services_do_not_import_each_other(graph):
    crossing = [
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if _layer(m) == _layer(d) == 2 and m.split(".")[0] != d.split(".")[0]
    ]
    assert not crossing


def test_no_import_circle(graph):
    """Tarjan's strongly connected components of the import graph: every one is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles


def test_the_core_imports_no_grpc_and_the_wire_layer_no_runtime(graph, external):
    core = {m: names for m, names in external.items() if _layer(m) == 0}
    assert not {m for m, names in core.items() if names & {"grpc", "google"}}
    wire_to_runtime = [
        f"{m} -> {d}"
        for m, deps in graph.items()
        if _layer(m) == 1
        for d in deps
        if d.startswith("specdec_core.runtime")
    ]
    assert not wire_to_runtime


def test_the_client_imports_no_torch(external):
    assert not {m for m, names in external.items() if m.startswith("client") and "torch" in names}
    # nor through what it imports: the library, the CLI, the OpenAI frontend and the demo load without it
    modules = "client.client, client.cli, client.openai_api, client.local, client.demo"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_core_reads_in_short_pieces():
    too_long = []
    for path in sorted((ROOT / "specdec_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = (
                MAX_FUNCTION_LINES
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                else MAX_CLASS_LINES
                if isinstance(node, ast.ClassDef)
                else None
            )
            if limit is not None and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not too_long
