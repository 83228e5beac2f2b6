"""The ``e3rl`` command line. Argument parsing lives here only; the library returns values.

    e3rl generate --model PATH --prompt TEXT [options]     erasable generation, prints completions (generate.py)
    e3rl eval --model PATH --data SPEC [options]           Avg@K / Pass@k with or without erasure (eval.py)
    e3rl audit TRACE --effects --out DIR                  the measured effect of every decision (audit.py)
    e3rl train --model PATH --data SPEC --algo e3rl --out DIR   RL training (train.py)
    e3rl bench generate [--model PATH]                     speed/memory table of the engine (bench.py)
    e3rl train-demo-model --out DIR                        the small demo model (demo.py)
    e3rl app [--host H] [--port N] [--model PATH]          the Gradio workbench (app.py hands off to app/main.py)

Each subcommand is a module with ``add_parser(sub)`` and its handler; they are imported when the
parser is built, and each imports torch and the rest of the library inside its handler, so
``e3rl --help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from ..commands import e3rl_command  # noqa: F401  (scripts and tests import it from here)
from ..errors import E3RLError

SUBCOMMANDS = ("generate", "demo", "eval", "audit", "app", "train", "bench")  # modules of this package, in --help order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e3rl", description="E3RL workbench: erasable generation and training")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


class _Stderr(logging.Handler):
    """Log lines on whatever ``sys.stderr`` is at the time (a captured stream in tests too)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"[e3rl] {record.getMessage()}", file=sys.stderr)


def _say_which_data_files() -> None:
    """A dataset SPEC naming a folder says which files it read (``tasks.datasets`` logs them)."""
    log = logging.getLogger("e3rl_core.tasks.datasets")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
        log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    _say_which_data_files()
    parser = build_parser()
    # Known args only: ``e3rl app`` passes what follows it to the workbench's own parser; for every
    # other subcommand an unknown argument is the usual argparse error.
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.forwarded = rest
    try:
        return args.func(args)
    except E3RLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
