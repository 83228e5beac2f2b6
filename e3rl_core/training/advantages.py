"""Advantages, as pure tensor functions behind two registries (method section 6).

1. An **advantage estimator** turns the outcome rewards of a batch of groups into one advantage
   per rollout. Signature: ``(rewards (R,), group_ids (R,), scale) -> (R,)``; rewards may hold NaN
   for rollouts whose reward abstained (unparseable gold): they get advantage 0 and are left out of
   their group's statistics.
   - ``grpo``  A_i = (R_i - mean_g R) / (std_g R + eps), ``scale`` = group | batch | none as TRL's
               ``scale_rewards`` (batch: one std over the whole batch; none: Dr. GRPO, no division).
   - ``rloo``  leave-one-out baseline: A_i = R_i - mean of the other rollouts of the group.
2. A **segment allocator** spreads a rollout's advantage over its segments, so that each token gets
   its segment's advantage. Signature: ``(advantages (R,), weights (R, N), n_segments (R,), lam)
   -> (R, N)``.
   - ``uniform``           every segment gets A_i (GRPO/DAPO).
   - ``causal_attention``  A_{i,n} = A_i * ((1 - lam) + lam * hat_w_{i,n}) with hat_w = N * w / sum(w),
                           w_{i,n} the attention mass the answer segment puts on segment n
                           (``attention_weights`` computes it from eager attention maps, O(T^2);
                           ``answer_attention.answer_attention`` from hooks on an SDPA forward, only
                           for the answer segment's queries, O(answer x T)), so hat_w averages 1
                           over segments.
Standard deviations are population (ddof=0) as in the threshold policy; TRL uses ddof=1 for its
group std. This only rescales advantages by sqrt((G-1)/G) inside a group.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..registry import Registry

EPS = 1e-4  # TRL's epsilon in (R - mean) / (std + eps)

AdvantageEstimator = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
Allocator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
ADVANTAGES: Registry[AdvantageEstimator] = Registry("advantage estimator")
ALLOCATORS: Registry[Allocator] = Registry("segment allocator")
SCALES = ("group", "batch", "none")


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rollout (sum, count, sum of squares) over its group, NaN rewards left out. Each (R,)."""
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards)).double()
    n_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    s = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_ids, r)
    c = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_ids, valid.double())
    q = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_ids, r * r)
    return s[group_ids], c[group_ids], q[group_ids]


def _scale(adv: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor, scale: str) -> torch.Tensor:
    """Divide float64 advantages by the group's or the batch's reward std (+ eps), or not at all."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "group":
        s, c, q = _group_stats(rewards, group_ids)
        mean = s / c.clamp(min=1)
        return adv / ((q / c.clamp(min=1) - mean * mean).clamp(min=0).sqrt() + EPS)
    if scale == "batch":
        vals = rewards[~torch.isnan(rewards)].double()
        std = vals.std(unbiased=False) if vals.numel() else torch.tensor(0.0, dtype=torch.float64)
        return adv / (std + EPS)
    return adv


@ADVANTAGES.register("grpo")
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """rewards (R,) float with NaN = abstained, group_ids (R,) long -> advantages (R,) float32."""
    valid = ~torch.isnan(rewards)
    s, c, _ = _group_stats(rewards, group_ids)
    adv = torch.where(valid, rewards.double() - s / c.clamp(min=1), torch.zeros_like(s))
    return _scale(adv, rewards, group_ids, scale).float()


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "none") -> torch.Tensor:
    """Leave-one-out: R_i minus the mean of the group's other valid rewards (0 for a lone rollout);
    ``scale`` as for ``grpo``."""
    valid = ~torch.isnan(rewards)
    s, c, _ = _group_stats(rewards, group_ids)
    r = torch.where(valid, rewards.double(), torch.zeros_like(s))
    adv = torch.where(valid & (c > 1), r - (s - r) / (c - 1).clamp(min=1), torch.zeros_like(s))
    return _scale(adv, rewards, group_ids, scale).float()


@ALLOCATORS.register("uniform")
def uniform_allocation(advantages: torch.Tensor, weights: torch.Tensor, n_segments: torch.Tensor, lam: float) -> torch.Tensor:
    """(R,) -> (R, N): every segment of rollout i gets A_i."""
    return advantages[:, None].expand(-1, weights.shape[1]).clone()


@ALLOCATORS.register("causal_attention")
def causal_allocation(advantages: torch.Tensor, weights: torch.Tensor, n_segments: torch.Tensor, lam: float) -> torch.Tensor:
    """advantages (R,), weights (R, N) attention mass per segment (columns >= n_segments ignored),
    n_segments (R,) -> (R, N) segment advantages A_i * ((1 - lam) + lam * N_i * w / sum(w))."""
    n = weights.shape[1]
    live = torch.arange(n)[None, :] < n_segments[:, None]  # (R, N)
    w = torch.where(live, weights.double().clamp(min=0), torch.zeros_like(weights, dtype=torch.float64))
    total = w.sum(1, keepdim=True)
    # A rollout with no attention mass (or one segment) falls back to uniform: hat_w = 1.
    hat = torch.where(total > 0, n_segments[:, None].double() * w / total.clamp(min=1e-30), torch.ones_like(w))
    out = advantages[:, None].double() * ((1 - lam) + lam * hat)
    return torch.where(live, out, torch.zeros_like(out)).float()


def _answer_queries(segment_ids: torch.Tensor, n_segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, T) bool, the answer segment's tokens: the last segment of each rollout (for a thinking
    trace too: whichever segment the final answer falls in is not looked up), and (R, T, N) float
    one-hot of each completion token's segment (prompt and padding rows all zero)."""
    n_max = max(int(n_segments.max()), 1) if n_segments.numel() else 1
    last = (n_segments - 1).clamp(min=0)
    query = (segment_ids == last[:, None]) & (segment_ids >= 0)
    keys = torch.nn.functional.one_hot(segment_ids.clamp(min=0), n_max).to(torch.float32)
    return query, keys * (segment_ids >= 0)[..., None]


def attention_weights(
    attentions: Sequence[torch.Tensor], segment_ids: torch.Tensor, n_segments: torch.Tensor, layers: int
) -> torch.Tensor:
    """Attention mass the answer segment places on each segment (method section 6).

    attentions: per layer (R, H, T, T), row-normalised over keys; segment_ids: (R, T) with the
    segment index of each completion token and -1 for prompt and padding; n_segments: (R,).
    w_{i,n} = mean over the last ``layers`` layers of (max over heads of (mean over the answer
    segment's query tokens of the summed attention on segment n's key tokens)). Returns (R, N)."""
    query, keys = _answer_queries(segment_ids, n_segments)
    qn = query.float().sum(1).clamp(min=1)  # (R,)
    chosen = list(attentions)[-layers:] if layers > 0 else list(attentions)
    per_layer = []
    for att in chosen:
        mass = att.float() @ keys[:, None]  # (R, H, T, N): attention of each query on each segment
        mass = (mass * query[:, None, :, None]).sum(2) / qn[:, None, None]  # (R, H, N)
        per_layer.append(mass.max(1).values)  # (R, N)
    return torch.stack(per_layer).mean(0)
