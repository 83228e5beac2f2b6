"""``e3rl app ...``: hands the rest of the command line to the Gradio workbench (``app.main``)."""
from __future__ import annotations

import argparse
import importlib
from typing import Any

from ..errors import E3RLError


def add_parser(sub: Any) -> None:
    # No flags of its own, not even --help: every argument after "app" is the workbench's
    # (``main`` passes them through), so ``e3rl app --help`` shows the workbench's flags.
    p = sub.add_parser("app", help="the Gradio workbench in a browser (e3rl app --help)", add_help=False)
    p.set_defaults(func=cmd_app, passthrough=True)


def cmd_app(args: argparse.Namespace) -> int:
    # Looked up by name, and only when asked for: the core never imports the app layer or gradio
    # (tests/test_architecture.py reads every core file's imports), so generate, eval and train
    # start without loading a web framework, and run where it is not installed.
    try:
        workbench = importlib.import_module("app.main")
    except ModuleNotFoundError as err:
        raise E3RLError(f"e3rl app needs the workbench and gradio ({err}); install the project with "
                        f"pip install -e . from its checkout") from None
    return workbench.main(list(args.forwarded))
