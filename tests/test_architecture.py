"""The shape of the house, checked: no import cycles between the package's modules (function-level
imports included: a lazy import is still a cycle), the weight math imports only torch,
safetensors and the standard library, no module imports (or reads off an imported module) another
module's private names, settings are read only in config.py, and services type their sessions."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

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
    # numpy for byte-level views, zstandard as the lossless codec's entropy coder (weights/packing.py),
    # numba for the compiled CPU kernels (weights/kernels.py: RMM fit, merge thresholds)
    allowed = {"torch", "safetensors", "numpy", "zstandard", "numba"} | set(sys.stdlib_module_names)
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


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_reaches(module: str) -> list[tuple[str, str, str]]:
    """(module, other module, name) for every private name of another package module that
    ``module`` imports (``from x import _y``) or reads off a module it imported (``x._y``)."""
    path = MODULES[module]
    found = [(module, t, n) for t, names in _imports(module) if t in MODULES and t != module
             for n in names if _private(n)]
    bound: dict[str, str] = {}  # local name -> the package module it stands for
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES and a.asname:
                    bound[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:
                    bound[a.asname or a.name] = f"{target}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain = ast.unparse(node.value)
            target = bound.get(chain, chain if chain in MODULES else "")
            if target and target != module:
                found.append((module, target, node.attr))
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [r for m in MODULES for r in _private_reaches(m)]
    assert bad == []


def test_the_private_name_check_sees_imports_and_attributes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from .transfer import _Engine, TransferReport\n"
                     "from . import checkpoint\n"
                     "import registry.weights.rmm as r\n"
                     "x = checkpoint._json_str, r._eigh, checkpoint.safetensors_layout\n")
    monkeypatch.setitem(MODULES, "registry.weights.probe", probe)
    assert sorted(_private_reaches("registry.weights.probe")) == [
        ("registry.weights.probe", "registry.weights.checkpoint", "_json_str"),
        ("registry.weights.probe", "registry.weights.rmm", "_eigh"),
        ("registry.weights.probe", "registry.weights.transfer", "_Engine"),
    ]


def test_services_type_their_sessions() -> None:
    """A service function that takes a database session (``s`` or ``session``) says so: ``Session``."""
    untyped = []
    for m, path in MODULES.items():
        if not m.startswith(("registry.services", "registry.api")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                untyped += [f"{m}:{node.lineno} {node.name}({a.arg})" for a in args
                            if a.arg in ("s", "session") and (a.annotation is None or
                                                              ast.unparse(a.annotation) != "Session")]
    assert untyped == []


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
