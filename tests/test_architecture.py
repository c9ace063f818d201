"""The package's layout holds: dependencies flow one way between its rooms, no import circle, no
module imports the package root, and no file grows past what reads in one sitting. Read from the
source (every import, lazy ones included), so nothing here needs JAX."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dzjax"
# Which rooms each room may import (errors, paths and jsonsafe are leaves everyone may use).
ALLOWED = {
    "errors": set(),
    "paths": set(),
    "jsonsafe": set(),
    "pallas_kernels": set(),
    "models": {"pallas_kernels"},
    "compress": {"models", "pallas_kernels"},
    "serving": {"models", "compress"},  # compress: the delta file format, to read deltas
    "bench": {"serving", "models", "compress", "pallas_kernels"},
    "demo": {"bench", "serving", "models", "compress"},
    "cli": {"demo", "bench", "serving", "models", "compress", "pallas_kernels"},
    "data": set(),
}
LEAVES = {"errors", "paths", "jsonsafe", "version"}
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, name: str) -> set[str]:
    """The dzjax modules a file imports (resolved to modules that exist; `from a import b` counts
    a.b when it is a module, else a)."""
    known = modules()
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dzjax"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.split(".")[0] != "dzjax":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dzjax"


def test_no_module_imports_the_package_root():
    for name, path in modules().items():
        if name == "dzjax":
            continue
        assert "dzjax" not in imports(path, name), f"{path} imports the package root"
        if name in ("dzjax.cli", "dzjax.demo"):  # the applications may use the public API
            continue
        for node in ast.walk(ast.parse(path.read_text())):  # not even for a leaf module
            assert not (isinstance(node, ast.ImportFrom) and node.module == "dzjax"
                        and not node.level), f"{path}: `from dzjax import ...` (import dzjax.x)"


def test_rooms_depend_only_on_the_rooms_below():
    for name, path in modules().items():
        if name == "dzjax":
            continue
        mine = room(name)
        for imported in imports(path, name):
            theirs = room(imported)
            assert theirs == mine or theirs in LEAVES or theirs in ALLOWED[mine], (
                f"{path} ({mine}) imports {imported} ({theirs})")


def test_no_import_circle():
    graph = {name: {m for m in imports(path, name) if m != "dzjax"}
             for name, path in modules().items()}
    # A package's __init__ re-exporting its own modules is not a circle of theirs.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (graph.get(m) is not None and
                                                      name.startswith(m + "."))}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_no_file_grows_past_one_sitting():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
    """The checks above can fail: an import inside a function is seen."""
    source = PACKAGE / "models" / "forward.py"
    fake = tmp_path / "forward.py"
    fake.write_text(source.read_text() + "\n\ndef late():\n    from dzjax.serving import server\n")
    assert "dzjax.serving.server" in imports(fake, "dzjax.models.forward")
