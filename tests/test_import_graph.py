"""The backend's import graph, read with ``ast`` (imports inside functions included): it has no cycle, and no
module imports a higher layer than its own (the layers are the ``layer N`` lines of docs/architecture.md).
Also: no backend function is longer than ~100 lines."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stag4d_backend"
MAX_FUNCTION_LINES = 100
# Longer for a reason written here; each entry is a debt to pay, not a licence.
LONG_FUNCTIONS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # "from pkg import sub" imports the submodule; "from pkg import name" the module pkg
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            for t in targets:
                if not t.startswith("stag4d_backend"):
                    continue
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != name and t in mods:
                    deps.add(t)
        graph[name] = deps
    return graph


def _layers() -> list[tuple[int, list[str]]]:
    text = (REPO / "docs" / "architecture.md").read_text()
    layers = []
    for m in re.finditer(r"^layer (\d+)\s+[^:]*:\s*(.+)$", text, re.M):
        layers.append((int(m.group(1)), [n.strip() for n in m.group(2).split(",") if n.strip()]))
    return layers


def layer_of(module: str, layers) -> int | None:
    """The layer of the longest listed prefix (``server`` covers ``server.app``; ``stag4d_backend`` is the
    package's own __init__)."""
    short = module.removeprefix("stag4d_backend.") if module != "stag4d_backend" else "stag4d_backend"
    best = None
    for level, names in layers:
        for n in names:
            if short == n or short.startswith(n + "."):
                if best is None or len(n) > len(best[1]):
                    best = (level, n)
    return best[0] if best else None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_module_has_a_layer_and_imports_none_above_it():
    layers = _layers()
    assert len(layers) >= 5, "docs/architecture.md lists the layers as 'layer N  name: modules' lines"
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m, layers) is None)
    assert not unplaced, f"modules in no layer of docs/architecture.md: {unplaced}"
    upward = [(m, d) for m, deps in graph.items() for d in deps if layer_of(d, layers) > layer_of(m, layers)]
    assert not upward, "imports of a higher layer: " + ", ".join(f"{m} -> {d}" for m, d in sorted(upward))


def test_the_graph_sees_lazy_imports_and_the_layers_bite():
    graph = import_graph()
    assert "stag4d_backend.stages.fit" in graph["stag4d_backend.pipeline"]  # imported inside a method
    assert "stag4d_backend.job" in graph["stag4d_backend.server.worker"]
    layers = _layers()
    assert layer_of("stag4d_backend.server.app", layers) > layer_of("stag4d_backend.pipeline", layers) \
        > layer_of("stag4d_backend.stages.bake", layers) > layer_of("stag4d_backend.export.frames", layers) \
        > layer_of("stag4d_backend.render.rasterize", layers) > layer_of("stag4d_backend.atomic", layers)


def test_no_backend_function_is_over_100_lines():
    long = []
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS:
                    long.append(f"{rel}:{node.name} ({n} lines)")
    assert not long, "functions over 100 lines: " + ", ".join(sorted(long))
