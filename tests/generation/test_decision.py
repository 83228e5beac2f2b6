"""The erase/accept rule on its own: every reason, the order of the rules, the fallback's choice."""
from __future__ import annotations

import pytest

from e3rl_core.generation.config import EraseConfig
from e3rl_core.generation.decision import TIE, Decision, ScoredAttempt, decide


def judge(score=2.0, threshold=1.0, *, tried=(), policy="fixed", seg=0, total=0, restored=False, cap=10, **erase):
    """Decide attempt ``len(tried)`` of a segment whose earlier attempts scored ``tried``."""
    attempts = [ScoredAttempt(s, a) for a, s in enumerate(tried)] + [ScoredAttempt(score, len(tried))]
    return decide(score, threshold, policy=policy, attempts=attempts, segment_erasures=seg, trace_erasures=total,
                  restored=restored, erase=EraseConfig(**erase), cap=cap)


@pytest.mark.parametrize("kwargs, expected", [
    ({"restored": True, "threshold": None}, ("forced_accept", "restored")),
    ({"threshold": None, "policy": "e3rl"}, ("accept", "warmup")),
    ({"threshold": None, "policy": "none"}, ("accept", "no_threshold")),
    ({"score": 0.5}, ("accept", "below_threshold")),
    ({"score": 1.0}, ("accept", "below_threshold")),  # erase only strictly above
    ({"enabled": False}, ("accept", "disabled")),
    ({"seg": 1, "budget": 1, "fallback": "last", "tried": [0.5]}, ("forced_accept", "budget")),
    ({"total": 3, "cap": 3}, ("forced_accept", "trace_cap")),
    ({}, ("erase", "above_threshold")),
    ({"seg": 1, "budget": 1, "tried": [0.5]}, ("erase", "fallback")),
])
def test_every_reason_is_reachable(kwargs, expected):
    d = judge(**kwargs)
    assert isinstance(d, Decision) and (d.decision, d.reason) == expected
    assert (d.restore is not None) == (d.reason == "fallback")


def test_order_of_the_rules():
    # a replay is never judged again, even far above the threshold with every limit spent
    assert judge(score=9.0, restored=True, seg=9, total=9, cap=0).reason == "restored"
    # a low score is accepted as such, whatever the limits and the switch say
    assert judge(score=0.5, enabled=False, seg=9, total=9, cap=0).reason == "below_threshold"
    # erasure off records what it would have done, before any limit
    assert judge(enabled=False, seg=9, total=9, cap=0).reason == "disabled"
    # both limits spent: the segment's budget is named
    assert judge(seg=5, budget=5, total=10, cap=10, tried=[3.0] * 5).reason == "budget"


def test_fallback_restores_the_lowest_scored_attempt():
    d = judge(score=2.0, seg=3, budget=3, tried=[1.5, 0.4, 0.9])
    assert d == Decision("erase", "fallback", 1)


def test_fallback_needs_the_trace_cap_and_policy_best():
    tried = [0.4]
    assert judge(seg=1, budget=1, tried=tried, total=2, cap=2) == Decision("forced_accept", "budget")
    assert judge(seg=1, budget=1, tried=tried, fallback="last") == Decision("forced_accept", "budget")
    assert judge(seg=1, budget=1, tried=tried, total=1, cap=2).reason == "fallback"


def test_budget_zero_never_erases():
    assert judge(budget=0) == Decision("forced_accept", "budget")  # no earlier attempt to fall back to


@pytest.mark.parametrize("earlier, falls_back", [
    (2.0, False),  # equal: the current attempt stays, no replay needed
    (2.0 - TIE / 2, False),  # within float noise: a tie
    (2.0 + 1.0, False),  # the current attempt is the best
    (2.0 - 10 * TIE, True),  # clearly lower
])
def test_ties_keep_the_current_attempt(earlier, falls_back):
    d = judge(score=2.0, seg=1, budget=1, tried=[earlier])
    assert (d.reason == "fallback") == falls_back
    assert d.restore == (0 if falls_back else None)


def test_equal_lowest_earlier_attempts_restore_the_later_one():
    assert judge(score=2.0, seg=3, budget=3, tried=[0.5, 1.0, 0.5]).restore == 2


def test_decisions_are_pure_values():
    a, b = judge(seg=1, budget=1, tried=[0.5]), judge(seg=1, budget=1, tried=[0.5])
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.reason = "x"  # type: ignore[misc]
