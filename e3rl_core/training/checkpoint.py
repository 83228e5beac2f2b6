"""A training run's directory: checkpoints written atomically, run status, resume.

    OUT/run.json                 status (running|finished|stopped|failed), model, data, config, step
                                 and the trainer's pid/host (a reader tells a killed run by it)
    OUT/log.jsonl                one row of metrics per step
    OUT/rollouts.jsonl           event traces of a few rollouts per step (``e3rl_core.events`` format)
    OUT/checkpoint-000050/       save_pretrained model + tokenizer (loads with plain transformers),
                                 e3rl_generation.json, trainer_state.pt (optimizer, scheduler, RNG,
                                 data position; tensors and plain values only, loaded with
                                 weights_only=True), trainer_state.json (the same, human-readable);
                                 with parallel=fsdp also sharded/ (torch.distributed.checkpoint:
                                 model + optimizer shards of every process; trainer_state.pt then
                                 holds each process's RNG and no optimizer)

A checkpoint is written under a temporary name, flushed to disk (fsync) and renamed when
complete, so a run killed mid-save (or a machine losing power) keeps the previous checkpoint; a
leftover temporary directory is ignored and cleaned. JSON state files are replaced the same way.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import E3RLError
from ..events import strict_dumps
from ..outdirs import is_run_record

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
STATE_FILE = "trainer_state.pt"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class RunDirError(E3RLError):
    """The output directory cannot be used as asked (holds another run, nothing to resume, ...)."""


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry list to disk (a rename is durable only once both the
    renamed data and its directory are)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files were synced
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            _fsync(p)
    _fsync(root)


def write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(strict_dumps(data, indent=2))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def read_run(out: Path) -> dict[str, Any] | None:
    """``out``'s run record, or None when it holds none: a ``run.json`` without a run's own fields
    (any JSON may have that name) is not a run, so nothing treats its folder as one."""
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path} is unreadable ({err}); delete it or choose another --out") from None
    return data if is_run_record(data) else None


@contextmanager
def writing(what: str, out: Path) -> Iterator[None]:
    """An OSError while writing ``what`` into the run directory (a full disk, a directory made
    read-only or moved away mid-run) says which file and what to do, in one line. It stays an
    OSError with its errno, so callers that catch OSError still do."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, (
            f"cannot write {what} in {out} ({err.strerror or err}); the checkpoints written so far are kept: "
            f"make the directory writable (or free space) and continue with --resume")) from None


def describe(err: BaseException) -> str:
    """An error's message; an OSError from ``writing`` without its "[Errno N]" prefix."""
    if isinstance(err, OSError) and err.strerror and err.filename is None:
        return err.strerror
    return str(err) or type(err).__name__


# ---------------------------------------------------------------- is the recorded process alive?
STALE_STATUS = "ended without a status (killed?)"


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc, Linux), or None where unknown;
    it tells a recycled PID from the process that wrote run.json."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name (field 2) may hold spaces and ")"
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def process_record() -> dict[str, Any]:
    """This process, as run.json records it for status readers: pid, host, start time."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _start_ticks(os.getpid())}


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` runs and is not a zombie (a killed child nobody reaped yet); with ``start``,
    also that it is the same process and not a later one given the same PID."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        return True  # no /proc: the signal check is all there is
    return start is None or _start_ticks(pid) in (None, start)


def live_status(run: dict[str, Any]) -> str:
    """run.json's status, except that a run recorded as running by a process of this host that is
    gone (SIGKILL, out of memory, power loss: no chance to write a status) reads as STALE_STATUS."""
    status = str(run.get("status"))
    pid = run.get("pid")
    if status != "running" or not isinstance(pid, int) or run.get("host") != socket.gethostname():
        return status  # another machine's process cannot be checked from here
    return status if process_alive(pid, run.get("pid_start")) else STALE_STATUS


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def refuse_live_run(out: Path, run: dict[str, Any], verb: str) -> None:
    """Raise when ``run`` (out's run.json) is being trained right now by another process of this host:
    a second trainer would interleave checkpoints and logs with it, and overwriting would delete its
    directory under it. Another host's process cannot be checked (``live_status``)."""
    pid = run.get("pid")
    if live_status(run) == "running" and pid != os.getpid():
        raise RunDirError(
            f"the run in {out} is still running (PID {pid}, step {run.get('step')}); stop it first "
            f"(Ctrl-C or `kill {pid}` ends it with a checkpoint), then {verb} it"
        )


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Check ``out`` against the request; returns the checkpoint to resume from (None = fresh run).
    A folder that holds anything but this project's run is never deleted (``outdirs``)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; name a folder (new, empty, or holding an e3rl run)")
    run = read_run(out) if out.is_dir() else None
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one")
    if run is not None and (resume or overwrite):
        refuse_live_run(out, run, "resume" if resume else "overwrite")
    if resume:
        if run is None:
            raise RunDirError(f"nothing to resume in {out}: it holds no run; drop --resume to start one")
        ckpts = checkpoints(out)
        if not ckpts:
            raise RunDirError(f"the run in {out} wrote no checkpoint yet; start it again with --overwrite")
        return ckpts[-1][1]
    if out.is_dir() and any(out.iterdir()):
        if run is None:
            raise RunDirError(
                f"{out} is not empty and holds no e3rl run; choose a new or empty --out (nothing was changed)"
            )
        if not overwrite:
            raise RunDirError(
                f"{out} holds another run ({live_status(run)}, step {run.get('step')} of {run.get('max_steps')}); "
                f"pass --resume to continue it, --overwrite to replace it, or choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def save_checkpoint(
    out: Path, step: int, model: Any, tokenizer: Any, state: dict[str, Any], extra_json: dict[str, Any],
    *, keep: int | None,
) -> Path:
    """Write checkpoint-<step> atomically and prune older ones beyond ``keep``."""
    return finish_checkpoint(out, step, start_checkpoint(out, step), model, tokenizer, state, extra_json, keep=keep)


def start_checkpoint(out: Path, step: int) -> Path:
    """The temporary directory checkpoint-<step> is written into (by several processes when sharded)."""
    return Path(tempfile.mkdtemp(dir=out, prefix=f".tmp-checkpoint-{step:06d}-"))


def finish_checkpoint(
    out: Path, step: int, tmp: Path, model: Any, tokenizer: Any, state: dict[str, Any], extra_json: dict[str, Any],
    *, keep: int | None, state_dict: dict[str, Any] | None = None,
) -> Path:
    """Add the model export, tokenizer and trainer state to ``tmp``, flush everything in it (shards
    written by other processes included) and rename it to checkpoint-<step>; prune beyond ``keep``.
    ``state_dict`` (a sharded run's consolidated weights) is exported in place of ``model``'s own."""
    final = out / f"checkpoint-{step:06d}"
    try:
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
        for name, data in extra_json.items():
            (tmp / name).write_text(strict_dumps(data, indent=2) + "\n")
        torch.save(state, tmp / STATE_FILE)
        _fsync_tree(tmp)
        if final.exists():  # a rerun of the same step (resume after a crash): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def clean_temporaries(out: Path) -> None:
    """Remove half-written checkpoints left by a killed run."""
    for p in out.glob(".tmp-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint. Loaded with ``weights_only=True``: the trainer writes only
    tensors and plain values (ints, floats, strings, lists, tuples, dicts), and a file that holds
    anything else is refused before any of it is built, so a tampered run directory cannot run code."""
    path = checkpoint / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise RunDirError(f"{path} is unreadable ({first_line(err)}); "
                              f"delete {checkpoint} to resume from the one before") from None
        raise RunDirError(
            f"refused to load {path}: it holds Python objects other than tensors and plain values, which could "
            f"run code (none was run); e3rl never writes such a file, so it was altered or comes from elsewhere. "
            f"Delete {checkpoint} to resume from the one before, or start a new run with --overwrite"
        ) from None
    except Exception as err:  # a corrupt file: say which and what to do
        raise RunDirError(
            f"{path} is unreadable ({first_line(err)}); delete {checkpoint} to resume from the one before"
        ) from None


def first_line(err: BaseException) -> str:
    """An error's first line (torch's load errors run to a dozen), for one-line messages."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def truncate_jsonl(path: Path, keep: Any) -> None:
    """Keep the lines for which ``keep(row)`` is true (drops steps logged after the resumed checkpoint)."""
    if not path.is_file():
        return
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if keep(row):
            lines.append(line)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(l + "\n" for l in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)
