"""Token-level uncertainty signals, as pure tensor functions.

Both come from the raw logits z over the vocabulary, in float32 whatever the model's dtype, in nats:
- surprisal  s_t = -log softmax(z_t)[y_t]: the "local autoregressive cross-entropy" of the sampled
  token y_t. The default decision signal: unlike entropy it differs between two retries that share
  a prefix, so it can tell a good retry from a bad one (see docs/method.md).
- entropy    H_t = -sum_v p_v log p_v: the expectation of s_t, a property of the prefix only.
"""
from __future__ import annotations

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits in any dtype -> (..., V) float32 log-probabilities."""
    return torch.log_softmax(logits.float(), dim=-1)


def entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """(..., V) float32 log-probabilities -> (...,) predictive entropy. Masked (-inf) entries add 0;
    NaN propagates (the generator relies on it to detect broken logits)."""
    p = logp.exp()
    return -torch.where(logp == float("-inf"), torch.zeros_like(p), p * logp).sum(-1)


def token_signals(logits: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and surprisal of the tokens drawn from these logits.

    logits: (..., V) raw logits; token_ids: (...,) the tokens drawn from them.
    Returns (entropy, surprisal), each (...,) float32.
    """
    logp = log_probs(logits)  # (..., V)
    surprisal = -logp.gather(-1, token_ids.unsqueeze(-1).long()).squeeze(-1)  # (...,)
    return entropy_from_logp(logp), surprisal


def sequence_signals(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced signals of a whole sequence: the reference a cached generation must match.

    logits: (B, T, V) from one forward over input_ids (B, T). Returns (entropy, surprisal), each
    (B, T-1): position t scores input_ids[:, t+1] under logits[:, t].
    """
    return token_signals(logits[:, :-1], input_ids[:, 1:])
