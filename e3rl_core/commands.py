"""``e3rl`` command lines for subprocesses: what the app's Train tab and decision-effect jobs and
the reproduction launch. Here, below both the command line (``cli/``) and its callers, so that the
library and the app build a command without importing the parser's package."""
from __future__ import annotations

import os
import sys
from typing import Sequence


def e3rl_command(*args: str) -> list[str]:
    """``e3rl ARGS`` as a subprocess command line: through ``python -m`` with this interpreter, so it
    needs no console script on PATH and runs in the same environment."""
    return [sys.executable, "-m", "e3rl_core.cli", *args]


def train_command(*, out: str | os.PathLike[str], model: str | None = None, data: str | None = None,
                  algo: str | None = None, steps: int | None = None, group_size: int | None = None,
                  prompts_per_step: int | None = None, learning_rate: float | None = None, seed: int | None = None,
                  token_budget: int | None = None, erase_budget: int | None = None, save_steps: int | None = None,
                  eval_data: str | None = None, eval_samples: int | None = None, overrides: Sequence[str] = (), device: str | None = None, quiet: bool = False,
                  overwrite: bool = False, resume: bool = False) -> list[str]:
    """The ``e3rl train`` command line for a subprocess (the app's Train tab, the reproduction), from
    named settings: a setting left None is left out (the preset's default), ``overrides`` become
    ``--set`` items. The one place outside ``cli/train.py``'s parser that knows its flags
    (tests/test_cli.py checks that the parser takes every one)."""
    named = {"model": model, "data": data, "algo": algo, "out": out, "steps": steps, "group_size": group_size,
             "prompts_per_step": prompts_per_step, "learning_rate": learning_rate, "seed": seed,
             "token_budget": token_budget, "erase_budget": erase_budget, "save_steps": save_steps,
             "eval_data": eval_data, "eval_samples": eval_samples, "device": device}
    cmd = e3rl_command("train")
    for name, value in named.items():
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    cmd += [flag for flag, on in (("--quiet", quiet), ("--overwrite", overwrite), ("--resume", resume)) if on]
    for item in overrides:
        cmd += ["--set", item]
    return cmd
