"""The package layout is the architecture (docs/ARCHITECTURE.md); these checks keep it so.

    entry      cli.py, __main__.py, jaxtrain/commands/   may import anything
    tools      jaxtrain/tools/                         may import any layer below
    core       jaxtrain/*.py                           never imports tools
    step       train_step.py, the compiled boundary    only pure and base: no optional feature
    interop    jaxtrain/huggingface/ (reading HF models, for init_from)  data, pure, base
    data       jaxtrain/data/                          never imports tools or the training core
    pure       model, parametrization, optimizer, muon, schedules, sharding
               import config, errors and the pure modules PURE_IMPORTS names (no I/O, no
               loop, no tools, no cycle)
    base       config, config_file, errors, staging    import only each other

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
ENTRY = {"jaxtrain.cli", "jaxtrain.__main__"}  # and jaxtrain.commands.*
STEP = "jaxtrain.train_step"
# Each pure module and the pure modules it may import: the table (parametrization), the
# learning-rate schedule and the mesh rules stand alone; Muon's update reads the table; the
# model reads the table's forward scales and the mesh rules; the optimizer reads the table
# and Muon. Besides these, a pure module imports only PURE_BASE (no file reading).
PURE_IMPORTS = {
    "jaxtrain.parametrization": set(), "jaxtrain.schedules": set(), "jaxtrain.sharding": set(),
    "jaxtrain.muon": {"jaxtrain.parametrization"},
    "jaxtrain.model": {"jaxtrain.parametrization", "jaxtrain.sharding"},
    "jaxtrain.optimizer": {"jaxtrain.parametrization", "jaxtrain.muon"},
}
PURE_BASE = {"jaxtrain.config", "jaxtrain.errors"}
BASE = {"jaxtrain.config", "jaxtrain.config_file", "jaxtrain.errors", "jaxtrain.staging"}
MAX_LINES = 400
REPEAT_LINES = 6  # a block this long written twice is a helper waiting to be named


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(source: str, known: dict[str, Path], importer: str = "jaxtrain") -> set[str]:
    """The jaxtrain modules a source imports (`from jaxtrain import x` counts as jaxtrain.x;
    a relative import is resolved against the importer's package)."""
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


def _layer(name: str) -> str:
    if name in ENTRY or name.startswith("jaxtrain.commands"):
        return "entry"
    if name.startswith("jaxtrain.tools"):
        return "tools"
    if name == STEP:
        return "step"
    if name.startswith("jaxtrain.huggingface"):
        return "interop"
    if name.startswith("jaxtrain.data"):
        return "data"
    if name in BASE:
        return "base"
    return "pure" if name in PURE_IMPORTS else "core"


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


def _violations(extra_source: dict[str, str] | None = None) -> list[str]:
    """Every import that crosses the layers the wrong way; `extra_source` appends text to
    named modules (to show that the checker sees a planted import)."""
    bad, known = [], _modules()
    for name, path in known.items():
        source = path.read_text() + (extra_source or {}).get(name, "")
        for target in sorted(_imports(source, known, name)):
            layer = _layer(target)
            if target == "jaxtrain" or target == name:
                continue
            if layer not in ALLOWED[_layer(name)]:
                bad.append(f"{name} ({_layer(name)}) imports {target} ({layer})")
            elif name in PURE_IMPORTS and target not in PURE_IMPORTS[name] | PURE_BASE:
                bad.append(f"{name} (pure) imports {target}, not in its PURE_IMPORTS or {sorted(PURE_BASE)}")
    return bad


def test_each_layer_imports_only_the_layers_below_it():
    assert _violations() == []


def test_the_checker_sees_a_forbidden_import():
    """The rule is not vacuous: a core module importing a tool, a pure one importing the
    data pipeline, are reported."""
    planted = _violations({"jaxtrain.train": "\nfrom jaxtrain.tools import sweep\n",
                           "jaxtrain.model": "\nimport jaxtrain.data.pipeline\n",
                           "jaxtrain.train_step": "\nfrom jaxtrain import telemetry\n",
                           "jaxtrain.parametrization": "\nfrom jaxtrain.optimizer import make_optimizer\n",
                           "jaxtrain.schedules": "\nfrom jaxtrain.config_file import load_config\n",
                           "jaxtrain.data.mixture": "\nfrom ..tools import sweep\n"})
    assert "jaxtrain.train (core) imports jaxtrain.tools.sweep (tools)" in planted
    assert "jaxtrain.model (pure) imports jaxtrain.data.pipeline (data)" in planted
    assert "jaxtrain.train_step (step) imports jaxtrain.telemetry (core)" in planted  # the compiled boundary
    assert any(v.startswith("jaxtrain.parametrization (pure) imports jaxtrain.optimizer") for v in planted)
    assert any(v.startswith("jaxtrain.schedules (pure) imports jaxtrain.config_file") for v in planted)
    assert "jaxtrain.data.mixture (data) imports jaxtrain.tools.sweep (tools)" in planted  # a relative import


def test_importing_the_training_loop_loads_no_tool():
    code = ("import sys, jaxtrain.train, jaxtrain.checkpoint, jaxtrain.evaluate\n"
            "print(sorted(m for m in sys.modules if m.startswith('jaxtrain.tools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
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
