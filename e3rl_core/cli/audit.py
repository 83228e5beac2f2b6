"""``e3rl audit TRACE --effects``: was each erasure right? The measured effect of every decision.

    e3rl audit rollouts.jsonl --effects --samples 8 --out effects/      resumable; CSV, JSON, HTML
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import E3RLError
from .options import add_device_flags, add_trust_remote_code_flag, resolve_device


def add_parser(sub: Any) -> None:
    au = sub.add_parser("audit", help="the measured effect of every erasure decision in trace files (--effects)")
    au.add_argument("traces", nargs="+", metavar="TRACE", help="trace files (JSONL, .jsonl.gz): the app's exports, "
                    "e3rl eval --traces-out, a training run's rollouts.jsonl")
    au.add_argument("--effects", action="store_true", required=True,
                    help="branch from each decided segment: K continuations keeping it, K redrawing it")
    au.add_argument("--out", required=True, help="folder for effects.jsonl/.csv, aggregates.json, calibration.html "
                    "(new, empty, or this command's earlier output: then it resumes)")
    au.add_argument("--samples", type=int, default=8, help="K continuations per branch (default 8)")
    au.add_argument("--model", help="the model that wrote the traces (default: the one they name)")
    au.add_argument("--other-model", action="store_true",
                    help="branch with --model although the traces name another (e.g. a checkpoint of the run "
                         "that wrote rollouts.jsonl); the record says so")
    au.add_argument("--data", help="dataset SPEC whose answers fill traces that have no gold answer "
                    "(matched by prompt), e.g. synthetic:test?n=100")
    au.add_argument("--which", choices=("all", "erased", "accepted"), default="all", help="decisions to measure")
    au.add_argument("--decisions", metavar="FILE", help="only the decisions listed in FILE, one "
                    "TRACE_ID/SEGMENT/ATTEMPT per line (the Audit tab's selection)")
    au.add_argument("--limit", type=int, help="at most N decisions, in file order")
    au.add_argument("--steps", help="only rollouts of training steps FIRST:LAST (rollouts.jsonl)")
    au.add_argument("--erasure", action="store_true", help="continue with erasure on (default: off, so the "
                    "effect is the decision's alone)")
    au.add_argument("--confidence", type=float, default=0.95, help="interval level for the verdicts")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--overwrite", action="store_true", help="replace effects measured with other settings in --out")
    au.add_argument("--json", action="store_true", help="print the aggregates as one JSON object")
    add_device_flags(au)
    add_trust_remote_code_flag(au)
    au.set_defaults(func=cmd_audit)


def _steps(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        first, last = (int(x) for x in text.split(":"))
    except ValueError:
        raise E3RLError(f"--steps takes FIRST:LAST training steps, e.g. --steps 1:10; got {text!r}") from None
    if first > last:
        raise E3RLError(f"--steps {text}: the first step is after the last")
    return first, last


def _keys(path: str | None) -> list[str] | None:
    if not path:
        return None
    try:
        keys = [line.strip() for line in Path(path).expanduser().read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise E3RLError(f"cannot read --decisions {path}: {err}; give a text file with one "
                        f"TRACE_ID/SEGMENT/ATTEMPT per line") from None
    if not keys:
        raise E3RLError(f"--decisions {path} lists no decisions; write one TRACE_ID/SEGMENT/ATTEMPT per line")
    return keys


def trace_model(paths: list[str]) -> str:
    """The model the first trace file names (its first start event)."""
    from ..events import StartEvent, iter_events

    for path in paths:
        for event in iter_events(path, allow_truncated=True):
            if isinstance(event, StartEvent):
                return event.model
    raise E3RLError(f"no start event in {', '.join(paths)}: not a trace file e3rl wrote")


def cmd_audit(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from ..evaluation.effect_stats import summary_text
    from ..evaluation.effects import EffectsConfig
    from ..evaluation.effects_job import AGGREGATES_FILE, CSV_FILE, PLOT_FILE, JobSpec, run_job
    from ..models import load_model
    from .. import outdirs

    if args.limit is not None and args.limit < 1:
        raise E3RLError(f"--limit must be >= 1, got {args.limit}; leave it out to measure every decision")
    for path in args.traces:
        if not Path(path).is_file():
            raise E3RLError(f"trace file not found: {path}")
    device = resolve_device(args.device)
    model_name = args.model or trace_model(args.traces)
    spec = JobSpec(traces=list(args.traces), model=model_name, data=args.data, limit=args.limit,
                   keys=_keys(args.decisions),
                   steps=_steps(args.steps), other_model=args.other_model,
                   config=EffectsConfig(samples=args.samples, erasure=args.erasure, seed=args.seed,
                                        confidence=args.confidence, which=args.which))
    outdirs.resolve_out(args.out)
    model, tokenizer = load_model(model_name, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    stop = threading.Event()
    # SIGTERM (the Audit tab's stop, a scheduler's kill) finishes the decision under way and keeps every row.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    bar = tqdm(desc="decisions", unit="decision", disable=args.json and not sys.stderr.isatty())

    def progress(done: int, total: int, row: dict | None) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        record = run_job(spec, args.out, model, tokenizer, overwrite=args.overwrite, progress=progress, stop=stop)
    finally:
        bar.close()
    agg = record["aggregates"]
    out = outdirs.resolve_out(args.out)
    if args.json:
        print(json.dumps(agg))
    else:
        print(summary_text(agg))
        print(f"{record['status']}: {record['done']}/{record['total']} decisions in {record['seconds']:.0f} s; "
              f"{out / CSV_FILE}, {out / AGGREGATES_FILE}, {out / PLOT_FILE}")
    return 0 if record["status"] == "finished" else 130
