"""choose_tokens and warp_logits against loop references: greedy, temperature, top-k, top-p, bans,
and per-row random streams that make a row's draws independent of its batch."""
from __future__ import annotations

import math
import random

import pytest
import torch

from e3rl_core.generation.sampling import choose_tokens, warp_logits

V = 12


def _logits(n: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def _rngs(seeds) -> list[random.Random]:
    return [random.Random(s) for s in seeds]


class _Fixed(random.Random):
    """A stream that always draws ``u``: pins the inverse-CDF draw to an edge."""

    def __init__(self, u: float) -> None:
        super().__init__(0)
        self.u = u

    def random(self) -> float:
        return self.u


def _warp_reference(row: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """One row, plain Python: scale, keep the top k (ties with the k-th kept), then keep tokens in
    descending order while the mass before them is below top_p."""
    out = [x / temperature for x in row]
    if 0 < top_k < len(out):
        kth = sorted(out, reverse=True)[top_k - 1]
        out = [x if x >= kth else -math.inf for x in out]
    if top_p < 1.0:
        z = sum(math.exp(x) for x in out if x > -math.inf)
        mass = 0.0
        for i in sorted(range(len(out)), key=lambda i: -out[i]):
            if mass >= top_p:
                out[i] = -math.inf
            elif out[i] > -math.inf:
                mass += math.exp(out[i]) / z
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.7), (4, 0.5), (0, 0.05), (V, 1.0), (50, 0.999)])
def test_warp_logits_matches_a_loop_reference(top_k, top_p):
    logits = _logits(6, seed=top_k)
    temps = torch.tensor([0.3, 0.7, 1.0, 1.5, 2.0, 5.0])
    out = warp_logits(logits, temps, top_k, top_p)
    for i in range(6):
        ref = _warp_reference(logits[i].tolist(), float(temps[i]), top_k, top_p)
        kept = [x > -math.inf for x in ref]
        assert torch.isfinite(out[i]).tolist() == kept
        torch.testing.assert_close(out[i][torch.tensor(kept)], torch.tensor([x for x in ref if x > -math.inf]))
        assert any(kept)  # the top token always survives
        if top_k:
            assert sum(kept) <= top_k


def test_greedy_is_argmax_and_draws_nothing():
    logits = _logits(5)
    rngs = _rngs(range(5))
    states = [g.getstate() for g in rngs]
    picks = choose_tokens(logits, [0.0] * 5, rngs, [[]] * 5)
    assert picks.tolist() == logits.argmax(-1).tolist()
    assert picks.dtype == torch.long and picks.shape == (5,)
    assert [g.getstate() for g in rngs] == states
    # Top-k and top-p cannot move an argmax.
    assert choose_tokens(logits, [0.0] * 5, rngs, [[]] * 5, top_k=2, top_p=0.1).tolist() == picks.tolist()


def test_mixed_greedy_and_sampled_rows():
    logits = _logits(4, seed=3)
    temps = [0.0, 1.0, 0.0, 1.0]
    picks = choose_tokens(logits, temps, _rngs([7, 8, 9, 10]), [[]] * 4)
    assert picks[0] == logits[0].argmax() and picks[2] == logits[2].argmax()
    # The sampled rows draw what they would alone.
    for i in (1, 3):
        alone = choose_tokens(logits[i : i + 1], [1.0], _rngs([7 + i]), [[]])
        assert picks[i] == alone[0]


def _draw_reference(row: torch.Tensor, temperature: float, u: float, top_k: int, top_p: float) -> int:
    """Inverse CDF by a loop: the first token whose cumulative probability exceeds u."""
    warped = _warp_reference(row.tolist(), temperature, top_k, top_p)
    m = max(warped)
    weights = [math.exp(x - m) if x > -math.inf else 0.0 for x in warped]
    target, acc = u * sum(weights), 0.0
    for i, w in enumerate(weights):
        acc += w
        if acc > target:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (3, 0.9)])
def test_sampling_is_the_inverse_cdf_of_the_warped_distribution(top_k, top_p):
    n = 64
    logits = _logits(n, seed=11)
    temps = [0.5 + (i % 4) * 0.5 for i in range(n)]
    seeds = range(100, 100 + n)
    picks = choose_tokens(logits, temps, _rngs(seeds), [[]] * n, top_k=top_k, top_p=top_p)
    # Each row draws exactly one uniform from its own stream.
    us = [random.Random(s).random() for s in seeds]
    expected = [_draw_reference(logits[i], temps[i], us[i], top_k, top_p) for i in range(n)]
    assert picks.tolist() == expected


def test_sample_frequencies_follow_softmax():
    n = 20000
    row = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    logits = row.expand(n, -1)
    for temperature in (1.0, 0.5):
        picks = choose_tokens(logits, [temperature] * n, _rngs(range(n)), [[]] * n)
        freq = torch.bincount(picks, minlength=5).float() / n
        expected = torch.softmax(row / temperature, -1)
        # 4 standard errors of a proportion at n = 20000 is under 0.015.
        torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def _allowed(logits: torch.Tensor, banned: list[int], top_k: int, top_p: float) -> list[int]:
    masked = logits.clone()
    masked[banned] = -math.inf
    warped = warp_logits(masked[None], torch.tensor([1.0]), top_k, top_p)[0]
    return torch.isfinite(warped).nonzero()[:, 0].tolist()


EDGE_BANS = [[1], [], [V - 1]]


@pytest.mark.parametrize("u", [0.0, 1e-12, 0.5, 0.9999, 1.0 - 2.0**-23])
def test_draws_stay_inside_the_kept_set_at_the_edges_of_u(u):
    logits = _logits(3, seed=5)
    logits[:, 0] = -math.inf  # token 0 has no mass: u = 0 must not land on it
    picks = choose_tokens(logits, [1.0] * 3, [_Fixed(u)] * 3, EDGE_BANS, top_k=4, top_p=0.9).tolist()
    for i, pick in enumerate(picks):
        allowed = _allowed(logits[i], EDGE_BANS[i], 4, 0.9)
        assert pick in allowed
        if u == 0.0:
            assert pick == allowed[0]  # the first token with mass, in vocabulary order
        if u > 0.999:
            assert pick == allowed[-1]


def test_a_draw_just_below_one_never_takes_a_token_without_mass():
    # u within ~2**-24 of 1 rounds u * total up to the total in float32; the pick must still be a
    # token with mass, not the last vocabulary id.
    logits = _logits(1, seed=5)
    logits[0, V - 1] = logits.max() + 1  # the last id would be the favourite, but it is banned
    pick = choose_tokens(logits, [1.0], [_Fixed(1.0 - 2.0**-53)], [[V - 1]])
    assert int(pick[0]) in _allowed(logits[0], [V - 1], 0, 1.0)


def test_bans_exclude_tokens_for_greedy_and_sampled_rows():
    logits = _logits(4, seed=2)
    best = logits.argmax(-1)
    bans = [[int(best[0])], [], [int(best[2]), 3], list(range(V - 1))]
    greedy = choose_tokens(logits, [0.0] * 4, _rngs(range(4)), bans)
    for i in range(4):
        masked = logits[i].clone()
        masked[bans[i]] = -math.inf
        assert greedy[i] == masked.argmax()  # the best token not banned
    assert greedy[3] == V - 1  # everything else banned
    assert torch.equal(logits.argmax(-1), best)  # the caller's logits are untouched

    n = 500
    many = _logits(1, seed=4).expand(n, -1)
    banned = [0, 1, 2, int(many[0].argmax())]
    picks = choose_tokens(many, [1.0] * n, _rngs(range(n)), [banned] * n)
    assert not set(picks.tolist()) & set(banned)
    assert len(set(picks.tolist())) > 3  # still sampling among the rest


def test_a_rows_draws_do_not_depend_on_its_batch():
    steps = 30
    alone_rng, batched_rngs = random.Random(42), _rngs([1, 2, 42, 3])
    for step in range(steps):
        logits = _logits(4, seed=1000 + step)
        other_temps = [0.7, 1.3, 1.0, 0.0]
        batched = choose_tokens(logits, other_temps, batched_rngs, [[], [5], [], []], top_k=6)
        alone = choose_tokens(logits[2:3], [1.0], [alone_rng], [[]], top_k=6)
        assert batched[2] == alone[0], step


def test_same_seed_same_draws_and_different_seeds_differ():
    logits = _logits(1, seed=9, scale=0.5).expand(50, -1)  # near uniform: draws vary a lot

    def run(seed: int) -> list[int]:
        rng = random.Random(seed)
        return [int(choose_tokens(logits[:1], [1.0], [rng], [[]])[0]) for _ in range(50)]

    assert run(0) == run(0)
    assert run(0) != run(1)
    # A batch of identical rows with one seed each reproduces the one-row streams' first draws.
    firsts = choose_tokens(logits[:8], [1.0] * 8, _rngs(range(8)), [[]] * 8).tolist()
    assert firsts == [run(s)[0] for s in range(8)]
