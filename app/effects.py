"""Background decision-effect jobs for the Audit tab: one ``e3rl audit --effects`` subprocess at a time.

A job is a folder under ``ROOT/effects/``: the picked traces (``input.jsonl.gz``), the picked
decisions (``decisions.txt``), and the command's output folder (``out/``: ``effects-job.json``,
``effects.jsonl``, CSV, aggregates, calibration plot). The process runs in its own session, so it
survives page reloads; the tab only reads the folder. Stop sends SIGTERM: the decision under way
finishes, every finished row stays. With visitors kept apart (a Space) each job belongs to the
browser session that started it, another visitor is told to wait without seeing it, and a job is
bounded to ``max_rows`` branch rows (decisions x 2K) and says so.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from e3rl_core.commands import e3rl_command
from e3rl_core.errors import E3RLError
from e3rl_core.evaluation.effect_stats import aggregates, summary_text
from e3rl_core.evaluation.effects_job import JOB_FILE, ROWS_FILE, read_rows
from e3rl_core.events import Trace, write_events

from .training import _alive

REPO = Path(__file__).resolve().parents[1]
LOCK = "active-effects.json"
MAX_JOBS_KEPT = 20
SPACE_MAX_ROWS = 1_600
"""A Space's bound on one job: decisions x 2K continuations (100 decisions at K = 8)."""
EFFECT_COLUMNS = ["effect", "effect_low", "effect_high", "verdict", "p_keep", "p_redraw"]


class EffectsManager:
    """Start, watch and stop one background effects job under ``root``/effects."""

    def __init__(self, root: str | os.PathLike[str], visitors_apart: bool = False,
                 max_rows: int | None = None, device: str = "cpu") -> None:
        self.root = Path(root) / "effects"
        self.visitors_apart = visitors_apart
        self.max_rows = max_rows
        self.device = device  # where a job loads its model: the app's own device

    # ---------------------------------------------------------------- state
    def active(self) -> dict[str, Any] | None:
        """The running job's lock record (pid, folder, owner), or None (a dead one's lock is removed)."""
        lock = self.root / LOCK
        try:
            info = json.loads(lock.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(info, dict) and isinstance(info.get("pid"), int) and _alive(info["pid"]):
            return info
        lock.unlink(missing_ok=True)
        return None

    def jobs(self, owner: str | None = None, *, everyone: bool = False) -> list[Path]:
        """Job folders, newest first (with visitors kept apart, ``owner``'s own unless ``everyone``)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and (p / "decisions.txt").is_file()]
        if self.visitors_apart and not everyone:
            found = [p for p in found if _owner(p) == owner]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def owns(self, info: dict[str, Any] | None, owner: str | None) -> bool:
        return not self.visitors_apart or (info is not None and info.get("owner") == owner)

    # -------------------------------------------------------------- actions
    def start(self, traces: Sequence[Trace], keys: Sequence[str], samples: int, model: str,
              owner: str | None = None) -> Path:
        """Measure ``keys`` (trace_id/segment/attempt) of ``traces`` with ``samples`` continuations
        per branch, by ``model`` (the traces' own, resolved). Returns the job's folder."""
        if not keys:
            raise E3RLError("no decisions picked: select a row of the table, or filter the rows you want measured")
        if not 1 <= samples <= 64:
            raise E3RLError(f"K must be between 1 and 64 continuations per branch, got {samples}")
        rows = len(keys) * 2 * samples
        if self.max_rows is not None and rows > self.max_rows:
            raise E3RLError(f"{len(keys)} decisions x 2 x K = {samples} is {rows} continuations; this Space runs "
                            f"at most {self.max_rows} per job: pick fewer decisions or a smaller K")
        active = self.active()
        if active is not None:
            who = "your" if self.owns(active, owner) else "another visitor's"
            raise E3RLError(f"{who} decision-effects job is running; stop it or wait for it to finish")
        self._prune()
        job = self.root / f"effects-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        job.mkdir(parents=True)
        wanted = {k.split("/", 1)[0] for k in keys}
        write_events([e for t in traces if t.trace_id in wanted for e in t.events], job / "input.jsonl.gz")
        (job / "decisions.txt").write_text("\n".join(keys) + "\n")
        if owner is not None:
            (job / ".owner").write_text(owner)
        cmd = e3rl_command("audit", str(job / "input.jsonl.gz"), "--effects", "--samples", str(samples),
                           "--out", str(job / "out"), "--model", model, "--decisions", str(job / "decisions.txt"),
                           "--device", self.device, "--json")
        with open(job / "console.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        (self.root / LOCK).write_text(json.dumps({"pid": proc.pid, "job": job.name, "owner": owner}))
        return job

    def stop(self, owner: str | None = None) -> str:
        info = self.active()
        if info is None or not self.owns(info, owner):
            return "no decision-effects job of yours is running"
        try:
            os.kill(info["pid"], signal.SIGTERM)
        except OSError:
            pass
        return "stopping: the decision under way finishes; every finished row is kept"

    def release(self, owner: str | None) -> None:
        """A visitor left: their running job stops (a Space)."""
        info = self.active()
        if info is not None and self.visitors_apart and info.get("owner") == owner:
            self.stop(owner)

    def _prune(self) -> None:
        for old in self.jobs(everyone=True)[MAX_JOBS_KEPT - 1:]:
            shutil.rmtree(old, ignore_errors=True)


def _owner(job: Path) -> str | None:
    try:
        return (job / ".owner").read_text().strip() or None
    except OSError:
        return None


def job_state(job: Path | None) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the job's record, its rows so far); (None, []) before its first write."""
    if job is None:
        return None, []
    try:
        record = json.loads((job / "out" / JOB_FILE).read_text())
    except (OSError, ValueError):
        record = None
    return record, read_rows(job / "out") if (job / "out" / ROWS_FILE).is_file() else []


def failure(job: Path) -> str:
    """The last line the job's process printed (its one-line error when it failed)."""
    try:
        lines = [x for x in (job / "console.log").read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def progress_markdown(job: Path | None, record: dict[str, Any] | None, running: bool) -> str:
    """A progress bar and a status line."""
    if job is None:
        return "no decision-effects job yet"
    if record is None:
        if running:
            return "starting: loading the model and reading the decisions…"
        return f"⚠️ the job ended before measuring anything: {failure(job) or 'see its console.log'}"
    done, total = record["done"], max(1, record["total"])
    bar = "█" * round(20 * done / total) + "░" * (20 - round(20 * done / total))
    status = record["status"] if not (record["status"] == "running" and not running) else "stopped"
    eta = ""
    if status == "running" and done:
        left = record["seconds"] / done * (total - done)
        eta = f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
    err = f" — {record['error']}" if record.get("error") else ""
    return f"`{bar}` {done}/{record['total']} decisions ({100 * done / total:.0f}%), {status}{eta}{err}"


def aggregates_markdown(rows: list[dict[str, Any]]) -> str:
    """The aggregates of the rows so far, as the researcher reads them first."""
    if not rows:
        return ""
    return "```\n" + summary_text(aggregates(rows)) + "\n```\nVerdicts rest on the interval: *helps* / *hurts* " \
           "only when it excludes 0; compare the counts with what chance alone gives at this K."


def effect_columns(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """(trace id, segment, attempt) -> the effect columns the decisions table gains."""
    return {(r["trace_id"], int(r["segment"]), int(r["attempt"])): {
        "effect": r["effect"], "effect_low": r["ci_low"], "effect_high": r["ci_high"], "verdict": r["verdict"],
        "p_keep": r["p_keep"], "p_redraw": r["p_redraw"]} for r in rows}


def detail_html(row: dict[str, Any] | None) -> str:
    """A decision's keep and redraw continuations side by side, each with its answer (✓ / ✗)."""
    import html

    if row is None:
        return ""

    def column(title: str, texts: list[str], answers: list[Any], correct: int, each: list[int] | None) -> str:
        marks = ["✓" if c else "✗" for c in each] if each else [""] * len(texts)
        items = "".join(
            f"<li><pre style='white-space:pre-wrap;margin:0'>{html.escape(t or '', quote=False)}</pre>"
            f"<b>{m} answer {html.escape(str(a), quote=False)}</b></li>" for t, a, m in zip(texts, answers, marks))
        return (f"<div style='flex:1;min-width:0'><h4>{title}: {correct}/{len(texts)} correct</h4>"
                f"<ol>{items}</ol></div>")

    head = (f"<p><b>{html.escape(row['key'], quote=False)}</b> ({row['decision']}, U − Θ "
            f"{'n/a' if row['margin'] is None else format(row['margin'], '+.4f')}): effect {row['effect']:+.2f} "
            f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}] → <b>{row['verdict']}</b>; gold {html.escape(str(row['gold']))}"
            f", seed {row['seed']}</p>")
    return head + ("<div style='display:flex;gap:1em'>"
                   + column("keep (segment as written, then continued)", row["keep_texts"], row["keep_answers"],
                            row["keep_correct"], row.get("keep_each"))
                   + column("redraw (segment drawn afresh)", row["redraw_texts"], row["redraw_answers"],
                            row["redraw_correct"], row.get("redraw_each")) + "</div>")
