"""The one rule every command that writes a folder follows: it never deletes what it did not write.

An output folder may be absent or empty; or it may hold what this project wrote there before, told
by that output's own fields (a run's ``run.json`` with a run's fields, a demo model's
``train_log.json``), never by a file name alone; and only with ``--overwrite`` is that replaced.
Anything else (a user's files, a JSON that happens to be called ``run.json``) is refused in one
line, with nothing changed. ``~`` is expanded; an ``--out`` naming a file is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .errors import E3RLError


class OutDirError(E3RLError):
    """An output folder the command may not write into or replace."""


RUN_STATUSES = ("running", "finished", "stopped", "failed")


def resolve_out(out: str | Path) -> Path:
    """``out`` with ``~`` expanded (never a folder literally named ``~``)."""
    text = str(out)
    if not text.strip():
        raise OutDirError("--out is empty; name the folder to write")
    return Path(text).expanduser()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_run_record(data: Any) -> bool:
    """Whether ``data`` (a parsed ``run.json``) is a training run's record: a run's status and its
    step counts, typed (the trainer writes its model, data and config beside them)."""
    return (isinstance(data, dict) and data.get("status") in RUN_STATUSES
            and type(data.get("step")) is int and type(data.get("max_steps")) is int)


def is_demo_model(folder: Path) -> bool:
    """Whether ``folder`` holds a model ``e3rl train-demo-model`` wrote (its ``train_log.json``)."""
    log = read_json(folder / "train_log.json")
    return (isinstance(log, dict) and {"steps", "params", "tokens", "seconds"} <= set(log)
            and (folder / "config.json").is_file())


def check_out_dir(out: Path, *, what: str, ours: Callable[[Path], bool], overwrite: bool) -> bool:
    """Whether ``out`` (resolved) may be written: True when it holds this command's earlier output
    that ``overwrite`` lets it replace, False when it is absent or empty; ``OutDirError`` otherwise,
    changing nothing."""
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file; name a folder (new, empty, or holding {what})")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not ours(out):
        raise OutDirError(f"{out} is not empty and is not {what}; choose a new or empty --out "
                          f"(nothing was changed)")
    if not overwrite:
        raise OutDirError(f"{out} holds {what} already; pass --overwrite to replace it, or choose another --out")
    return True
