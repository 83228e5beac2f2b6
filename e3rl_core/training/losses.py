"""Policy-gradient loss: per-token log-probs, the clipped surrogate, KL, and aggregation registry.

All pure tensor functions. Shapes: R rollouts, T sequence positions; ``mask`` (R, T) is 1 on
completion tokens that are trained on (kept, post-erasure tokens; never erased ones, prompt or pad).

Aggregations (``loss_type``, TRL's names and semantics) reduce a per-token loss to a scalar. They
take *global* normalisers (``LossNorm``), so that summing the per-process losses of a data-parallel
run (and of micro-batches) gives exactly the loss of one process holding the whole batch:
- ``grpo``     mean over sequences of each sequence's token mean (the GRPO paper; length-biased).
- ``dr_grpo``  sum over tokens / (sequences x max_completion_length) (Dr. GRPO; no length bias).
- ``dapo``     sum over tokens / tokens in the batch (token-level mean; DAPO, TRL's default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..registry import Registry


@dataclass(frozen=True)
class LossNorm:
    """Global counts over the whole step's batch (all processes, all micro-batches)."""

    sequences: int
    tokens: int
    max_completion_length: int


Aggregation = Callable[[torch.Tensor, torch.Tensor, LossNorm], torch.Tensor]
LOSSES: Registry[Aggregation] = Registry("loss type")


@LOSSES.register("grpo")
def grpo_aggregate(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    """(R, T), (R, T) -> scalar: sum_i (sum_t l m / sum_t m) / sequences."""
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_seq.sum() / max(norm.sequences, 1)


@LOSSES.register("dr_grpo")
def dr_grpo_aggregate(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    """(R, T), (R, T) -> scalar: sum l m / (sequences * max_completion_length)."""
    return (per_token * mask).sum() / max(norm.sequences * norm.max_completion_length, 1)


@LOSSES.register("dapo")
def dapo_aggregate(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    """(R, T), (R, T) -> scalar: sum l m / tokens."""
    return (per_token * mask).sum() / max(norm.tokens, 1)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (R, T, V) from a forward over input_ids (R, T) -> (R, T) float32 log-prob of each token
    under the logits one position earlier (column 0 is 0). Logits are divided by the sampling
    temperature, as TRL does, so the ratio compares the distributions tokens were drawn from."""
    logits = logits[:, :-1].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (R, T-1)
    return torch.nn.functional.pad(logp, (1, 0))


@dataclass
class SurrogateStats:
    """Per-token indicators for logging (R, T) bool, plus the KL term (R, T) float (0 if beta = 0)."""

    low_clipped: torch.Tensor
    high_clipped: torch.Tensor
    kl: torch.Tensor


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, SurrogateStats]:
    """PPO/GRPO clipped surrogate with clip-higher, per token. All inputs (R, T).

    loss_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) + beta * KL_t, with
    r_t = exp(logp - old_logp) and KL_t the k3 estimator exp(ref - logp) - (ref - logp) - 1."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = torch.zeros_like(logp)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probs")
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        loss = loss + beta * kl
    stats = SurrogateStats(
        low_clipped=(ratio < 1 - epsilon_low) & (advantages < 0),
        high_clipped=(ratio > 1 + epsilon_high) & (advantages > 0),
        kl=kl.detach(),
    )
    return loss, stats
