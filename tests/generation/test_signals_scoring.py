"""Pure functions: signals, segment features, scores; each against a loop or hand computation."""
from __future__ import annotations

import math

import pytest
import torch

from e3rl_core.generation.scoring import segment_features, segment_score, trailing_mean
from e3rl_core.generation.signals import sequence_signals, token_signals


def test_token_signals_match_definitions():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.bfloat16)  # low precision in, float32 out
    ids = torch.randint(0, 11, (3, 5))
    ent, sur = token_signals(logits, ids)
    assert ent.dtype == torch.float32 and ent.shape == (3, 5)
    for b in range(3):
        for t in range(5):
            p = torch.softmax(logits[b, t].float(), -1).tolist()
            assert ent[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-5)
            assert sur[b, t].item() == pytest.approx(-math.log(p[ids[b, t]]), abs=1e-5)


def test_entropy_ignores_masked_vocabulary():
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    ent, sur = token_signals(logits, torch.tensor([1]))
    assert ent.item() == pytest.approx(math.log(2))
    assert sur.item() == pytest.approx(math.log(2))


def test_sequence_signals_shift_by_one():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 7)
    ids = torch.randint(0, 7, (2, 6))
    ent, sur = sequence_signals(logits, ids)
    e2, s2 = token_signals(logits[:, 2], ids[:, 3])
    assert torch.equal(ent[:, 2], e2) and torch.equal(sur[:, 2], s2)


def test_trailing_mean_against_loop():
    sig = [0.5, 2.0, 1.0, 4.0, 3.0]
    ctx = [10.0, 20.0, 30.0]
    for w in (1, 2, 3, 8):
        full = ctx + sig
        expect = []
        for i in range(len(ctx), len(full)):
            win = full[max(0, i - w + 1): i + 1]
            expect.append(sum(win) / len(win))
        assert trailing_mean(sig, ctx, w) == pytest.approx(expect)


def test_segment_features_and_score_by_hand():
    # window 2 with context [4.0]: smoothed = [(4+2)/2, (2+0)/2, (0+1)/2] = [3, 1, 0.5]
    f = segment_features([2.0, 0.0, 1.0], [4.0], prev_base=1.0, window=2)
    assert f.base == pytest.approx(1.5)
    assert f.max == 2.0
    assert f.delta == pytest.approx(0.5)
    assert segment_score(f, (0.5, 0.3, 0.2)) == pytest.approx(0.5 * 1.5 + 0.3 * 2.0 + 0.2 * 0.5)
    # The gradient anomaly is one-sided.
    assert segment_features([1.0], [], prev_base=5.0, window=4).delta == 0.0
    with pytest.raises(ValueError):
        segment_features([], [], 0.0, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_broken_logits_give_non_finite_entropy(bad):
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    logits[1, 1] = bad
    ent, _ = token_signals(logits, torch.tensor([0, 0]))
    assert torch.isfinite(ent[0]) and not torch.isfinite(ent[1])
    all_masked = torch.full((1, 3), float("-inf"))
    assert not torch.isfinite(token_signals(all_masked, torch.tensor([0]))[0]).any()
