"""Advantage estimators, segment allocators and loss aggregations against loop references."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from e3rl_core.errors import ConfigError
from e3rl_core.training.advantages import ADVANTAGES, ALLOCATORS, EPS, attention_weights
from e3rl_core.training.losses import LOSSES, LossNorm, clipped_surrogate, token_logps


def _rewards():
    # three groups of 4; group 1 all equal (no signal), one abstained reward in group 2
    r = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 0, float("nan"), 1, 1], dtype=torch.float32)
    g = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    return r, g


def _loop_grpo(r, g, scale):
    out = []
    valid_all = [x for x in r.tolist() if not math.isnan(x)]
    for i, x in enumerate(r.tolist()):
        if math.isnan(x):
            out.append(0.0)
            continue
        grp = [y for y, gi in zip(r.tolist(), g.tolist()) if gi == g[i] and not math.isnan(y)]
        a = x - sum(grp) / len(grp)
        if scale == "group":
            a /= statistics.pstdev(grp) + EPS
        elif scale == "batch":
            a /= statistics.pstdev(valid_all) + EPS
        out.append(a)
    return torch.tensor(out)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_loop(scale):
    r, g = _rewards()
    got = ADVANTAGES.get("grpo")(r, g, scale)
    assert torch.allclose(got, _loop_grpo(r, g, scale), atol=1e-5)
    assert got[9] == 0  # abstained
    assert torch.all(got[4:8] == 0)  # a group without reward variance carries no signal


def test_grpo_by_hand():
    # rewards 1,0,0,0: mean 0.25, pstdev sqrt(3)/4
    got = ADVANTAGES.get("grpo")(torch.tensor([1.0, 0, 0, 0]), torch.zeros(4, dtype=torch.long), "group")
    sd = math.sqrt(3) / 4
    assert got.tolist() == pytest.approx([0.75 / (sd + EPS)] + [-0.25 / (sd + EPS)] * 3, rel=1e-6)


def test_rloo_matches_loop():
    r, g = _rewards()
    got = ADVANTAGES.get("rloo")(r, g, "none")
    want = []
    for i, x in enumerate(r.tolist()):
        others = [y for j, (y, gj) in enumerate(zip(r.tolist(), g.tolist())) if j != i and gj == g[i] and not math.isnan(y)]
        want.append(0.0 if math.isnan(x) else x - sum(others) / len(others))
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_unknown_estimator_lists_names():
    with pytest.raises(ConfigError, match="grpo"):
        ADVANTAGES.get("ppo")


def test_uniform_allocation():
    adv = torch.tensor([1.0, -2.0])
    out = ALLOCATORS.get("uniform")(adv, torch.rand(2, 3), torch.tensor([3, 2]), 0.5)
    assert out.tolist() == [[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]]


def test_causal_allocation_matches_loop():
    torch.manual_seed(0)
    adv = torch.tensor([1.5, -0.5, 2.0, 0.7])
    w = torch.rand(4, 5)
    n = torch.tensor([5, 3, 1, 4])
    lam = 0.5
    got = ALLOCATORS.get("causal_attention")(adv, w, n, lam)
    for i in range(4):
        ni = int(n[i])
        total = float(w[i, :ni].sum())
        for k in range(5):
            want = adv[i] * ((1 - lam) + lam * ni * float(w[i, k]) / total) if k < ni else 0.0
            assert float(got[i, k]) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
        # hat_w averages 1: the rollout's total advantage is preserved
        assert float(got[i, :ni].sum()) == pytest.approx(ni * float(adv[i]), rel=1e-5)
    one = ALLOCATORS.get("causal_attention")(adv[2:3], w[2:3], n[2:3], lam)
    assert float(one[0, 0]) == pytest.approx(2.0)  # a single segment keeps A_i


def test_attention_weights_match_loop():
    torch.manual_seed(1)
    R, H, T, L = 2, 3, 9, 3
    atts = [torch.softmax(torch.randn(R, H, T, T), -1) for _ in range(L)]
    seg = torch.tensor([[-1, -1, 0, 0, 1, 1, 1, 2, 2], [-1, 0, 0, 0, 1, 1, -1, -1, -1]])
    n = torch.tensor([3, 2])
    got = attention_weights(atts, seg, n, layers=2)
    for i in range(R):
        last = int(n[i]) - 1
        queries = [t for t in range(T) if seg[i, t] == last]
        for s in range(int(n[i])):
            keys = [t for t in range(T) if seg[i, t] == s]
            per_layer = []
            for a in atts[-2:]:
                per_head = [sum(sum(float(a[i, h, q, k]) for k in keys) for q in queries) / len(queries) for h in range(H)]
                per_layer.append(max(per_head))
            assert float(got[i, s]) == pytest.approx(sum(per_layer) / 2, rel=1e-5)


def _loop_aggregate(kind, per_tok, mask, norm):
    seqs = []
    total = 0.0
    for i in range(per_tok.shape[0]):
        s = sum(float(per_tok[i, t]) * float(mask[i, t]) for t in range(per_tok.shape[1]))
        seqs.append(s / max(float(mask[i].sum()), 1))
        total += s
    if kind == "grpo":
        return sum(seqs) / norm.sequences
    if kind == "dr_grpo":
        return total / (norm.sequences * norm.max_completion_length)
    return total / norm.tokens


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo"])
def test_aggregations_match_loop_and_split_additively(kind):
    torch.manual_seed(2)
    per_tok = torch.randn(6, 7)
    mask = (torch.rand(6, 7) > 0.3).float()
    norm = LossNorm(sequences=6, tokens=int(mask.sum()), max_completion_length=7)
    agg = LOSSES.get(kind)
    whole = agg(per_tok, mask, norm)
    assert float(whole) == pytest.approx(_loop_aggregate(kind, per_tok, mask, norm), rel=1e-5)
    # micro-batches / processes with the global normaliser sum to the whole-batch loss
    parts = agg(per_tok[:2], mask[:2], norm) + agg(per_tok[2:], mask[2:], norm)
    assert float(parts) == pytest.approx(float(whole), rel=1e-5)


def test_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))  # ratios against old logp 0
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, st = clipped_surrogate(logp, old, adv, epsilon_low=0.2, epsilon_high=0.28)
    # ratio 1.5, A>0 -> min(1.5, 1.28) = 1.28; ratio 0.5, A<0 -> min(-0.5, -0.8) = -0.8;
    # ratio 1.1 inside; ratio 0.7, A<0 -> min(-0.7, -0.8) = -0.8
    assert loss.tolist()[0] == pytest.approx([-1.28, 0.8, -1.1, 0.8], rel=1e-5)
    assert st.high_clipped.tolist() == [[True, False, False, False]]
    assert st.low_clipped.tolist() == [[False, True, False, True]]


def test_kl_k3_and_beta():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    loss0, _ = clipped_surrogate(logp, logp, torch.zeros(1, 2), epsilon_low=0.2, epsilon_high=0.2)
    loss, st = clipped_surrogate(logp, logp, torch.zeros(1, 2), epsilon_low=0.2, epsilon_high=0.2, ref_logp=ref, beta=0.1)
    d = ref - logp
    assert torch.allclose(st.kl, torch.exp(d) - d - 1)
    assert torch.allclose(loss - loss0, 0.1 * st.kl)
    with pytest.raises(ValueError):
        clipped_surrogate(logp, logp, torch.zeros(1, 2), epsilon_low=0.2, epsilon_high=0.2, beta=0.1)


def test_token_logps_match_manual_with_temperature():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    got = token_logps(logits, ids, temperature=0.7)
    assert torch.all(got[:, 0] == 0)
    for i in range(2):
        for t in range(1, 5):
            want = torch.log_softmax(logits[i, t - 1] / 0.7, -1)[ids[i, t]]
            assert float(got[i, t]) == pytest.approx(float(want), abs=1e-5)
