"""The audit: every erasure decision as a table row, exports, trace files, and what-if re-scoring.

Pure functions over events and pandas (no gradio). ``what_if`` re-judges the *recorded* attempts of
a trace's group under other threshold parameters by replaying the real threshold policy over the
recorded segment features; what the model would have generated after a changed decision is unknown,
so only decisions on attempts that exist can change.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from e3rl_core.errors import E3RLError, TraceFormatError
from e3rl_core.events import SegmentEvent, StartEvent, Trace, event_to_dict, group_traces, read_events
from e3rl_core.generation.config import GenerationConfig
from e3rl_core.generation.decision import ScoredAttempt, decide
from e3rl_core.generation.schedule import decision_order
from e3rl_core.generation.scoring import SegmentFeatures, segment_score
from e3rl_core.generation.thresholds import make_policy
from e3rl_core.overrides import with_values

COLUMNS = ["trace", "source", "segment", "attempt", "base", "max", "delta", "score", "baseline", "penalty",
           "history", "threshold", "decision", "reason", "erased_text", "replacement", "answer", "correct",
           "correct_without_erasure", "flipped"]


def counterfactual_twins(traces: Sequence[Trace]) -> dict[str, Trace]:
    """Trace id of an erasure-on rollout -> the erasure-off rollout of the same prompt, seed and
    settings otherwise (what the Counterfactual button generates), when one was recorded."""
    def key(tr: Trace) -> tuple:
        cfg = dict(tr.start.config)
        cfg["erase"] = {k: v for k, v in cfg.get("erase", {}).items() if k != "enabled"}
        return tr.start.prompt, tr.start.seed, json.dumps(cfg, sort_keys=True)

    off = {key(t): t for t in traces if not t.start.config.get("erase", {}).get("enabled", True)}
    return {t.trace_id: off[key(t)] for t in traces
            if t.start.config.get("erase", {}).get("enabled", True) and key(t) in off}
MAX_TRACE_FILE_BYTES = 50 * 2**20


def decisions_frame(traces: Sequence[Trace], source: str = "session") -> pd.DataFrame:
    """One row per segment decision (first attempts and retries) of the given traces."""
    rows = []
    twins = counterfactual_twins(traces)
    for tr in traces:
        segs = tr.segments
        twin = twins.get(tr.trace_id)
        twin_correct = twin.done.correct if twin is not None and twin.done else None
        texts: dict[tuple[int, int], str] = {}
        for t in tr.tokens:
            texts[(t.segment, t.attempt)] = texts.get((t.segment, t.attempt), "") + t.text
        done = tr.done
        for s in segs:
            erased = s.decision == "erase"
            rows.append({
                "trace": tr.trace_id, "source": source, "segment": s.segment, "attempt": s.attempt,
                "base": s.features.get("base"), "max": s.features.get("max"), "delta": s.features.get("delta"),
                "score": s.score, "baseline": s.baseline, "penalty": s.penalty, "history": s.history,
                "threshold": s.threshold, "decision": s.decision, "reason": s.reason,
                "erased_text": texts.get((s.segment, s.attempt), "") if erased else "",
                "replacement": texts.get((s.segment, s.attempt + 1), "") if erased else "",
                "answer": done.answer if done else None, "correct": done.correct if done else None,
                "correct_without_erasure": twin_correct,
                "flipped": None if twin_correct is None or done is None or done.correct is None
                else bool(done.correct) != bool(twin_correct),
            })
    return pd.DataFrame(rows, columns=COLUMNS)


def filter_frame(df: pd.DataFrame, only_erasures: bool = False, trace: str = "", sort_by: str = "",
                 descending: bool = True, only_flipped: bool = False) -> pd.DataFrame:
    """only_flipped: erasures in rollouts whose answer correctness differs from their erasure-off
    counterfactual (run the Counterfactual to record one)."""
    out = df
    if only_erasures or only_flipped:
        out = out[out["decision"] == "erase"]
    if only_flipped:
        out = out[out["flipped"] == True]  # noqa: E712 (column holds True/False/None)
    if trace:
        out = out[out["trace"].astype(str).str.contains(trace, regex=False)]
    if sort_by and sort_by in out.columns:
        out = out.sort_values(sort_by, ascending=not descending, kind="stable")
    return out


def export(df: pd.DataFrame, directory: str | os.PathLike[str], stem: str = "e3rl-audit") -> tuple[Path, Path]:
    """Write the table as CSV and JSONL (atomically); returns both paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    csv, jsonl = d / f"{stem}.csv", d / f"{stem}.jsonl"
    for path, write in ((csv, lambda p: df.to_csv(p, index=False)),
                        (jsonl, lambda p: df.to_json(p, orient="records", lines=True, force_ascii=False))):
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)
    return csv, jsonl


def load_trace_file(path: str | os.PathLike[str]) -> list[Trace]:
    """Traces from a JSONL event file, validated; errors say what is wrong and where."""
    p = Path(path)
    if not p.is_file():
        raise E3RLError(f"no such trace file: {p}")
    if p.stat().st_size > MAX_TRACE_FILE_BYTES:
        raise E3RLError(f"{p.name} is {p.stat().st_size / 2**20:.0f} MiB; load at most "
                        f"{MAX_TRACE_FILE_BYTES // 2**20} MiB of traces at once (split the file)")
    try:
        events = read_events(p, allow_truncated=True)
    except UnicodeDecodeError:
        raise TraceFormatError(f"{p.name} is not a UTF-8 text file; load a JSONL trace written by e3rl") from None
    if not events:
        raise TraceFormatError(f"{p.name} holds no events; load a JSONL trace written by e3rl generate --trace-out")
    traces = group_traces(events)
    starts = [t for t in traces if not any(isinstance(e, StartEvent) for e in t.events)]
    if starts:
        raise TraceFormatError(f"{p.name}: trace {starts[0].trace_id!r} has no start event; the file is incomplete")
    return traces


def traces_to_jsonl(traces: Iterable[Trace]) -> str:
    return "".join(json.dumps(event_to_dict(e), ensure_ascii=False) + "\n" for t in traces for e in t.events)


WHAT_IF_COLUMNS = ["trace", "segment", "attempt", "score", "new_score", "threshold", "new_threshold", "decision",
                   "new_decision", "reason", "new_reason", "changed"]


def what_if(group: Sequence[Trace], overrides: dict[str, Any]) -> pd.DataFrame:
    """Re-judge the recorded attempts of one group under other threshold/score parameters.

    overrides: ``{"threshold.kappa": 0.5, "threshold.policy": "fixed", "threshold.value": 1.0,
    "score.weight_base": 0.5, "erase.budget": 3, ...}``. Returns one row per recorded attempt with
    the recorded and the re-judged threshold, decision and reason, and whether erasing changed.
    The attempts are replayed in the order the generator decided them and judged by the rule it
    ran (``generation.decision``), so unchanged settings give back every recorded decision."""
    cfg = with_values(GenerationConfig.from_dict(group[0].start.config), overrides)
    weights = (cfg.score.weight_base, cfg.score.weight_max, cfg.score.weight_delta)
    policy = make_policy(cfg.threshold)
    kept = [_kept_signal(tr, cfg.score.signal) for tr in group]
    total = [0] * len(group)  # erasures spent per trace under the new rules (the per-trace cap)
    tried: dict[tuple[int, int], list[ScoredAttempt]] = {}  # (row, segment) -> attempts so far
    rows = []
    for step, i, s in decision_order([tr.segments for tr in group], policy.needs_group):
        score = _rescore(s, weights)
        if step == "score":
            if s.attempt == 0:
                policy.observe_first(i, s.segment, score)
            continue
        attempts = tried.setdefault((i, s.segment), [])
        attempts.append(ScoredAttempt(score, s.attempt))
        thr = policy.parts(i, s.segment, s.attempt).threshold
        d = decide(score, thr, policy=cfg.threshold.policy, attempts=attempts, segment_erasures=s.attempt,
                   trace_erasures=total[i], restored=s.reason == "restored", erase=cfg.erase,
                   cap=cfg.trace_erase_cap)
        if d.decision == "erase":
            total[i] += 1
        rows.append(dict(zip(WHAT_IF_COLUMNS, (
            group[i].trace_id, s.segment, s.attempt, s.score, score, s.threshold, thr, s.decision, d.decision,
            s.reason, d.reason, (s.decision == "erase") != (d.decision == "erase")))))
        if s.decision != "erase" and s.segment in kept[i]:
            # What was recorded as kept, whatever the new decision: later attempts were generated
            # after it, and the policy's history term must see what the generator's saw.
            policy.observe_kept(i, kept[i][s.segment])
    return pd.DataFrame(rows, columns=WHAT_IF_COLUMNS)


def _kept_signal(trace: Trace, signal: str) -> dict[int, list[float]]:
    """The kept tokens' signal (entropy or surprisal) by segment."""
    per: dict[int, list[float]] = {}
    for t in trace.kept_tokens():
        per.setdefault(t.segment, []).append(t.entropy if signal == "entropy" else t.surprisal)
    return per


def _rescore(s: SegmentEvent, weights: tuple[float, float, float]) -> float:
    f = s.features
    return segment_score(SegmentFeatures(base=f["base"], max=f["max"], delta=f["delta"]), weights)


def group_of(traces: Sequence[Trace], trace_id: str) -> list[Trace]:
    """The traces generated in the same batch and group as ``trace_id`` (its group-mates)."""
    target = next((t for t in traces if t.trace_id == trace_id), None)
    if target is None:
        raise E3RLError(f"no trace {trace_id!r} loaded")
    key = (target.start.batch, target.start.group_id)
    return [t for t in traces if (t.start.batch, t.start.group_id) == key]

