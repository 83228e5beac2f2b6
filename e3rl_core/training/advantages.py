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
                           ``answer_attention`` from hooks on an SDPA forward, only for the answer
                           segment's queries, O(answer x T)), so hat_w averages 1 over segments.
Standard deviations are population (ddof=0) as in the threshold policy; TRL uses ddof=1 for its
group std. This only rescales advantages by sqrt((G-1)/G) inside a group.
"""
from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import ConfigError
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


# ---------------------------------------------------------------- linear-memory causal allocation
# ``attention_weights`` needs every query's full attention row: an eager forward with
# ``output_attentions`` materialises (R, H, T, T) per layer. Only the answer segment's queries
# matter, so the linear path hooks the last ``layers`` attention modules of the ordinary (SDPA)
# forward, recomputes their queries and keys from the module's own inputs (projections, Qwen3's
# q_norm/k_norm, the model's RoPE and ``scaling``, GQA) and reduces the answer rows' attention to
# per-segment mass inside the hook: O(answer rows x T) memory, nothing kept but (R, N) per layer.

LINEAR_MODEL_TYPES = ("llama", "qwen2", "qwen3")
"""Model types whose attention the linear path reproduces (tested against the eager reference)."""
EAGER_FALLBACK = "--set attention_impl=eager"
QUERY_CHUNK = 256  # answer queries per attention block: bounds the (R, H, chunk, T) probabilities


class UnsupportedAttentionError(ConfigError):
    """The linear causal allocation cannot reproduce this model's attention; the eager path can."""


def _unsupported(model_type: str, why: str) -> UnsupportedAttentionError:
    return UnsupportedAttentionError(
        f"allocation=causal_attention: the linear-memory attention path does not support this model "
        f"({model_type}: {why}); rerun with {EAGER_FALLBACK} (O(T^2) memory) or allocation=uniform")


def attention_modules(model: Any, layers: int) -> list[Any]:
    """The attention modules of the last ``layers`` decoder layers (all if 0 or fewer), checked to
    have the layout the linear path reproduces; raises ``UnsupportedAttentionError`` naming the
    eager fallback otherwise (before anything runs)."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", type(model).__name__))
    if model_type not in LINEAR_MODEL_TYPES:
        raise _unsupported(model_type, f"model type not known to work; known: {', '.join(LINEAR_MODEL_TYPES)}")
    decoder = getattr(getattr(model, "model", None), "layers", None)
    if decoder is None or len(decoder) == 0:
        raise _unsupported(model_type, "no decoder layers found at model.model.layers")
    chosen = list(decoder)[-layers:] if layers > 0 else list(decoder)
    modules = []
    for layer in chosen:
        attn = getattr(layer, "self_attn", None)
        needed = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim", "num_key_value_groups")
        missing = [name for name in needed if not hasattr(attn, name)]
        if attn is None or missing:
            raise _unsupported(model_type, f"attention without {', '.join(missing) or 'self_attn'}")
        if getattr(attn, "sliding_window", None) is not None:
            raise _unsupported(model_type, "sliding-window attention layers")
        if hasattr(attn, "q_norm") != hasattr(attn, "k_norm"):
            raise _unsupported(model_type, "a q_norm without a k_norm or the reverse")
        module = sys.modules.get(type(attn).__module__)
        if not callable(getattr(module, "apply_rotary_pos_emb", None)):
            raise _unsupported(model_type, f"no apply_rotary_pos_emb in {type(attn).__module__}")
        modules.append(attn)
    return modules


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B or 1, T, D), idx (R, A) -> (R, A, D)."""
    x = x.expand(idx.shape[0], -1, -1)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _heads(module: Any, proj: Any, x: torch.Tensor, norm: Any) -> torch.Tensor:
    """(R, S, D) -> (R, heads, S, head_dim), normed per head when the model does (Qwen3)."""
    y = proj(x).view(*x.shape[:2], -1, module.head_dim)
    if norm is not None:
        y = norm(y)
    return y.transpose(1, 2)


class _AnswerAttention:
    """Per-call state of the hooks: the batch's answer queries, key masks and segment one-hots."""

    def __init__(self, segment_ids: torch.Tensor, n_segments: torch.Tensor, attention_mask: torch.Tensor) -> None:
        query, keys = _answer_queries(segment_ids, n_segments)
        self.count = query.sum(1)  # (R,)
        a = max(int(self.count.max()), 1) if self.count.numel() else 1
        # answer positions first (stable sort keeps their order), padded with position 0 + invalid
        order = torch.sort(query.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :a]
        self.valid = torch.arange(a)[None, :] < self.count[:, None]  # (R, A)
        self.index = torch.where(self.valid, order, torch.zeros_like(order))
        self.key_mask = attention_mask.bool()
        self.keys = keys
        self.per_layer: list[torch.Tensor] = []

    def hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
        actual = output[0] if isinstance(output, tuple) else output
        self.per_layer.append(_answer_mass(module, hidden, cos, sin, actual, self))

    def weights(self) -> torch.Tensor:
        """(R, N): mean over the hooked layers of the max over heads of the answer mass."""
        return torch.stack(self.per_layer).mean(0)


@torch.no_grad()
def _answer_mass(module: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, actual: torch.Tensor,
                 st: _AnswerAttention) -> torch.Tensor:
    """One layer: (R, N) max over heads of the mean over answer queries of the attention mass on
    each segment, recomputed as the module computes it; the module's own output at the answer
    positions is checked against the recomputation, so a layout the hook does not reproduce fails
    loudly instead of giving a wrong weighting."""
    dev = hidden.device
    rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    k = _heads(module, module.k_proj, hidden, k_norm)
    k = rope(k, k, cos, sin)[0]
    v = _heads(module, module.v_proj, hidden, None)
    groups = module.num_key_value_groups
    k = k.repeat_interleave(groups, dim=1).float()  # GQA: repeat_kv's head order
    v = v.repeat_interleave(groups, dim=1)
    key_mask, keys = st.key_mask.to(dev), st.keys.to(dev)
    positions = torch.arange(hidden.shape[1], device=dev)
    mass_sum, err, ref = 0.0, 0.0, 0.0
    for lo in range(0, st.index.shape[1], QUERY_CHUNK):
        idx, valid = st.index[:, lo: lo + QUERY_CHUNK].to(dev), st.valid[:, lo: lo + QUERY_CHUNK].to(dev)
        q = _heads(module, module.q_proj, _gather_rows(hidden, idx), q_norm)
        q = rope(q, q, _gather_rows(cos, idx), _gather_rows(sin, idx))[0]
        scores = (q.float() @ k.transpose(2, 3)) * module.scaling  # (R, H, A, T)
        # causal and padding, as the model's mask; padded query slots see every key (no NaN)
        allowed = ((positions[None, None, :] <= idx[..., None]) & key_mask[:, None, :]) | ~valid[..., None]
        probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        mass = probs @ keys[:, None]  # (R, H, A, N)
        mass_sum = mass_sum + (mass * valid[:, None, :, None]).sum(2)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(*idx.shape, -1)
        diff = (module.o_proj(out) - _gather_rows(actual, idx)).float() * valid[..., None]
        err = err + float(diff.pow(2).sum())
        ref = ref + float((_gather_rows(actual, idx).float() * valid[..., None]).pow(2).sum())
    _check_reproduced(module, err, ref, hidden.dtype)
    count = st.count.to(dev).clamp(min=1).float()
    return (mass_sum / count[:, None, None]).max(1).values.cpu()  # (R, N)


def _check_reproduced(module: Any, err: float, ref: float, dtype: torch.dtype) -> None:
    """Relative error of the recomputed attention output vs the module's: float noise passes,
    a different rotary, scaling, mask or projection does not."""
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    rel = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
    if not rel <= tol:
        model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
        raise _unsupported(str(model_type), f"layer {getattr(module, 'layer_idx', '?')}'s attention output is not "
                                            f"reproduced (relative error {rel:.2g} > {tol:g})")


@contextlib.contextmanager
def answer_attention(model: Any, layers: int, segment_ids: torch.Tensor, n_segments: torch.Tensor,
                     attention_mask: torch.Tensor) -> Iterator[_AnswerAttention]:
    """Hooks for one forward of ``model`` on this batch; after it, ``.weights()`` is (R, N), equal
    to ``attention_weights`` of the eager attentions, in O(answer rows x T) memory::

        with answer_attention(model, 4, b.segment_ids, b.n_segments, b.attention_mask) as att:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        w = att.weights()
    """
    modules = attention_modules(model, layers)
    state = _AnswerAttention(segment_ids, n_segments, attention_mask)
    handles = [m.register_forward_hook(state.hook, with_kwargs=True) for m in modules]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()
