"""The erase/accept decision on one scored attempt: a pure function of numbers.

The generator calls ``decide`` when an attempt's segment ends; the Audit tab's what-if calls it
again over recorded attempts, so what a researcher re-judges is the rule the engine ran.

The rules, first match wins (decision, reason):

1. a restored replay                          -> forced_accept, restored
2. no threshold yet                           -> accept, warmup (or no_threshold for policy ``none``)
3. score <= threshold                         -> accept, below_threshold
4. erasure off                                -> accept, disabled
5. this segment's budget K is spent           -> forced_accept, budget
6. the trace's erasure cap is spent           -> forced_accept, trace_cap
7. otherwise                                  -> erase, above_threshold

Then, only after reason ``budget`` with ``erase.fallback == "best"`` and the trace cap not spent,
an earlier attempt with a clearly lower score replaces this one: -> erase, fallback, restoring it.

Why this order: a replay is the attempt an earlier fallback chose, so it is kept without being
judged again. Acceptance by score comes before every limit, so a
``budget`` or ``trace_cap`` forced_accept always means "would have been erased", and ``disabled``
records what erasure would have done. When both limits are spent the reason names the segment's
budget; a fallback still spends one erasure of the trace, so it is allowed only under the trace
cap. Lowest score wins the fallback; scores within ``TIE`` are float noise between equal attempts,
and a tie keeps the current attempt, which needs no replay.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

from .config import EraseConfig

TIE = 1e-6
"""Scores closer than this are equal (float noise between recomputations of the same attempt)."""


NEAR_MARGIN = 1e-3
"""Nats: a decision whose score and threshold differ by less than this was taken by float noise
(a group that writes the same line has σ ≈ 0, so its threshold is its mean)."""
NEAR_FRACTION = 0.05
"""A decision whose score is within this fraction of its threshold was taken by a hair: a
redrawn segment's score moves by more than that from sample to sample."""


def margin(score: float, threshold: float | None) -> float | None:
    """How far the score is over (+) or under (-) its threshold; None without a threshold."""
    return None if threshold is None else score - threshold


def near_threshold(score: float, threshold: float | None) -> bool:
    """A decision taken by a negligible margin: |U - Θ| under ``NEAR_FRACTION`` of Θ or under
    ``NEAR_MARGIN`` nats, whichever is larger. The views mark such decisions; the decision-effects
    audit counts the erasures under ``NEAR_MARGIN`` apart."""
    if threshold is None:
        return False
    return abs(score - threshold) < max(NEAR_FRACTION * abs(threshold), NEAR_MARGIN)


class Scored(Protocol):
    """An attempt as the rule sees it: its score and its number within the segment."""

    @property
    def score(self) -> float: ...

    @property
    def attempt(self) -> int: ...


class ScoredAttempt(NamedTuple):
    """A plain ``Scored`` for callers that hold no token ids (the audit's what-if, tests)."""

    score: float
    attempt: int


class Decision(NamedTuple):
    decision: str
    """accept | erase | forced_accept"""
    reason: str
    """restored | warmup | no_threshold | below_threshold | disabled | budget | trace_cap |
    above_threshold | fallback"""
    restore: int | None = None
    """With reason ``fallback``: the attempt number to replay in place of this one."""


def decide(
    score: float,
    threshold: float | None,
    *,
    policy: str,
    attempts: Sequence[Scored],
    segment_erasures: int,
    trace_erasures: int,
    restored: bool,
    erase: EraseConfig,
    cap: int,
) -> Decision:
    """Decide one attempt (the rules and their order are in the module docstring).

    attempts: every attempt of this segment so far, the current one included (it has the highest
    number). segment_erasures / trace_erasures: erasures already spent on this segment / trace.
    policy: the threshold policy's name, which tells warm-up from "no threshold at all".
    cap: the trace's erasure cap (``GenerationConfig.trace_erase_cap``)."""
    if restored:
        return Decision("forced_accept", "restored")
    if threshold is None:
        return Decision("accept", "no_threshold" if policy == "none" else "warmup")
    if not score > threshold:
        return Decision("accept", "below_threshold")
    if not erase.enabled:
        return Decision("accept", "disabled")
    if segment_erasures >= erase.budget:
        if erase.fallback == "best" and trace_erasures < cap:
            best = _best(attempts)
            if best is not None and best.score < score - TIE:
                return Decision("erase", "fallback", best.attempt)
        return Decision("forced_accept", "budget")
    if trace_erasures >= cap:
        return Decision("forced_accept", "trace_cap")
    return Decision("erase", "above_threshold")


def _best(attempts: Sequence[Scored]) -> Scored | None:
    """The lowest-scored attempt; on equal scores the later one (the current attempt wins ties)."""
    return min(attempts, key=lambda a: (a.score, -a.attempt), default=None)
