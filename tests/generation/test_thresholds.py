"""Threshold arithmetic against hand-computed values, and the registries' errors."""
from __future__ import annotations

import math

import pytest

from e3rl_core.errors import ConfigError
from e3rl_core.generation.config import SegmentConfig, ThresholdConfig
from e3rl_core.generation.segmenter import make_segmenter
from e3rl_core.generation.thresholds import POLICIES, make_policy, mean_std, quantile


def test_e3rl_group_baseline_penalty_history():
    cfg = ThresholdConfig(policy="e3rl", kappa=1.0, penalty_lambda=0.3, min_group=4)
    pol = make_policy(cfg)
    for row, s in enumerate([1.0, 2.0, 3.0, 4.0]):
        pol.observe_first(row, 0, s)
    # mu = 2.5, population sigma = sqrt(1.25)
    beta = 2.5 + math.sqrt(1.25)
    parts = pol.parts(0, 0, 0)
    assert parts.baseline == pytest.approx(beta)
    assert parts.penalty == 1.0 and parts.history == 1.0
    assert parts.threshold == pytest.approx(beta)
    assert pol.parts(0, 0, 2).penalty == pytest.approx(math.exp(0.6))
    assert pol.parts(0, 0, 2).threshold == pytest.approx(beta * math.exp(0.6))
    # History: row 0 kept mean 2.0, group mean (2*2 + 4*2) / 4 = 3.0 -> phi = 0.667 -> clipped to 0.8
    pol.observe_kept(0, [2.0, 2.0])
    pol.observe_kept(1, [4.0, 4.0])
    assert pol.parts(0, 0, 0).history == pytest.approx(0.8)
    assert pol.parts(1, 0, 0).history == pytest.approx(4.0 / 3.0 if 4.0 / 3.0 <= 1.25 else 1.25)


def test_e3rl_history_with_reference():
    pol = make_policy(ThresholdConfig(history_reference=2.0, history_clip=(0.5, 2.0)))
    pol.observe_kept(0, [3.0])
    assert pol.parts(0, 0, 0).history == pytest.approx(1.5)


def test_e3rl_single_rollout_warmup_then_moving_average_of_baselines():
    cfg = ThresholdConfig(policy="e3rl", warmup_segments=2, ema_momentum=0.9, kappa=1.0)
    pol = make_policy(cfg)
    pol.observe_first(0, 0, 1.0)
    assert pol.parts(0, 0, 0).baseline is None  # warm-up: no segment seen before segment 0
    pol.observe_first(0, 1, 3.0)
    assert pol.parts(0, 1, 0).baseline is None  # one segment seen, two needed
    pol.observe_first(0, 2, 0.0)
    # A lone rollout's baseline is its score: EMA of 1.0 then 3.0 = 0.9*1 + 0.1*3 = 1.2
    assert pol.parts(0, 2, 0).baseline == pytest.approx(1.2)
    # The same segment keeps its baseline for every attempt.
    assert pol.parts(0, 2, 3).baseline == pytest.approx(1.2)


def test_e3rl_single_rollout_score_stats_fallback():
    cfg = ThresholdConfig(policy="e3rl", warmup_segments=2, ema_momentum=0.9, kappa=1.0, fallback="score_stats")
    pol = make_policy(cfg)
    for n, s in enumerate([1.0, 3.0, 0.0]):
        pol.observe_first(0, n, s)
    # EW mean after 1.0, 3.0: 1 + 0.1*2 = 1.2; EW variance 0.9 * (0 + 0.1*4) = 0.36
    assert pol.parts(0, 2, 0).baseline == pytest.approx(1.2 + 0.6)


def test_e3rl_small_group_falls_back_to_moving_average_of_group_baselines():
    cfg = ThresholdConfig(policy="e3rl", min_group=4, warmup_segments=1, ema_momentum=0.5, kappa=1.0)
    pol = make_policy(cfg)
    for row, s in enumerate([1.0, 1.0, 3.0, 3.0]):
        pol.observe_first(row, 0, s)
    assert pol.parts(0, 0, 0).baseline == pytest.approx(3.0)  # mu 2, sigma 1
    for row, s in enumerate([5.0, 5.0, 7.0, 7.0]):
        pol.observe_first(row, 1, s)
    assert pol.parts(0, 1, 0).baseline == pytest.approx(7.0)
    pol.observe_first(0, 2, 10.0)  # two live rollouts left: fallback to the EMA of 3.0 and 7.0
    pol.observe_first(1, 2, 20.0)
    assert pol.parts(0, 2, 0).baseline == pytest.approx(0.5 * 3.0 + 0.5 * 7.0)


def test_warmup_counts_segments_not_scores():
    pol = make_policy(ThresholdConfig(policy="e3rl", warmup_segments=2, min_group=4))
    for row in range(2):  # G = 2 < min_group: two scores per segment
        pol.observe_first(row, 0, 1.0)
        pol.observe_first(row, 1, 1.0)
    assert pol.parts(0, 0, 0).baseline is None
    assert pol.parts(0, 1, 0).baseline is None  # only one segment folded in so far
    pol.observe_first(0, 2, 1.0)
    assert pol.parts(0, 2, 0).baseline is not None


def test_fixed_zscore_quantile_none():
    fixed = make_policy(ThresholdConfig(policy="fixed", value=1.5))
    assert fixed.parts(0, 3, 4).threshold == 1.5
    z = make_policy(ThresholdConfig(policy="zscore", z=2.0, warmup_segments=2, penalty_lambda=0.5))
    z.observe_first(0, 0, 1.0)
    assert z.parts(0, 1, 0).baseline is None
    z.observe_first(0, 1, 3.0)
    z.observe_first(1, 1, 100.0)  # another trace: not in this trace's statistics
    z.observe_first(0, 2, 9.0)  # the segment being judged: not in its own baseline
    assert z.parts(0, 2, 1).threshold == pytest.approx((2.0 + 2.0 * 1.0) * math.exp(0.5))
    q = make_policy(ThresholdConfig(policy="quantile", quantile=0.5, warmup_segments=2, penalty_lambda=0.0))
    for row, s in enumerate([1.0, 2.0, 4.0]):
        q.observe_first(row, 0, s)
    assert q.parts(0, 1, 0).threshold == pytest.approx(2.0)
    none = make_policy(ThresholdConfig(policy="none"))
    assert none.parts(0, 5, 0).threshold is None


def test_helpers():
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert quantile([5.0], 0.9) == 5.0


def test_unknown_names_list_valid_ones():
    with pytest.raises(ConfigError, match="choose one of: e3rl, fixed, none, quantile, zscore"):
        make_policy(ThresholdConfig(policy="magic"))
    with pytest.raises(ConfigError, match="choose one of: delimiter, fixed"):
        make_segmenter(SegmentConfig(mode="sentences"))
    assert POLICIES.names() == ["e3rl", "fixed", "none", "quantile", "zscore"]
