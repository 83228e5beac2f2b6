"""Token selection for a batch of rows, each with its own temperature, bans and random stream.

Every row owns a ``random.Random`` stream and draws exactly one uniform per sampled token, so a
row's tokens do not depend on which other rows share its batch: a batched group reproduces the rows
generated one at a time with the same seeds. (A Python stream per row costs nanoseconds per draw,
where a ``torch.Generator`` per row costs a tensor allocation each.)
"""
from __future__ import annotations

import random
from typing import Sequence

import torch


def warp_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(n, V) float32 logits -> (n, V) logits after temperature, top-k and top-p.

    temperature: (n,) strictly positive."""
    out = logits / temperature[:, None]
    if top_k > 0 and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]  # (n, 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the top token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def choose_tokens(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    generators: Sequence[random.Random],
    bans: Sequence[Sequence[int]],
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Pick one token per row. logits: (n, V) raw; temperature 0 = greedy (argmax).

    bans[i]: token ids row i may not take at this step. Returns (n,) long on logits.device."""
    n = logits.shape[0]
    work = logits.float()
    if any(bans):
        work = work.clone()
        for i, banned in enumerate(bans):
            if banned:
                work[i, list(banned)] = float("-inf")
    temps = torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=work.device)
    greedy = [t <= 0 for t in temperatures]
    if all(greedy):
        return work.argmax(-1)
    probs = torch.softmax(warp_logits(work, temps, top_k, top_p), dim=-1)  # (n, V)
    cdf = probs.cumsum(-1)  # (n, V)
    u = torch.tensor([g.random() for g in generators], device=work.device)  # (n,) in [0, 1)
    # Inverse-CDF draw: the first index whose cdf exceeds the target has positive mass (the cdf only
    # rises at such tokens). A u within 2**-24 of 1 rounds the float32 product up to the total, which
    # no cdf value exceeds; keeping the target just below the total lands on the last token with mass
    # instead of falling through to the end of the vocabulary (a banned or masked id).
    total = cdf[:, -1]  # (n,)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    picks = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    picks = picks.clamp_max(work.shape[-1] - 1)  # kept as a guard; no longer reached
    if any(greedy):
        picks = torch.where(torch.tensor(greedy, device=work.device), work.argmax(-1), picks)
    return picks[:n]
