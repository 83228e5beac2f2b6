"""House rules that keep the data flow one way: the core never knows the UI, and the engine knows
neither training, tasks nor evaluation (see ARCHITECTURE: prompt -> generation -> events -> ...)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "e3rl_core"


def _imports(path: Path, source: str | None = None) -> list[str]:
    """Absolute module names imported by a core file (relative imports resolved)."""
    package = ["e3rl_core", *path.relative_to(CORE).parent.parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package[: len(package) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            # "from e3rl_core import training" imports a subpackage: count it by name
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def test_core_source_never_imports_gradio_or_app():
    offenders = [f"{p.relative_to(CORE)}: {n}" for p in CORE.rglob("*.py") for n in _imports(p)
                 if n.split(".")[0] in ("gradio", "app")]
    assert not offenders


def test_generation_imports_neither_training_tasks_nor_evaluation():
    banned = ("e3rl_core.training", "e3rl_core.tasks", "e3rl_core.evaluation", "e3rl_core.cli")
    offenders = [f"{p.relative_to(CORE)}: {n}" for p in (CORE / "generation").rglob("*.py") for n in _imports(p)
                 if n.startswith(banned)]
    assert not offenders


def test_the_rule_sees_relative_imports():
    # The rule above must be able to fail: relative imports are resolved to the module they name.
    probe = CORE / "generation" / "probe.py"
    assert "e3rl_core.tasks.rewards" in _imports(probe, "from ..tasks.rewards import extract_answer\n")
    assert "e3rl_core.training" in _imports(probe, "from .. import training\n")
    assert "e3rl_core.generation.signals" in _imports(probe, "from .signals import log_probs\n")


def test_importing_every_core_module_loads_no_ui():
    modules = sorted(".".join(p.relative_to(CORE).with_suffix("").parts) for p in CORE.rglob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('e3rl_core.' + m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('gradio', 'app')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CORE.parent)


def test_only_entry_points_import_the_command_line():
    """The library and the app build subprocess command lines with ``e3rl_core.commands`` and take the
    device flags from ``e3rl_core.devices``: nothing below the command line reaches up into ``cli/``."""
    app = CORE.parent / "app"
    offenders = [f"{p.relative_to(CORE.parent)}: {n}" for p in [*CORE.rglob("*.py"), *app.rglob("*.py")]
                 if "cli" not in p.relative_to(CORE.parent).parts[:2] for n in _imports_any(p)
                 if n.startswith("e3rl_core.cli")]
    assert not offenders


def _imports_any(path: Path) -> list[str]:
    return _imports(path) if CORE in path.parents else _imports_outside(path)


def _imports_outside(path: Path) -> list[str]:
    """Absolute imports of a file outside the core (the app imports the core by absolute name)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_core_modules_import_no_cycle():
    """No two core modules import each other, directly or through others (module-level imports and
    those inside functions alike: a cycle is a tangle whether or not Python resolves it)."""
    modules = {".".join(["e3rl_core", *p.relative_to(CORE).with_suffix("").parts]).removesuffix(".__init__"): p
               for p in CORE.rglob("*.py")}
    graph = {m: {n for n in _imports(p) if n in modules and n != m and not m.startswith(n + ".")
                 and not n.startswith(m + ".")} for m, p in modules.items()}
    # packages' __init__ re-exports aside, follow edges looking for a way back
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, cycles[:5]


def test_functions_in_the_app_stay_short():
    """The house rule: no function in ``app/`` longer than 120 lines (a tab's builder lays out and
    wires; what its handlers compute lives in gradio-free modules)."""
    app = CORE.parent / "app"
    long = [f"{p.relative_to(CORE.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in app.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 120]
    assert not long
