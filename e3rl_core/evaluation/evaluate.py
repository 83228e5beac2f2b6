"""Evaluation: K samples per problem through the erasable generator, Avg@K and Pass@k.

- Avg@K: mean correctness over all K samples of all problems.
- Pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem (n samples, c correct),
  averaged over problems (Chen et al., 2021), for every k <= K asked for.
Samples of several problems are decoded as one batch (each problem is a group of K rollouts).
A problem whose prompt does not fit the model's context is skipped (counted in the summary) or,
with ``overlong="fail"``, scored as K wrong samples; it never stops the evaluation.
The library returns rows and a summary; the CLI prints and writes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ..errors import ConfigError, PromptError
from ..events import DoneEvent, Event, SegmentEvent, StartEvent, group_traces
from ..generation.generator import ErasableGenerator
from ..tasks.datasets import Example, render_prompt


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # Product form of 1 - C(n-c, k) / C(n, k): exact in floats for the n used here.
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


OVERLONG = ("skip", "fail")
OVERLONG_REASON = "prompt_too_long"
"""``finish_reason`` of the rows of a problem whose prompt did not fit (``overlong="fail"``)."""


def default_ks(samples: int) -> list[int]:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= samples]
    return ks if samples in ks else ks + [samples]


@dataclass
class EvalSummary:
    n_problems: int
    samples: int
    k: list[int]
    avg_at_k: float
    pass_at_k: dict[str, float]
    erase_rate: float
    """Share of scored segment attempts that were erased."""
    traces_with_erasure: float
    mean_tokens_generated: float
    mean_tokens_kept: float
    tokens_per_correct: float | None
    accuracy_by_difficulty: dict[str, float]
    overlong: int = 0
    """Problems whose prompt does not fit the model's context: left out of every figure
    (``overlong="skip"``) or scored as wrong (``"fail"``; not in the token figures)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def evaluate(
    gen: ErasableGenerator,
    examples: Sequence[Example],
    *,
    samples: int,
    ks: Sequence[int] | None = None,
    seed: int = 0,
    rows_per_batch: int = 32,
    overlong: str = "skip",
    on_events: Callable[[list[Event]], None] | None = None,
    on_problem_done: Callable[[int], None] | None = None,
    prompt_options: dict[str, Any] | None = None,
) -> tuple[EvalSummary, list[dict[str, Any]]]:
    """Generate ``samples`` completions per example and score them.

    Returns the summary and one row per sample (problem_id, sample, answer, gold, correct, tokens,
    erasures, ...). ``on_events`` receives each batch's events (e.g. to save traces);
    ``prompt_options``: ``render_prompt``'s keyword arguments (user_template, enable_thinking). Problems
    whose prompt does not fit the model's context are skipped, or with ``overlong="fail"`` get
    ``samples`` wrong rows (finish_reason ``prompt_too_long``); ``summary.overlong`` counts them."""
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    ks = list(ks) if ks else default_ks(samples)
    bad = [k for k in ks if not 1 <= k <= samples]
    if bad:
        raise ConfigError(f"pass@k needs 1 <= k <= samples ({samples}); got k={bad}; sample more or lower k")
    if not examples:
        raise ConfigError("no examples to evaluate")
    prompts = [render_prompt(ex.question, gen.tokenizer, **(prompt_options or {})) for ex in examples]
    fits = [i for i, p in enumerate(prompts) if gen.fits(len(gen.text_ids(p)))]
    too_long = [examples[i] for i in sorted(set(range(len(examples))) - set(fits))]
    if not fits and overlong == "skip":
        raise PromptError(f"no prompt of the {len(examples)} problem(s) fits the model's context "
                          f"({gen.context} tokens); use a model with a longer context or shorter questions")
    if too_long and on_problem_done:
        on_problem_done(len(too_long))
    rows: list[dict[str, Any]] = []
    per_batch = max(1, rows_per_batch // samples)
    segments = erased = 0
    for b0 in range(0, len(fits), per_batch):
        index = fits[b0 : b0 + per_batch]
        batch = [examples[i] for i in index]
        # Row seeds follow each problem's place in the dataset, so skipping one changes no other.
        events = list(gen.stream([prompts[i] for i in index], group_size=samples,
                                 seed=[seed + i * samples + j for i in index for j in range(samples)],
                                 golds=[ex.answer for ex in batch]))
        if on_events:
            on_events(events)
        for trace in group_traces(events):
            start = trace.start
            done = trace.done
            assert isinstance(start, StartEvent) and isinstance(done, DoneEvent)
            ex = batch[start.group_id]
            segs = [e for e in trace.events if isinstance(e, SegmentEvent)]
            segments += len(segs)
            erased += sum(s.decision == "erase" for s in segs)
            rows.append({
                "problem_id": ex.id, "sample": start.group_index, "difficulty": ex.difficulty,
                "gold": ex.answer, "answer": done.answer, "correct": bool(done.correct),
                "tokens_generated": done.tokens_generated, "tokens_kept": len(done.token_ids),
                "erasures": done.erasures, "finish_reason": done.finish_reason, "seed": start.seed,
                "trace_id": done.trace_id, "text": done.text,
            })
        if on_problem_done:
            on_problem_done(len(batch))
    if overlong == "fail":
        rows += [_overlong_row(ex, j) for ex in too_long for j in range(samples)]
    summary = summarize(rows, samples, ks, segments, erased)
    summary.overlong = len(too_long)
    return summary, rows




def _overlong_row(ex: Example, sample: int) -> dict[str, Any]:
    """A wrong sample for a problem whose prompt did not fit: nothing was generated."""
    return {
        "problem_id": ex.id, "sample": sample, "difficulty": ex.difficulty, "gold": ex.answer,
        "answer": None, "correct": False, "tokens_generated": 0, "tokens_kept": 0, "erasures": 0,
        "finish_reason": OVERLONG_REASON, "seed": None, "trace_id": None, "text": "",
    }


def summarize(rows: list[dict[str, Any]], samples: int, ks: Iterable[int], segments: int, erased: int) -> EvalSummary:
    """Accuracy figures over every row; token and erasure figures over the rows that generated
    (not the wrong rows of prompts that did not fit)."""
    by_problem: dict[str, list[bool]] = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r["correct"])
    n_correct = sum(r["correct"] for r in rows)
    pass_k = {
        str(k): sum(pass_at_k(len(v), sum(v), k) for v in by_problem.values()) / len(by_problem) for k in ks
    }
    by_diff: dict[str, list[bool]] = {}
    for r in rows:
        if r["difficulty"] is not None:
            by_diff.setdefault(str(r["difficulty"]), []).append(r["correct"])
    generated = sum(r["tokens_generated"] for r in rows)
    ran = [r for r in rows if r["finish_reason"] != OVERLONG_REASON] or rows
    return EvalSummary(
        n_problems=len(by_problem), samples=samples, k=list(ks),
        avg_at_k=n_correct / len(rows), pass_at_k=pass_k,
        erase_rate=erased / segments if segments else 0.0,
        traces_with_erasure=sum(r["erasures"] > 0 for r in ran) / len(ran),
        mean_tokens_generated=generated / len(ran),
        mean_tokens_kept=sum(r["tokens_kept"] for r in ran) / len(ran),
        tokens_per_correct=generated / n_correct if n_correct else None,
        accuracy_by_difficulty={d: sum(v) / len(v) for d, v in sorted(by_diff.items())},
    )
