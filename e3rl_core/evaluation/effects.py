"""Was this erasure right? The effect of one decision, measured by branching from it.

For a decided segment n of a trace (erased or accepted) whose gold answer is known:

- *keep*: continue from the kept prefix plus the segment as it was written (for an erased attempt,
  the erased tokens), K samples to the end;
- *redraw*: continue from the kept prefix alone (the segment drawn afresh), K samples to the end;
- effect = P(correct | redraw) - P(correct | keep), with a Newcombe interval; the verdict rests on
  the interval (``effect_stats.verdict``), never on the point estimate.

Both branches run in one batch of 2K rows at the trace's own sampling settings, with erasure off
unless asked (``EffectsConfig.erasure``), and share the prefix's cache: the prefix is prefilled once
and copied to every row (``GenerationConfig.share_prefix``) instead of 2K times. Every row's seed is
recorded, so ``stream(..., seed=row["seed"])`` reproduces it. A keep branch whose segment ended the
trace (end of text, or the token budget) has nothing to continue: its K outcomes are the trace's own.

The library returns rows; ``evaluation/effect_stats.py`` aggregates them, ``cli/audit.py`` and the
Audit tab run them as resumable jobs.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from ..errors import E3RLError
from ..events import Trace
from ..generation.config import GenerationConfig
from ..generation.generator import ErasableGenerator
from ..tasks.rewards import for_prompt
from .effect_stats import newcombe, verdict
from .slips import holds_slip, slipped_before

WHICH = ("all", "erased", "accepted")


class EffectsError(E3RLError):
    """A decision cannot be measured as asked (no gold answer, another model's trace, bad settings)."""


@dataclass
class EffectsConfig:
    """How the effect of each decision is measured (``e3rl audit --effects``, the Audit tab)."""

    samples: int = 8
    """K: continuations per branch (2K per decision)."""
    erasure: bool = False
    """Continue with the trace's erasure settings on; off measures the decision alone (default)."""
    seed: int = 0
    """Base seed; each decision's seed is derived from it and the decision's key."""
    confidence: float = 0.95
    """Level of the interval the verdicts rest on."""
    which: str = "all"
    """Decisions measured: all, erased (erase decisions) or accepted (accept / forced accept)."""
    share_prefix: bool = True
    """Prefill the prefix once for all 2K rows; False re-prefills it in every row (the reference
    the benchmark compares against)."""

    def __post_init__(self) -> None:
        if not 1 <= self.samples <= 1024:
            raise EffectsError(f"samples must be in [1, 1024], got {self.samples}")
        if not 0.5 <= self.confidence < 1:
            raise EffectsError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.which not in WHICH:
            raise EffectsError(f"which must be one of {', '.join(WHICH)}, got {self.which!r}")


@dataclass
class Decision:
    """One decided segment attempt, with what branching from it needs."""

    trace_id: str
    segment: int
    attempt: int
    decision: str
    reason: str
    score: float
    threshold: float | None
    start: int
    end: int
    prompt: str
    prompt_ids: list[int]
    prefix_ids: list[int]
    """The kept completion tokens before the segment (the rollback point)."""
    segment_ids: list[int]
    gold: str | None
    config: dict[str, Any]
    model: str
    train_step: int | None = None
    group: str = ""

    @property
    def key(self) -> str:
        return f"{self.trace_id}/{self.segment}/{self.attempt}"


def decisions_of(trace: Trace, which: str = "all") -> list[Decision]:
    """Every decided segment attempt of a trace, in order (``which``: all, erased, accepted)."""
    start = trace.start
    by_attempt: dict[tuple[int, int], list[int]] = {}
    for t in trace.tokens:
        by_attempt.setdefault((t.segment, t.attempt), []).append(t.token_id)
    kept: list[int] = []
    out = []
    for s in trace.segments:
        ids = by_attempt.get((s.segment, s.attempt), [])
        take = which == "all" or (which == "erased") == (s.decision == "erase")
        if take:
            out.append(Decision(
                trace_id=trace.trace_id, segment=s.segment, attempt=s.attempt, decision=s.decision,
                reason=s.reason, score=s.score, threshold=s.threshold, start=s.start, end=s.end,
                prompt=start.prompt, prompt_ids=list(start.prompt_ids), prefix_ids=kept[: s.start],
                segment_ids=list(ids), gold=start.gold, config=start.config, model=start.model,
                train_step=start.train_step, group=f"{start.batch}/{start.group_id}"))
        if s.decision != "erase":
            kept = kept[: s.start] + ids
    return out


def decision_seed(base: int, key: str) -> int:
    """The seed of a decision's first row (rows use seed, seed + 1, ...: keep rows first)."""
    return (base * 1_000_003 + zlib.crc32(key.encode())) % (2**31 - 4096)


def with_golds(decisions: Iterable[Decision], golds: Mapping[str, str] | None) -> list[Decision]:
    """Fill missing gold answers from ``golds`` (prompt text -> answer), and refuse, in one line
    that says how to give one, a decision that still has none."""
    out = []
    for d in decisions:
        gold = d.gold or (golds or {}).get(d.prompt)
        if not gold:
            raise EffectsError(
                f"trace {d.trace_id!r} has no gold answer, so no branch can be scored: type the answer in the "
                f"Generate tab's gold field before generating, or pass the problems with --data SPEC (their "
                f"answers are matched to the trace's prompt)")
        out.append(replace(d, gold=gold))
    return out


def check_model(decisions: Sequence[Decision], loaded: str, *, same: bool) -> None:
    """Refuse a trace written by another model than the one loaded, naming both (``same``: the
    caller's comparison of the two, which knows how paths are resolved)."""
    if decisions and not same:
        raise EffectsError(f"the trace was written by model {decisions[0].model!r} but {loaded!r} is loaded; "
                           f"branching must continue with the model that wrote it: load {decisions[0].model!r} "
                           f"(or pass --model with it)")


@dataclass
class Branches:
    """What the 2K continuations of one decision gave."""

    keep: list[bool]
    redraw: list[bool]
    keep_answers: list[str | None] = field(default_factory=list)
    redraw_answers: list[str | None] = field(default_factory=list)
    keep_texts: list[str] = field(default_factory=list)
    redraw_texts: list[str] = field(default_factory=list)
    tokens: int = 0
    """Tokens the continuations generated (erased ones included)."""


def branch_config(decision: Decision, cfg: EffectsConfig) -> GenerationConfig:
    """The trace's own settings, for continuations from the rollback point to the end of the
    trace's token budget; erasure as ``cfg`` asks; nothing recorded per token beyond signals."""
    base = GenerationConfig.from_dict(decision.config)
    room = base.max_new_tokens - len(decision.prefix_ids)
    return replace(base, max_new_tokens=max(1, room), record_top_k=0, share_prefix=cfg.share_prefix,
                   erase=replace(base.erase, enabled=cfg.erasure and base.erase.enabled))


def run_branches(model: Any, tokenizer: Any, decision: Decision, cfg: EffectsConfig) -> Branches:
    """Run one decision's keep and redraw branches (K rows each, one batch) and score them."""
    if decision.gold is None:
        raise EffectsError(f"trace {decision.trace_id!r} has no gold answer (see with_golds)")
    K = cfg.samples
    answer_fn, checker = for_prompt(decision.prompt)
    config = branch_config(decision, cfg)
    gen = ErasableGenerator(model, tokenizer, config, model_name=decision.model)
    keep_room = config.max_new_tokens - len(decision.segment_ids)
    ended = not decision.segment_ids or decision.segment_ids[-1] in gen.eos_ids or keep_room < 1

    def score(ids: list[int]) -> tuple[bool, str | None, str]:
        text = tokenizer.decode(decision.prefix_ids + ids, skip_special_tokens=True)
        return bool(checker(text, decision.gold)), answer_fn(text), tokenizer.decode(ids, skip_special_tokens=True)

    prompts = [decision.prompt_ids + decision.prefix_ids]
    budgets = [config.max_new_tokens]
    if not ended:  # a keep row has the budget the trace had left after the segment
        prompts.insert(0, decision.prompt_ids + decision.prefix_ids + decision.segment_ids)
        budgets.insert(0, keep_room)
    traces = gen.generate(prompts, group_size=K, seed=decision_seed(cfg.seed, decision.key), trace_prefix="branch",
                          max_new=budgets)
    if ended:  # the segment closed the trace: keeping it is the trace's own outcome, K times
        keep = [score(decision.segment_ids)] * K
    else:
        keep = [score(decision.segment_ids + t.done.token_ids) for t in traces[:K]]
    redraw = [score(t.done.token_ids) for t in traces[-K:]]
    return Branches(
        keep=[c for c, _, _ in keep], redraw=[c for c, _, _ in redraw],
        keep_answers=[a for _, a, _ in keep], redraw_answers=[a for _, a, _ in redraw],
        keep_texts=[x for _, _, x in keep], redraw_texts=[x for _, _, x in redraw],
        tokens=sum(t.done.tokens_generated for t in traces if t.done))


def effect_row(decision: Decision, branches: Branches, cfg: EffectsConfig, tokenizer: Any,
               reference: str | None = None) -> dict[str, Any]:
    """One table row: the decision, its branches' outcomes, the effect and its verdict."""
    K = cfg.samples
    ck, cr = sum(branches.keep), sum(branches.redraw)
    lo, hi = newcombe(ck, K, cr, K, cfg.confidence)
    margin = None if decision.threshold is None else decision.score - decision.threshold
    before = tokenizer.decode(decision.prefix_ids, skip_special_tokens=True)
    seg_text = tokenizer.decode(decision.segment_ids, skip_special_tokens=True)
    return {
        "key": decision.key, "trace_id": decision.trace_id, "group": decision.group,
        "train_step": decision.train_step, "segment": decision.segment, "attempt": decision.attempt,
        "decision": decision.decision, "reason": decision.reason, "score": decision.score,
        "threshold": decision.threshold, "margin": margin, "start": decision.start, "end": decision.end,
        "segment_text": seg_text, "gold": decision.gold, "samples": K,
        "keep_correct": ck, "redraw_correct": cr, "p_keep": ck / K, "p_redraw": cr / K,
        "effect": (cr - ck) / K, "ci_low": lo, "ci_high": hi, "verdict": verdict(lo, hi),
        "holds_slip": None if reference is None else holds_slip(reference, before, seg_text),
        "after_slip": None if reference is None else slipped_before(reference, before),
        "seed": decision_seed(cfg.seed, decision.key), "erasure": cfg.erasure, "confidence": cfg.confidence,
        "tokens": branches.tokens,
        "keep_answers": branches.keep_answers, "redraw_answers": branches.redraw_answers,
        "keep_each": [int(c) for c in branches.keep], "redraw_each": [int(c) for c in branches.redraw],
        "keep_texts": branches.keep_texts, "redraw_texts": branches.redraw_texts,
    }


def measure(model: Any, tokenizer: Any, decision: Decision, cfg: EffectsConfig,
            reference: str | None = None) -> dict[str, Any]:
    """Branch from one decision and return its table row (the continuations' texts included:
    the keep texts start with the segment as it was written)."""
    return effect_row(decision, run_branches(model, tokenizer, decision, cfg), cfg, tokenizer, reference)
