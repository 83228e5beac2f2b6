"""Decision effects as a resumable job: trace files in, a folder of results out.

The folder (``e3rl audit TRACE --effects --out DIR``, and the Audit tab's background jobs):

    effects-job.json   the job's record: settings, status (running/finished/stopped/failed), done/total
    effects.jsonl      one row per measured decision, appended and flushed as each one finishes
    effects.csv        the same table, spreadsheet-safe (written at the end, and when stopped)
    aggregates.json    ``effect_stats.aggregates`` of the rows
    calibration.html   score margin against measured effect (plotly)

A job stopped or killed keeps every finished row; run again with the same settings, it measures only
the decisions not yet in ``effects.jsonl``. Other settings in a folder that holds a job are refused
(``--overwrite`` replaces it); a folder holding anything else is never touched (``outdirs``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..events import check_trace, group_traces, iter_events, strict_dumps
from ..outdirs import OutDirError, check_out_dir, read_json, resolve_out
from ..training.checkpoint import checkpoints
from ..tasks import arith
from .effect_stats import aggregates, calibration_figure
from .effects import Decision, EffectsConfig, EffectsError, check_model, decisions_of, measure, with_golds

KIND = "e3rl-effects"
JOB_FILE = "effects-job.json"
ROWS_FILE = "effects.jsonl"
CSV_FILE = "effects.csv"
AGGREGATES_FILE = "aggregates.json"
PLOT_FILE = "calibration.html"
STATUSES = ("running", "finished", "stopped", "failed")
# Columns of the CSV besides the continuations' texts and answers (kept in the JSONL rows).
CSV_DROP = ("keep_texts", "redraw_texts", "keep_answers", "redraw_answers", "keep_each", "redraw_each")


@dataclass
class JobSpec:
    """Which decisions of which trace files to measure, with which model and settings."""

    traces: list[str]
    model: str
    config: EffectsConfig = field(default_factory=EffectsConfig)
    data: str | None = None
    """A dataset SPEC whose answers fill traces written without a gold answer (matched by prompt)."""
    keys: list[str] | None = None
    """Only these decisions (``trace_id/segment/attempt``): the Audit tab's selection."""
    limit: int | None = None
    """At most this many decisions, in file order."""
    steps: tuple[int, int] | None = None
    """Only rollouts of training steps in [first, last] (a trainer's ``rollouts.jsonl``)."""
    other_model: bool = False
    """Branch with ``model`` although the traces name another (a checkpoint of the run that wrote
    them); the record says so."""

    def settings(self) -> dict[str, Any]:
        """What a resumed job must share with the one that started the folder: the trace files are
        told by their name and content (so a results folder resumes from another checkout)."""
        out = dataclasses.asdict(self)
        out["traces"] = [fingerprint(t) for t in self.traces]
        out["steps"] = list(self.steps) if self.steps else None
        return out


def fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A trace file's name, size and SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"name": Path(path).name, "bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def is_effects_record(data: Any) -> bool:
    """Whether ``data`` (a parsed ``effects-job.json``) is this job's record, told by its fields."""
    return (isinstance(data, dict) and data.get("kind") == KIND and data.get("status") in STATUSES
            and type(data.get("done")) is int and type(data.get("total")) is int)


def holds_job(folder: Path) -> bool:
    return is_effects_record(read_json(folder / JOB_FILE))


def same_model(a: str, b: str) -> bool:
    """Whether two model names (as typed, or as a trace records them) name the same model."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def run_quarters(run: str | os.PathLike[str], start: str) -> dict[str, tuple[tuple[int, int], str, bool]]:
    """The first and the last quarter of a training run's steps, each as (steps, model that branches
    them, whether that model differs from the one the traces name) for a ``JobSpec``: the first with
    the starting model (the policy that wrote step 1); the last with the newest kept checkpoint from
    before that quarter or, where the run kept none that early (a run keeps its last two by default),
    the oldest one inside it."""
    run = Path(run)
    record = read_json(run / "run.json")
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] < 1:
        raise EffectsError(f"{run} holds no finished training run (run.json with its step count); "
                           f"pass the folder e3rl train wrote")
    steps = record["step"]
    quarter = -(-steps // 4)
    last_first = steps - quarter + 1
    ckpts = checkpoints(run)  # complete ones only, oldest first
    if not ckpts:
        raise EffectsError(f"{run} kept no checkpoint to branch its last quarter with; train it with --save-steps")
    before = [p for s, p in ckpts if s < last_first]
    late = before[-1] if before else next(p for s, p in ckpts if s >= last_first - 1)
    return {"first-quarter": ((1, quarter), start, False), "last-quarter": ((last_first, steps), str(late), True)}


def load_decisions(spec: JobSpec, tokenizer: Any) -> tuple[list[Decision], dict[str, str]]:
    """The decisions the job measures (gold answers filled, refused without one) and the reference
    solution of every prompt that has one (the synthetic task's, for slips)."""
    decisions: list[Decision] = []
    for path in spec.traces:
        for trace in group_traces(iter_events(path, allow_truncated=True)):
            if not any(e.kind == "start" for e in trace.events):
                continue
            check_trace(trace, str(path))
            step = trace.start.train_step
            if spec.steps and (step is None or not spec.steps[0] <= step <= spec.steps[1]):
                continue
            decisions.extend(decisions_of(trace, spec.config.which))
    if spec.keys is not None:
        wanted = set(spec.keys)
        decisions = [d for d in decisions if d.key in wanted]
    if spec.limit is not None:
        decisions = decisions[: spec.limit]
    if not decisions:
        raise EffectsError(f"no {spec.config.which if spec.config.which != 'all' else ''} decisions to measure in "
                           f"{', '.join(map(str, spec.traces))}; pick a trace with decided segments")
    golds, references = _answers(spec.data, tokenizer)
    for d in decisions:
        problem = arith.solve(d.prompt)
        if problem is not None:
            golds.setdefault(d.prompt, problem.answer)
            references.setdefault(d.prompt, problem.solution)
    check_model(decisions, spec.model, same=spec.other_model or same_model(decisions[0].model, spec.model))
    return with_golds(decisions, golds), references


def _answers(data: str | None, tokenizer: Any) -> tuple[dict[str, str], dict[str, str]]:
    if not data:
        return {}, {}
    from ..tasks.datasets import load_examples, parse_spec, render_prompt

    golds: dict[str, str] = {}
    refs: dict[str, str] = {}
    synthetic = parse_spec(data)[0] == "synthetic"  # one step per line: a per-step reference
    for ex in load_examples(data):
        for prompt in {render_prompt(ex.question, tokenizer), render_prompt(ex.question), ex.question}:
            if ex.answer:
                golds[prompt] = ex.answer
            if synthetic and ex.solution:
                refs[prompt] = ex.solution
    return golds, refs


def read_rows(out: Path) -> list[dict[str, Any]]:
    """The rows measured so far (a last line cut off by a kill is dropped)."""
    path = out / ROWS_FILE
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("\n"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a kill left unfinished, so appended rows start on a line of their own."""
    if not path.is_file():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(strict_dumps(data, indent=1))
    os.replace(tmp, path)


def write_outputs(out: Path, rows: Sequence[dict[str, Any]], title: str = "") -> dict[str, Any]:
    """The CSV, the aggregates and the calibration plot of ``rows``; returns the aggregates."""
    import pandas as pd

    from ..exports import write_csv

    agg = aggregates(rows)
    _write_json(out / AGGREGATES_FILE, agg)
    if rows:
        df = pd.DataFrame([{k: v for k, v in r.items() if k not in CSV_DROP} for r in rows])
        tmp = out / f".{CSV_FILE}.tmp"
        write_csv(df, tmp)
        os.replace(tmp, out / CSV_FILE)
    calibration_figure(rows, title).write_html(out / PLOT_FILE, include_plotlyjs="cdn")
    return agg


def prepare(spec: JobSpec, out: str | Path, *, overwrite: bool = False) -> tuple[Path, list[dict[str, Any]]]:
    """The output folder, checked: a new or empty one; one holding this job with the same settings
    (resumed: its rows are returned); with ``overwrite``, one holding any effects job (replaced).
    Anything else is refused, nothing changed."""
    out = resolve_out(out)
    record = read_json(out / JOB_FILE)
    if (out.is_dir() and is_effects_record(record) and record.get("settings") == spec.settings()
            and not overwrite):
        return out, read_rows(out)
    if is_effects_record(record) and not overwrite:
        raise OutDirError(f"{out} holds decision effects measured with other settings; pass --overwrite to "
                          f"replace them, or choose another --out")
    if check_out_dir(out, what="decision effects (e3rl audit --effects)", ours=holds_job, overwrite=overwrite):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, []


Progress = Callable[[int, int, "dict[str, Any] | None"], None]


def run_job(spec: JobSpec, out: str | Path, model: Any, tokenizer: Any, *, overwrite: bool = False,
            progress: Progress | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """Measure every decision of ``spec`` not yet in ``out``; returns the final record (with the
    aggregates). ``stop`` set: the decision under way finishes, the rest wait for a resume."""
    decisions, references = load_decisions(spec, tokenizer)
    folder, rows = prepare(spec, out, overwrite=overwrite)
    done = {r["key"] for r in rows}
    todo = [d for d in decisions if d.key not in done]
    record: dict[str, Any] = {
        "kind": KIND, "status": "running", "done": len(done), "total": len(decisions), "model": spec.model,
        "trace_model": decisions[0].model, "settings": spec.settings(), "pid": os.getpid(),
        "started": time.time(), "seconds": 0.0,
    }
    _write_json(folder / JOB_FILE, record)
    t0 = time.monotonic()
    _drop_partial_line(folder / ROWS_FILE)
    if progress:
        progress(len(done), len(decisions), None)
    try:
        with open(folder / ROWS_FILE, "a", encoding="utf-8") as fh:
            for d in todo:
                if stop is not None and stop.is_set():
                    record["status"] = "stopped"
                    break
                row = measure(model, tokenizer, d, spec.config, references.get(d.prompt))
                fh.write(strict_dumps(row, ensure_ascii=False) + "\n")
                fh.flush()
                rows.append(row)
                record.update(done=len(rows), seconds=round(time.monotonic() - t0, 2))
                _write_json(folder / JOB_FILE, record)
                if progress:
                    progress(len(rows), len(decisions), row)
            else:
                record["status"] = "finished"
    except KeyboardInterrupt:
        record["status"] = "stopped"
        raise
    except BaseException as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        record["aggregates"] = write_outputs(folder, rows, title=f"{len(rows)} decisions, K = {spec.config.samples}")
        record.update(done=len(rows), seconds=round(time.monotonic() - t0, 2))
        _write_json(folder / JOB_FILE, record)
    return record
