"""raylm's import graph, read from the source (imports inside functions too): no circles, and every import
runs down the layers, so a part can change without its callers' callers."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# Lowest first; a module may import its own layer's modules and those below, never above.
LAYERS = [
    {"raylm", "raylm.errors", "raylm.models", "raylm.adapters", "raylm._ray", "raylm._vllm"},
    {"raylm.config", "raylm.hardware", "raylm.contract"},
    {"raylm.engine"},
    {"raylm.data", "raylm.bench"},
    {"raylm.serve"},
    {"raylm.cli"},
]


def _layer(module: str) -> int:
    for depth in (3, 2, 1):
        prefix = ".".join(module.split(".")[:depth])
        for i, layer in enumerate(LAYERS):
            if prefix in layer:
                return i
    raise AssertionError(f"{module} is in no layer")


def graph() -> dict[str, set[str]]:
    sources = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        sources[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {}
    for module, path in sources.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raylm"):
                for alias in node.names:  # `from raylm.serve import stream` imports a module, not the package
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in sources else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("raylm"))
        edges[module] = {i for i in found if i in sources and i != module}
    return edges


def test_no_import_runs_up_a_layer():
    upward = [f"{m} → {i}" for m, imported in graph().items() for i in imported if _layer(i) > _layer(m)]
    assert upward == []


def test_the_data_side_never_imports_the_service():
    assert [f"{m} → {i}" for m, imported in graph().items() if m.startswith("raylm.data")
            for i in imported if i.startswith("raylm.serve")] == []


def test_the_contract_imports_only_the_error_tree():
    assert graph()["raylm.contract"] == {"raylm.errors"}


def test_there_is_no_import_circle():
    edges = graph()
    # A package's __init__ re-exporting its children is not a circle through the children.
    edges = {m: {i for i in imported if not m.startswith(i + ".") and not i.startswith(m + ".")}
             for m, imported in edges.items()}
    seen, stack, circles = set(), [], []

    def visit(module: str) -> None:
        if module in stack:
            circles.append(stack[stack.index(module):] + [module])
            return
        if module in seen:
            return
        seen.add(module)
        stack.append(module)
        for imported in sorted(edges.get(module, ())):
            visit(imported)
        stack.pop()

    for module in sorted(edges):
        visit(module)
    assert circles == []
