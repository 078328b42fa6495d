"""The package layout is the architecture (docs/ARCHITECTURE.md); these checks keep it so.
A module's layer is read from its path, never from a list of names:

    entry      jaxtrain/cli.py, jaxtrain/__main__.py, jaxtrain/commands/   may import anything
    tools      jaxtrain/tools/        may import any layer below
    core       jaxtrain/run/          never imports tools
    step       jaxtrain/step.py       the compiled boundary: only pure and base (no optional feature)
    interop    jaxtrain/huggingface/  (reading HF models, for init_from)  data, pure, base
    data       jaxtrain/data/         never imports tools or the training core
    pure       jaxtrain/model/, then jaxtrain/optim/ (PURE_ORDER): base, the pure folders up
               to their own, no cycle, no file reading (neither config/files.py nor I/O)
    base       jaxtrain/config/       only itself

A module in a folder this table does not know fails the test, as does a cycle of imports.
Read from the source with `ast` (nothing is imported), except one check that importing
the training loop loads no tool module, which catches an indirect import as well.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxtrain"
# The first part of a module's path under jaxtrain/ (a folder, or a top-level module's
# name) -> its layer.
FOLDERS = {"cli": "entry", "__main__": "entry", "commands": "entry", "tools": "tools", "run": "core",
           "step": "step", "huggingface": "interop", "data": "data", "model": "pure", "optim": "pure",
           "config": "base"}
# The pure folders in their fixed order: each may import base and the pure folders up to
# its own (the model reads the table and the mesh rules; the optimizer reads the table).
PURE_ORDER = ("model", "optim")
READER = "jaxtrain/config/files.py"  # the one module of base that reads files
IO_MODULES = {"io", "os", "pathlib", "shutil", "tempfile", "glob", "json", "yaml", "pickle", "urllib", "socket"}
# a layer's package __init__ holds its docstring and no import (no re-export, no shim);
# the command registry imports its command modules
INIT_MAY_IMPORT = {"jaxtrain/commands/__init__.py"}
MAX_LINES = 400
REPEAT_LINES = 6  # a block this long written twice is a helper waiting to be named

ALLOWED = {  # layer -> the layers it may import
    "entry": {"entry", "tools", "core", "step", "interop", "data", "pure", "base"},
    "tools": {"tools", "core", "step", "interop", "data", "pure", "base"},
    "core": {"core", "step", "interop", "data", "pure", "base"},
    "step": {"pure", "base"},
    "interop": {"interop", "data", "pure", "base"},
    "data": {"data", "base"},
    "pure": {"pure", "base"},
    "base": {"base"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _folder(name: str) -> str | None:
    """The first part of a module's path under jaxtrain/ (None for the package itself)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def _layer(name: str) -> str | None:
    """The layer of a module, from its path; None for a place the table does not know."""
    return FOLDERS.get(_folder(name) or "")


def _imports(source: str, known: dict[str, Path], importer: str = "jaxtrain") -> set[str]:
    """The jaxtrain modules a source imports (`from jaxtrain.model import x` counts as
    jaxtrain.model.x; a relative import is resolved against the importer's package)."""
    found = set()
    package = importer.split(".") if known.get(importer, Path()).name == "__init__.py" else importer.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            for alias in node.names:
                child = f"{module}.{alias.name}"
                found.add(child if child in known else module)
    return {name for name in found if name == "jaxtrain" or name.startswith("jaxtrain.")}


def _check_import(name: str, target: str, known: dict[str, Path]) -> str | None:
    """Why `name` may not import `target`, or None."""
    layer, target_layer = _layer(name), _layer(target)
    if target_layer not in ALLOWED[layer]:
        return f"{name} ({layer}) imports {target} ({target_layer})"
    if layer == "pure" and target_layer == "pure" and \
            PURE_ORDER.index(_folder(target)) > PURE_ORDER.index(_folder(name)):
        return f"{name} (pure: {_folder(name)}/) imports {target}: {_folder(target)}/ comes after it"
    if layer == "pure" and known.get(target) == PACKAGE.parent / READER:
        return f"{name} (pure) imports {target}, the file reader"
    return None


def _graph(extra_source: dict[str, str] | None = None) -> dict[str, set[str]]:
    """module -> the jaxtrain modules it imports; `extra_source` appends text to named
    modules (to show that a check sees a planted import)."""
    known = _modules()
    return {name: {t for t in _imports(path.read_text() + (extra_source or {}).get(name, ""), known, name)
                   if t not in ("jaxtrain", name)}
            for name, path in known.items()}


def _violations(extra_source: dict[str, str] | None = None) -> list[str]:
    """Every import that crosses the layers the wrong way."""
    known = _modules()
    return [why for name, targets in _graph(extra_source).items() if _layer(name)
            for target in sorted(targets) if _layer(target) and (why := _check_import(name, target, known))]


def _cycles(extra_source: dict[str, str] | None = None) -> list[list[str]]:
    """The import cycles among jaxtrain modules (each a strongly connected component of
    more than one module), imports inside functions included."""
    graph = _graph(extra_source)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _reads_files(source: str) -> list[str]:
    """The I/O a pure module's source does: standard I/O modules imported, open() called."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in IO_MODULES]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in IO_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            found.append("open()")
    return found


def test_every_module_sits_in_a_folder_with_a_layer():
    unknown = [f"{path.relative_to(PACKAGE.parent)}" for name, path in _modules().items()
               if name != "jaxtrain" and _layer(name) is None]
    assert not unknown, f"modules in no layer's folder (move them, or give the folder a layer in FOLDERS): {unknown}"
    assert _layer("jaxtrain.workdir") is None and _layer("jaxtrain.misc.helpers") is None  # not vacuous
    assert _layer("jaxtrain.run.workdir") == "core" and _layer("jaxtrain.optim.schedules") == "pure"


def test_each_layer_imports_only_the_layers_below_it():
    assert _violations() == []


def test_no_import_cycle():
    assert _cycles() == []


def test_pure_modules_read_no_file():
    modules = _modules()
    bad = {name: io for name, path in modules.items() if _layer(name) == "pure"
           if (io := _reads_files(path.read_text()))}
    assert not bad, f"pure modules doing I/O (it belongs to run/ or config/files.py): {bad}"


def test_layer_packages_hold_no_code():
    """A folder's __init__.py is its docstring: no re-export (the layout shows where a name
    lives) and nothing loaded by importing a sibling (`from jaxtrain.run import xla_flags`
    imports no JAX)."""
    bad = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.glob("*/__init__.py"))
           if str(p.relative_to(PACKAGE.parent)) not in INIT_MAY_IMPORT
           and any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(ast.parse(p.read_text())))]
    assert not bad, f"package __init__.py files with imports: {bad}"


def test_the_checkers_see_a_forbidden_import():
    """The rules are not vacuous: planted imports are reported."""
    planted_source = {"jaxtrain.run.loop": "\nfrom jaxtrain.tools import sweep\n",
                      "jaxtrain.model.transformer": "\nimport jaxtrain.data.pipeline\n",
                      "jaxtrain.step": "\nfrom jaxtrain.run import telemetry\n",
                      "jaxtrain.model.parametrization": "\nfrom jaxtrain.optim.optimizer import make_optimizer\n",
                      "jaxtrain.optim.schedules": "\nfrom jaxtrain.config.files import load_config\n",
                      "jaxtrain.data.mixture": "\nfrom ..tools import sweep\n",
                      "jaxtrain.config.errors": "\nfrom jaxtrain.step import TrainState\n"}
    planted = _violations(planted_source)
    assert "jaxtrain.run.loop (core) imports jaxtrain.tools.sweep (tools)" in planted
    assert "jaxtrain.model.transformer (pure) imports jaxtrain.data.pipeline (data)" in planted
    assert "jaxtrain.step (step) imports jaxtrain.run.telemetry (core)" in planted  # the compiled boundary
    assert any(v.startswith("jaxtrain.model.parametrization (pure: model/) imports jaxtrain.optim.optimizer")
               for v in planted)  # against the order of the pure folders
    assert "jaxtrain.optim.schedules (pure) imports jaxtrain.config.files, the file reader" in planted
    assert "jaxtrain.data.mixture (data) imports jaxtrain.tools.sweep (tools)" in planted  # a relative import
    assert "jaxtrain.config.errors (base) imports jaxtrain.step (step)" in planted
    assert any({"jaxtrain.model.parametrization", "jaxtrain.model.transformer"} <= set(cycle) for cycle in _cycles(
        {"jaxtrain.model.parametrization": "\ndef f():\n    from jaxtrain.model.transformer import Transformer\n"}))
    assert _reads_files("from pathlib import Path\nimport os.path\nopen('x')\n") == ["pathlib", "os.path", "open()"]


def test_importing_the_training_loop_loads_no_tool():
    code = ("import sys, jaxtrain.run.loop, jaxtrain.run.checkpoint, jaxtrain.run.evaluate\n"
            "print(sorted(m for m in sys.modules if m.startswith('jaxtrain.tools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_is_over_the_line_limit(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines (split it by concept)"


def _code_windows(path: Path):
    """Windows of REPEAT_LINES consecutive code lines (comments, blank lines, imports and
    docstring-only lines left out), with where each starts."""
    lines = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith(("#", "import ", "from ", '"""', "@")) or re.fullmatch(r"[\])}]+,?", text):
            continue
        lines.append((number, text))
    for i in range(len(lines) - REPEAT_LINES + 1):
        window = lines[i:i + REPEAT_LINES]
        yield "\n".join(t for _, t in window), window[0][0]


def test_no_block_of_code_is_written_twice():
    seen: dict[str, list[str]] = defaultdict(list)
    for name, path in _modules().items():
        for block, line in _code_windows(path):
            seen[block].append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    repeated = {block: where for block, where in seen.items() if len(where) > 1}
    assert not repeated, "\n\n".join(f"{' and '.join(w)}:\n{b}" for b, w in list(repeated.items())[:3])
