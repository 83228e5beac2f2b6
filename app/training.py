"""Background training for the Train tab: one ``e3rl train`` subprocess at a time.

The run is a separate process (its own session), so it survives page reloads and closed tabs; the
UI only reads its run directory (``run.json``, ``log.jsonl``, ``rollouts.jsonl``, checkpoints).
Stop sends SIGTERM, which the trainer turns into "finish this step, write a checkpoint, status
stopped". A lock file holding the PID keeps it to one run per runs directory.
"""
from __future__ import annotations

import html
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e3rl_core.commands import train_command
from e3rl_core.errors import E3RLError
from e3rl_core.events import json_number
from e3rl_core.training import held_out
from e3rl_core.training.checkpoint import LOG_FILE, RUN_FILE, STALE_STATUS, checkpoints, live_status

LOCK = "active-run.json"
STOPPING = "stopping: the current step finishes and a checkpoint is written"


EVAL_PROBLEMS = 100
"""Held-out test problems scored before and after a run by default: Avg@4 on 200 took the shipped
model 26-27 s on one CPU thread, so about 13 s each here."""


@dataclass
class RunRequest:
    """One training run as the Train tab asks for it; the field defaults are the tab's starting values."""

    model: str
    # The reproduction's regime (docs/results/regime-sweep-table.md: GRPO, 16 prompts x G = 8, lr 1e-4),
    # the one found to raise held-out accuracy (E3RL with these settings did not; see the README),
    # cut to 40 steps: 8.3 s per step was measured for these settings on one CPU thread beside another
    # run, so about 5.5 minutes plus the two held-out evaluations.
    algo: str = "grpo"
    steps: int = 40
    group_size: int = 8
    prompts_per_step: int = 16
    learning_rate: float = 1e-4
    seed: int = 0
    data: str = "synthetic:train?n=4000&seed=1"
    save_steps: int = 10
    eval_data: str | None = f"synthetic:test?n={EVAL_PROBLEMS}"
    """Held-out problems scored before the first step and after the last (None: no evaluation)."""
    eval_samples: int = 4


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a finished child that nobody reaped is a zombie: not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


MAX_RUNS_KEPT = 20
"""Run folders kept under a deployment's runs root with visitors kept apart (a Space): past it the
oldest finished runs are removed when a new one starts."""


class TrainingManager:
    """Start, watch and stop one background run under ``root``.

    ``visitors_apart`` (a Space): each run belongs to the browser session that started it; only that
    visitor sees its settings and can stop it, another visitor is told the slot is taken and to wait,
    the slot is released when its visitor leaves, and at most ``MAX_RUNS_KEPT`` runs stay on disk."""

    def __init__(self, root: str | os.PathLike[str], max_steps: int | None = None, offline: bool = False,
                 device: str = "cpu", visitors_apart: bool = False) -> None:
        """offline: the run never reaches the network (HF_HUB_OFFLINE for its process; a Space);
        device: where the run trains (the app's --device, so a GPU app trains on its GPU)."""
        self.root = Path(root)
        self.device = device
        self.max_steps = max_steps
        self.offline = offline
        self.visitors_apart = visitors_apart
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # two clicks at once in this server

    def active(self) -> dict[str, Any] | None:
        """The running run's lock record, or None (a stale lock of a dead process is removed)."""
        lock = self.root / LOCK
        if not lock.is_file():
            return None
        try:
            info = json.loads(lock.read_text())
        except (OSError, json.JSONDecodeError):
            try:
                fresh = time.time() - lock.stat().st_mtime < 30
            except OSError:
                return None
            if fresh:  # created a moment ago, its record not yet written: a run is starting
                return {"pid": None, "out": None, "starting": True}
            lock.unlink(missing_ok=True)
            return None
        if info.get("pid") is None:
            return info
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if not _alive(int(info.get("pid", -1))):
            lock.unlink(missing_ok=True)
            return None
        return info

    def start(self, req: RunRequest, owner: str | None = None) -> Path:
        with self._lock:
            return self._start(req, owner)

    def _busy(self, owner: str | None) -> E3RLError:
        if self.visitors_apart:
            info = self.active() or {}
            if info.get("owner") != owner:
                return E3RLError("another visitor's training run holds this Space's one run slot; try again when "
                                 "it has finished")
        return E3RLError("a training run is already in progress; stop it or wait for it to finish")

    def _start(self, req: RunRequest, owner: str | None = None) -> Path:
        if self.active():
            raise self._busy(owner)
        if self.max_steps is not None and req.steps > self.max_steps:
            raise E3RLError(f"this deployment allows at most {self.max_steps} steps per run; lower the steps")
        if req.group_size < 2:
            raise E3RLError("group size must be at least 2 for group-relative advantages")
        self.root.mkdir(parents=True, exist_ok=True)
        try:  # the lock file is created exclusively: another server process cannot start a second run
            fd = os.open(self.root / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise self._busy(owner) from None
        out = self.root / f"{req.algo}-{time.strftime('%Y%m%d-%H%M%S')}-s{req.seed}"
        if self.visitors_apart:
            self._prune()
            _owner_file(out).write_text(owner or "")
        cmd = train_command(model=req.model, data=req.data, algo=req.algo, out=out, steps=req.steps,
                            group_size=req.group_size, prompts_per_step=req.prompts_per_step,
                            learning_rate=req.learning_rate, seed=req.seed, save_steps=req.save_steps,
                            eval_data=req.eval_data, eval_samples=req.eval_samples if req.eval_data else None,
                            quiet=True, device=self.device)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **({"HF_HUB_OFFLINE": "1"} if self.offline else {})}
        try:
            with open(_console(out), "w") as log:  # beside the run: the trainer wants an empty --out
                self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                              env=env)
        except BaseException:
            os.close(fd)
            (self.root / LOCK).unlink(missing_ok=True)
            raise
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": self._proc.pid, "out": str(out), "started": time.time(),
                                "request": req.__dict__, "owner": owner}))
        return out

    def owns(self, info: dict[str, Any] | None, owner: str | None) -> bool:
        """Whether the visitor ``owner`` may see and stop the run of lock record ``info``."""
        return not self.visitors_apart or (info or {}).get("owner") == owner

    def release(self, owner: str | None) -> None:
        """The visitor left: their running run is stopped, so the slot is free for the next one."""
        info = self.active()
        if self.visitors_apart and info and info.get("owner") == owner and info.get("pid"):
            self.stop(owner)

    def stop(self, owner: str | None = None) -> str:
        """Ask the running run to stop (SIGTERM): it finishes its step and writes a checkpoint. The
        request is recorded in the lock, so every page (a reloaded one too) says "stopping" until
        the process has ended. With visitors kept apart, only the run's own visitor can stop it."""
        info = self.active()
        if not info:
            return "no run in progress"
        if not self.owns(info, owner):
            return "the run in progress is another visitor's; only they can stop it"
        if info.get("pid") is None:
            return "a run is starting; press Stop again in a moment"
        os.kill(int(info["pid"]), signal.SIGTERM)
        lock = self.root / LOCK
        tmp = lock.with_name(f".{LOCK}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:  # replaced in one rename: a reader sees the old record or the new, never half of one
            tmp.write_text(json.dumps({**info, "stop_requested": time.time()}))
            os.replace(tmp, lock)
        except OSError:
            tmp.unlink(missing_ok=True)  # the stop was sent all the same; only the note is missing
        return STOPPING

    def clamp_steps(self, steps: int) -> tuple[int, str]:
        """``steps`` within this deployment's bound, and a note saying so when it was lowered."""
        if self.max_steps is not None and steps > self.max_steps:
            return self.max_steps, (f"steps lowered from {steps} to {self.max_steps}, the most this deployment "
                                    f"trains per run")
        return steps, ""

    def runs(self, owner: str | None = None) -> list[Path]:
        """Run directories under root, newest first (with visitors kept apart: ``owner``'s only)."""
        if not self.root.is_dir():
            return []
        found = {p for p in self.root.iterdir() if p.is_dir() and (p / RUN_FILE).is_file()}
        found |= {self.root / p.name[: -len(".console.log")] for p in self.root.glob("*.console.log")}
        if self.visitors_apart:
            found = {p for p in found if _read_owner(p) == (owner or "")}
        return sorted(found, key=lambda p: _console(p).stat().st_mtime if _console(p).exists() else 0, reverse=True)

    def _prune(self) -> None:
        """Remove the oldest runs past ``MAX_RUNS_KEPT`` (never the running one); only folders this
        manager made (each has its console log beside it)."""
        every = sorted((self.root / p.name[: -len(".console.log")] for p in self.root.glob("*.console.log")),
                       key=lambda p: _console(p).stat().st_mtime)
        active = (self.active() or {}).get("out")
        for run in every[: max(0, len(every) - MAX_RUNS_KEPT + 1)]:
            if str(run) != active:
                shutil.rmtree(run, ignore_errors=True)
                for extra in (_console(run), _owner_file(run)):
                    extra.unlink(missing_ok=True)

    def checkpoints(self) -> list[Path]:
        """Every checkpoint of every run (for the Generate tab's model picker), newest first."""
        return [c for run in self.runs() for _, c in reversed(checkpoints(run))]


def latest_trace_events(run: Path, max_bytes: int = 256 * 1024) -> list:
    """The events of the newest complete-enough trace in rollouts.jsonl, reading only the file's tail
    (the file grows every step; the Train tab polls it)."""
    from e3rl_core.events import event_from_dict

    path = run / "rollouts.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            chunk = f.read().decode("utf-8", errors="ignore")
    except OSError:
        return []
    events = []
    for line in chunk.splitlines()[1 if size > max_bytes else 0:]:  # the first line may be cut
        try:
            events.append(event_from_dict(json.loads(line)))
        except Exception:  # a line being written, or cut by the seek
            continue
    starts = [i for i, e in enumerate(events) if e.kind == "start"]
    if not starts:
        return []
    last = events[starts[-1]].trace_id
    return [e for e in events[starts[-1]:] if e.trace_id == last]


def _console(run: Path) -> Path:
    return run.with_name(run.name + ".console.log")


def _owner_file(run: Path) -> Path:
    return run.with_name(run.name + ".owner")


def _read_owner(run: Path) -> str | None:
    try:
        return _owner_file(run).read_text()
    except OSError:
        return None


def status_markdown(run: Path, status: dict[str, Any], active: dict[str, Any] | bool | None,
                    show_paths: bool = True) -> str:
    """One run's state for the Train tab: its name, status and step (counted from log.jsonl, which
    gains a row every step, while run.json's step moves only at checkpoints), the model and settings
    it runs with, and the error if it failed (or the console's last line, when it died before
    writing run.json). ``active``: the lock record of the running run (``TrainingManager.active``)."""
    own = isinstance(active, dict) and active.get("out") == str(run)
    # active=True (a caller that knows no record) or this run's record; another run's lock is not this one's
    running = active is True or own or (isinstance(active, dict) and active.get("out") is None)
    state = STOPPING if own and active.get("stop_requested") else status.get("status")
    request = active.get("request") if own else None
    step = max(int(status.get("step") or 0), int(status.get("step_logged") or 0))
    total = status.get("max_steps") or (request or {}).get("steps") or "?"
    msg = f"**{run.name}**: {state} — step {step} of {total}" + (" (running)" if running else "")
    notes = []
    if status.get("status") == "failed":
        notes.append(f"⚠️ {status.get('message')}")
    elif status.get("status") == STALE_STATUS:  # SIGKILL, out of memory: the trainer wrote no status
        last = status.get("last_checkpoint")
        msg += (f" — resume it: `e3rl train --out {run if show_paths else run.name} --resume` continues from {last}"
                if last else
                " — it wrote no checkpoint, so start it again")
        if status.get("console", "").strip():
            notes.append("⚠️ " + status["console"].strip().splitlines()[-1])
    elif not running and status.get("status") == "starting" and "error" in status.get("console", ""):
        notes.append("⚠️ " + status["console"].strip().splitlines()[-1])
    settings = settings_line(status, request)
    held = held_out_line(status.get("eval") or {})
    return "\n\n".join([msg, *notes, *([held] if held else []), *([settings] if settings else [])])


def held_out_line(record: dict[str, Any]) -> str:
    """The run's held-out accuracy (eval.json): before, after and the change, or the evaluation's
    progress while it runs."""
    if not record:
        return ""
    k = record.get("samples", "K")
    parts = []
    before, after, running = record.get("before"), record.get("after"), record.get("running")
    if before:
        parts.append(f"before training **{before['avg_at_k']:.3f}**")
    if after:
        change = f" ({after['avg_at_k'] - before['avg_at_k']:+.3f})" if before else ""
        parts.append(f"after step {after['step']} **{after['avg_at_k']:.3f}**{change}")
    if running:
        when = "before training" if running["label"] == "before" else "after training"
        parts.append(f"evaluating {when}: {running['done']}/{running['total']} problems…")
    return (f"held-out Avg@{k} on `{record.get('data')}` (plain sampling, erasure off): " + " → ".join(parts)) if parts else ""


def settings_line(status: dict[str, Any], request: dict[str, Any] | None = None) -> str:
    """The model and settings a run uses, from its run.json (as ``read_status`` returns it); before
    the trainer wrote run.json, from the request it was started with (the lock's record)."""
    cfg = status.get("config") or {}
    if status.get("model"):
        values = dict(model=status["model"], algo=status.get("algo"), steps=status.get("max_steps"),
                      group=cfg.get("num_generations"), prompts=cfg.get("prompts_per_step"),
                      lr=cfg.get("learning_rate"), seed=cfg.get("seed"), data=status.get("data"))
    elif request:
        values = dict(model=request.get("model"), algo=request.get("algo"), steps=request.get("steps"),
                      group=request.get("group_size"), prompts=request.get("prompts_per_step"),
                      lr=request.get("learning_rate"), seed=request.get("seed"), data=request.get("data"))
    else:
        return ""
    parts = [f"model `{values['model']}`", str(values["algo"]), f"{values['steps']} steps",
             f"group size {values['group']}", f"{values['prompts']} prompts per step",
             f"learning rate {values['lr']:g}" if isinstance(values["lr"], (int, float)) else None,
             f"seed {values['seed']}", f"data `{values['data']}`" if values["data"] else None]
    return "run settings: " + " · ".join(p for p in parts if p is not None)


def curves_spec(rows: list[dict]) -> dict:
    """The training curves (``render.training_spec``) with axis titles: the step below each panel,
    the metric beside it."""
    from . import render

    spec = render.training_spec(rows)
    layout = spec["layout"]
    for i, (_, title) in enumerate(render.TRAINING_KEYS):
        n = "" if i == 0 else str(i + 1)
        layout[f"xaxis{n}"]["title"] = dict(text="step", standoff=4)
        layout[f"yaxis{n}"]["title"] = dict(text=title, standoff=2)
    layout["margin"] = dict(layout.get("margin", {}), l=55, b=45)
    return spec


def rollout_html(events: list) -> str:
    """The latest logged rollout as a heatmap under a heading: its training step, gold answer and
    prompt (cut, escaped)."""
    from . import render

    if not events:
        return ""
    start = events[0]
    step = f" of step {start.train_step}" if getattr(start, "train_step", None) else ""
    gold = f" · gold answer <code>{html.escape(str(start.gold))}</code>" if getattr(start, "gold", None) else ""
    heading = (f'<div class="e3rl-rollout-head"><b>Latest rollout{step}</b>{gold}<br>prompt: '
               f"<code>{html.escape(render.clip(start.prompt, 500))}</code></div>")
    return heading + render.trace_html(list(render.fold(events).values())[-1], with_css=False)


def read_status(run: Path) -> dict[str, Any]:
    """run.json plus the metric rows so far and the console tail (for errors before run.json exists).
    A run that run.json calls running but whose process is gone reads as STALE_STATUS."""
    status: dict[str, Any] = {"status": "starting", "rows": [], "eval": held_out.read(run)}
    try:
        status.update(json.loads((run / RUN_FILE).read_text()))
    except (OSError, json.JSONDecodeError):
        pass
    if "pid" in status:
        status["status"] = live_status(status)
    try:
        lines = (run / LOG_FILE).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            # Non-finite metrics are written as "NaN"/"Infinity" (strict JSON): numbers again for the charts.
            status["rows"].append({k: json_number(v) for k, v in json.loads(line).items()})
        except json.JSONDecodeError:
            continue  # a line being written right now
    # The last step logged: log.jsonl gains a row per step, run.json's step moves only at checkpoints.
    status["step_logged"] = max((r["step"] for r in status["rows"] if isinstance(r.get("step"), int)), default=0)
    try:
        status["console"] = _console(run).read_text()[-2000:]
    except OSError:
        status["console"] = ""
    return status
