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
