"""The shape of the house, checked: no import cycles between the package's modules (function-level
imports included: a lazy import is still a cycle), the weight math imports only torch,
safetensors and the standard library, and no module imports another module's private names."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "registry"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import statement anywhere in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found += [(m, []) for m in submodules]
            found.append((target, [n for n in names if f"{target}.{n}" not in MODULES]))
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = _graph()
    # packages import their submodules freely; a cycle through a package __init__ is not one
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_weights_import_only_torch_safetensors_and_the_standard_library() -> None:
    allowed = {"torch", "safetensors", "numpy", "zstandard"} | set(sys.stdlib_module_names)
    bad = []
    for m in MODULES:
        if not m.startswith("registry.weights"):
            continue
        for target, _ in _imports(m):
            top = target.split(".")[0]
            outside = target.startswith("registry.") and not target.startswith("registry.weights")
            foreign = not target.startswith("registry") and top not in allowed | {"__future__"}
            if outside or foreign:
                bad.append((m, target))
    assert bad == []


def test_no_module_imports_another_modules_private_names() -> None:
    bad = []
    for m in MODULES:
        for target, names in _imports(m):
            if target in MODULES and target != m:
                bad += [(m, target, n) for n in names if n.startswith("_") and not n.startswith("__")]
    # inside the weight math the streaming transfer shares the batch transfer's engine (one
    # algorithm in two modules); everything else goes through public names
    bad = [b for b in bad if (b[0], b[1]) != ("registry.weights.transfer_stream", "registry.weights.transfer")]
    assert bad == []


def test_settings_are_read_only_in_config() -> None:
    """No module but ``registry/config.py`` reads an environment variable (a child process may be
    handed the environment as a whole, as ``registry up`` does)."""
    readers = []
    for m, path in MODULES.items():
        if m == "registry.config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            call = node.func if isinstance(node, ast.Call) else None
            name = ast.unparse(call) if call is not None else ""
            sub = ast.unparse(node.value) if isinstance(node, ast.Subscript) else ""
            if name in ("os.getenv", "os.environ.get", "getenv") or sub == "os.environ":
                readers.append((m, node.lineno))
    assert readers == []


def test_code_and_docs_stand_on_their_own() -> None:
    """Nothing cites a document outside the repository (design notes kept elsewhere)."""
    cited = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "bench").rglob("*.py"), ROOT / "README.md"]:
        text = path.read_text()
        cited += [f"{path.relative_to(ROOT)}: {w}" for w in ("SPECS", "DESIGN.md", "../shared") if w in text]
    assert cited == []
