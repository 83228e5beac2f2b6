"""Learning-curve statistics (pure functions): interpolation, seed-paired differences, the bootstrap
of sample efficiency, and the slip rate read from evaluation rows."""
from __future__ import annotations

import math

import pytest

from e3rl_core.errors import E3RLError
from e3rl_core.evaluation.curves import (mean_curve, paired_differences, quarter_means, sample_efficiency, tokens_to_reach,
                                         training_dynamics)
from e3rl_core.evaluation.slips import first_departure, slip_rate


def _run(name: str, seed: int, points: list[tuple[int, float]], kind: str = "main") -> dict:
    return {"spec": {"name": name, "seed": seed, "kind": kind}, "rollout_tokens": points[-1][0],
            "avg_at_k_off": points[-1][1], "evals": [{"rollout_tokens": t, "avg_at_k": a} for t, a in points],
            "curve": []}


BASE = {"avg_at_k_off": 0.4}


def test_tokens_to_reach_interpolates_and_says_never():
    pts = [(0, 0.4), (100, 0.5), (200, 0.6)]
    assert tokens_to_reach(pts, 0.55) == pytest.approx(150)
    assert tokens_to_reach(pts, 0.4) == 0
    assert tokens_to_reach(pts, 0.61) is None
    assert tokens_to_reach([(0, 0.5), (100, 0.45), (200, 0.6)], 0.5) == 0  # the start is enough
    assert tokens_to_reach([(0, 0.5), (100, 0.45), (200, 0.6)], 0.55) == pytest.approx(100 + 100 * 0.1 / 0.15)
    assert tokens_to_reach([(0, 0.4), (100, 0.45), (200, 0.6)], 0.5) == pytest.approx(100 + 100 * 0.05 / 0.15)


def test_mean_curve_starts_at_the_base_and_cuts_to_common_points():
    runs = [_run("A", 0, [(100, 0.5), (200, 0.6)]), _run("A", 1, [(110, 0.3), (210, 0.5)]), _run("A", 2, [(90, 0.4)])]
    curve = mean_curve(runs, BASE)
    assert len(curve) == 2  # the third run has only its first point so far
    assert curve[0] == {"tokens": 0, "mean": pytest.approx(0.4), "ci": pytest.approx(0.0), "seeds": 3}
    assert curve[1]["tokens"] == pytest.approx(100) and curve[1]["mean"] == pytest.approx(0.4)


def test_paired_differences_pair_by_seed():
    results = [_run("GRPO", 0, [(100, 0.5)]), _run("GRPO", 1, [(100, 0.6)]),
               _run("E3RL", 0, [(100, 0.55)]), _run("E3RL", 1, [(100, 0.7)]), _run("E3RL", 2, [(100, 0.9)])]
    d = paired_differences(results)["E3RL"]
    assert d["pairs"] == 2 and d["mean"] == pytest.approx(0.075)  # seed 2 has no GRPO partner


def test_sample_efficiency_ratio_and_bootstrap():
    grpo = [_run("GRPO", s, [(50, 0.45), (100, 0.5)]) for s in range(3)]
    # E3RL gets to 0.5 at 50 tokens in every seed: half the tokens, whatever the resample
    e3rl = [_run("E3RL", s, [(50, 0.5), (100, 0.6)]) for s in range(3)]
    eff = sample_efficiency(grpo + e3rl, BASE)
    assert eff["ratio"] == pytest.approx(0.5) and eff["ci_low"] == eff["ci_high"] == pytest.approx(0.5)
    assert eff["reached_share"] == 1.0
    # one E3RL seed never gets there: some resamples miss the target, the upper end is infinite
    e3rl[0] = _run("E3RL", 0, [(50, 0.3), (100, 0.35)])
    eff = sample_efficiency(grpo + e3rl, BASE, n_boot=500)
    assert math.isinf(eff["ci_high"]) and 0 < eff["reached_share"] < 1
    assert eff["ci_low"] == pytest.approx(0.5)
    assert sample_efficiency(grpo, BASE) is None  # no E3RL runs


def test_first_departure_counts_steps_to_the_first_wrong_line():
    ref = "a = 3 + 4 = 7\nb = 7 * 2 = 14\n\\boxed{14}"
    assert first_departure(ref, ref) == (None, 3)
    assert first_departure(ref, "a = 3 + 4 = 7\nb = 7 * 2 = 15\n\\boxed{15}") == (1, 2)
    assert first_departure(ref, "a = 3 + 4 = 8\nb = 8 * 2 = 16\n\\boxed{16}") == (0, 1)
    assert first_departure(ref, "a = 3 + 4 = 7") == (1, 2)  # stopping early is a slip at the missing line
    assert first_departure(ref, ref + "\nextra") == (None, 3)


def test_slip_rate_is_per_hundred_steps_attempted():
    refs = {"p": "a = 1 + 1 = 2\n\\boxed{2}", "q": "a = 2 + 2 = 4\nb = 4 + 1 = 5\n\\boxed{5}"}
    rows = [{"problem_id": "p", "text": "a = 1 + 1 = 2\n\\boxed{2}"},            # 2 steps, no slip
            {"problem_id": "q", "text": "a = 2 + 2 = 4\nb = 4 + 1 = 6\n\\boxed{6}"}]  # slips at step 2 of 3
    r = slip_rate(rows, refs)
    assert r["slips_per_100_steps"] == pytest.approx(100 * 1 / 4) and r["samples_with_slip"] == 0.5
    with pytest.raises(E3RLError, match="reference solution"):
        slip_rate([{"problem_id": "zz", "text": ""}], refs)
    with pytest.raises(E3RLError, match="no evaluation rows"):
        slip_rate([], refs)


def test_training_dynamics_by_hand():
    # 8 steps: the first quarter is steps 1-2, the last 7-8
    run = [{"step": i, "reward_mean": i / 10, "entropy_mean": 0.5} for i in range(1, 9)]
    assert quarter_means(run, "reward_mean") == pytest.approx((0.15, 0.75))
    assert quarter_means(run, "advantage_abs_mean") is None
    assert quarter_means(run[:3], "reward_mean") == pytest.approx((0.1, 0.3))  # fewer than 4 steps: one each
    other = [{**r, "reward_mean": r["reward_mean"] + 0.1} for r in run]
    dyn = training_dynamics({"GRPO": [run, other]})["GRPO"]
    assert dyn["seeds"] == 2 and dyn["reward_mean"] == pytest.approx((0.2, 0.8))
    assert dyn["entropy_mean"] == pytest.approx((0.5, 0.5)) and dyn["advantage_abs_mean"] is None
    # a key only newer logs have is averaged over the seeds that have it, and says how many
    newer = [{**r, "zero_variance_groups": 0.5} for r in run]
    dyn = training_dynamics({"GRPO": [run, newer]})["GRPO"]
    assert dyn["zero_variance_groups"] == pytest.approx((0.5, 0.5)) and dyn["zero_variance_groups_seeds"] == 1
