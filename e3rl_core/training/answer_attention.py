"""Causal allocation in linear memory: the answer segment's attention, recomputed in hooks.

``advantages.attention_weights`` needs every query's full attention row: an eager forward with
``output_attentions`` materialises (R, H, T, T) per layer. Only the answer segment's queries
matter, so this path hooks the last ``layers`` attention modules of the ordinary (SDPA) forward,
recomputes their queries and keys from the module's own inputs and reduces the answer rows'
attention to per-segment mass inside the hook: O(answer rows x T) memory, nothing kept but (R, N)
per layer.

What it reproduces, read per layer before anything runs (``layer_specs``):
- projections: separate ``q_proj``/``k_proj``/``v_proj`` or a fused ``qkv_proj`` (Phi-3); GQA;
- q/k norms per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2);
- rotary embeddings from the module's own ``apply_rotary_pos_emb``, or none on NoPE layers
  (SmolLM3's ``use_rope = 0``);
- sliding-window and chunked layers (Mistral, Gemma 2/3, gpt-oss, Llama 4's chunks): the answer
  queries see only what the model's mask lets them see, counted as transformers counts it;
- logit soft-capping (Gemma 2) and attention sinks (gpt-oss: the sink takes part in the softmax,
  its mass is nobody's segment);
- hybrids (Jamba, Bamba, Qwen3-Next, LFM2, Falcon-H1): the last ``layers`` *attention* layers;
  recurrent and convolution layers have no attention to allocate by. A model without attention
  layers (Mamba) is refused in one line, naming ``allocation=uniform``.
Every hooked layer checks its recomputed output against the module's own, so a layout this does
not reproduce fails loudly instead of weighting wrongly.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..errors import ConfigError
from .advantages import _answer_queries

EAGER_FALLBACK = "--set attention_impl=eager"
QUERY_CHUNK = 256  # answer queries per attention block: bounds the (R, H, chunk, T) probabilities


class UnsupportedAttentionError(ConfigError):
    """The linear causal allocation cannot reproduce this model's attention; the eager path can."""


def _unsupported(model_type: str, why: str) -> UnsupportedAttentionError:
    return UnsupportedAttentionError(
        f"allocation=causal_attention: the linear-memory attention path does not support this model "
        f"({model_type}: {why}); rerun with {EAGER_FALLBACK} (O(T^2) memory) or allocation=uniform")


@dataclass
class LayerSpec:
    """How one attention module computes its scores, as the hook recomputes them."""

    module: Any
    layer_idx: int
    project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
    """(R, S, hidden) -> q (R, H, S, D), k and v (R, H_kv, S, D), normed as the model norms, and
    the output gate (R, S, H * D) of a gated attention (Qwen3-Next) or None."""
    output: Callable[[torch.Tensor], torch.Tensor]  # (R, S, H * D) -> the module's output projection
    rope: Callable[..., Any] | None
    scaling: float
    window: tuple[str, int] | None  # ("sliding_attention" | "chunked_attention", size)
    softcap: float | None
    sinks: torch.Tensor | None


_DECODERS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "backbone.layers")
_ATTENTION = ("self_attn", "attn", "attention")


def _decoder_layers(model: Any) -> list[Any]:
    for path in _DECODERS:
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if obj is not None and len(obj):
            return list(obj)
    return []


def _first(obj: Any, *names: str) -> Any:
    return next((getattr(obj, n) for n in names if getattr(obj, n, None) is not None), None)


def _per_head(y: torch.Tensor, head_dim: int, norm: Any, per_head: bool) -> torch.Tensor:
    """(R, S, n * head_dim) -> (R, n, S, head_dim), normed per head (Qwen3, Gemma 3) or over the
    whole projection before the split (OLMo 2)."""
    if norm is not None and not per_head:
        y = norm(y)
    y = y.view(*y.shape[:2], -1, head_dim)
    if norm is not None and per_head:
        y = norm(y)
    return y.transpose(1, 2)


def _projector(attn: Any, heads: int, kv_heads: int, head_dim: int, model_type: str) -> Callable:
    q_norm = _first(attn, "q_norm", "q_layernorm")
    k_norm = _first(attn, "k_norm", "k_layernorm")
    if (q_norm is None) != (k_norm is None):
        raise _unsupported(model_type, "a q_norm without a k_norm or the reverse")
    per_head = q_norm is None or getattr(q_norm, "weight", torch.empty(head_dim)).shape[-1] == head_dim
    if all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
        out = getattr(attn.q_proj, "out_features", heads * head_dim)
        gated = out == 2 * heads * head_dim  # Qwen3-Next: each head's query, then its output gate
        if out != heads * head_dim and not gated:
            raise _unsupported(model_type, f"a query projection of {out} features for {heads} heads x {head_dim}")

        def project(x: torch.Tensor) -> tuple:
            q, gate = attn.q_proj(x), None
            if gated:
                q, gate = q.view(*x.shape[:2], heads, 2 * head_dim).chunk(2, dim=-1)
                q, gate = q.reshape(*x.shape[:2], -1), gate.reshape(*x.shape[:2], -1)
            k, v = attn.k_proj(x), attn.v_proj(x)
            return (_per_head(q, head_dim, q_norm, per_head), _per_head(k, head_dim, k_norm, per_head),
                    _per_head(v, head_dim, None, True), gate)
        return project
    if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection, q then k then v
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]

        def project(x: torch.Tensor) -> tuple:
            q, k, v = attn.qkv_proj(x).split(sizes, dim=-1)
            return _per_head(q, head_dim, q_norm, per_head), _per_head(k, head_dim, k_norm, per_head), \
                _per_head(v, head_dim, None, True), None
        return project
    if hasattr(attn, "c_attn"):  # GPT-2: q, k, v side by side
        return lambda x: (*(_per_head(t, head_dim, None, True) for t in attn.c_attn(x).split(heads * head_dim, dim=2)),
                          None)
    if hasattr(attn, "query_key_value"):  # GPT-NeoX: per head, its q, k and v side by side
        def project(x: torch.Tensor) -> tuple:
            qkv = attn.query_key_value(x).view(*x.shape[:2], -1, 3 * head_dim).transpose(1, 2)
            return (*qkv.chunk(3, dim=-1), None)
        return project
    raise _unsupported(model_type, "attention without q_proj/k_proj/v_proj, qkv_proj, c_attn or query_key_value")


def layer_specs(model: Any, layers: int) -> list[LayerSpec]:
    """The specs of the last ``layers`` attention layers (all if 0 or fewer), or
    ``UnsupportedAttentionError`` naming the eager fallback (before anything runs)."""
    from ..generation.families import inspect_model

    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", type(model).__name__))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layout = inspect_model(model)
    if not layout.has_attention:
        raise ConfigError(f"allocation=causal_attention: {model_type} has no attention layers to allocate by "
                          f"(recurrent layers only); use allocation=uniform")
    decoder = _decoder_layers(model)
    if not decoder:
        raise _unsupported(model_type, f"no decoder layers found at {' / '.join(_DECODERS)}")
    attention = [(i, a) for i, layer in enumerate(decoder) if (a := _first(layer, *_ATTENTION)) is not None]
    if not attention:
        raise _unsupported(model_type, f"no attention module ({', '.join(_ATTENTION)}) in the decoder layers")
    chosen = attention[-layers:] if layers > 0 else attention
    return [_spec(model_type, text, layout, i, attn) for i, attn in chosen]


def _spec(model_type: str, config: Any, layout: Any, i: int, attn: Any) -> LayerSpec:
    if getattr(config, "attn_temperature_tuning", False) or getattr(config, "use_qk_norm", False):
        raise _unsupported(model_type, "query temperature tuning / L2 q-k norm (Llama 4)")
    output = _first(attn, "o_proj", "out_proj", "c_proj", "dense")
    head_dim = _first(attn, "head_dim", "head_size")
    if output is None or head_dim is None or not hasattr(attn, "scaling"):
        raise _unsupported(model_type, "attention without an output projection, head_dim or scaling")
    head_dim = int(head_dim)
    heads = int(_first(config, "num_attention_heads", "n_head"))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    rope = None
    if bool(getattr(attn, "use_rope", True)):
        rope = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    kind = layout.layer_types[i] if i < len(layout.layer_types) else "full_attention"
    window = (kind, int(layout.windows[i])) if kind in ("sliding_attention", "chunked_attention") else None
    softcap = getattr(attn, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None)
    return LayerSpec(attn, i, _projector(attn, heads, kv_heads, head_dim, model_type), output,
                     rope, float(attn.scaling), window, softcap, getattr(attn, "sinks", None))


def attention_modules(model: Any, layers: int) -> list[Any]:
    """The attention modules the linear path hooks (checked as ``layer_specs`` checks them)."""
    return [s.module for s in layer_specs(model, layers)]


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B or 1, T, D), idx (R, A) -> (R, A, D)."""
    x = x.expand(idx.shape[0], -1, -1)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


class _AnswerAttention:
    """Per-call state of the hooks: the batch's answer queries, key masks and segment one-hots."""

    def __init__(self, specs: list[LayerSpec], segment_ids: torch.Tensor, n_segments: torch.Tensor,
                 attention_mask: torch.Tensor) -> None:
        query, keys = _answer_queries(segment_ids, n_segments)
        self.specs = {id(s.module): s for s in specs}
        self.count = query.sum(1)  # (R,)
        a = max(int(self.count.max()), 1) if self.count.numel() else 1
        # answer positions first (stable sort keeps their order), padded with position 0 + invalid
        order = torch.sort(query.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :a]
        self.valid = torch.arange(a)[None, :] < self.count[:, None]  # (R, A)
        self.index = torch.where(self.valid, order, torch.zeros_like(order))
        self.key_mask = attention_mask.bool()
        # transformers' chunked mask counts chunks from each row's first real token
        self.left_pad = (attention_mask.cumsum(1) == 0).sum(1)  # (R,)
        self.keys = keys
        self.per_layer: list[torch.Tensor] = []

    def hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        spec = self.specs[id(module)]
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        actual = output[0] if isinstance(output, tuple) else output
        try:
            self.per_layer.append(_answer_mass(spec, hidden, pe, actual, self))
        except UnsupportedAttentionError:
            raise
        except Exception as err:  # a layout the recomputation does not follow: say so, never guess
            model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
            raise _unsupported(str(model_type), f"layer {spec.layer_idx}'s attention could not be recomputed "
                                                f"({type(err).__name__}: {err})") from None

    def weights(self) -> torch.Tensor:
        """(R, N): mean over the hooked layers of the max over heads of the answer mass."""
        return torch.stack(self.per_layer).mean(0)


def _allowed(spec: LayerSpec, idx: torch.Tensor, valid: torch.Tensor, st: _AnswerAttention, T: int) -> torch.Tensor:
    """(R, A, T): the model's mask for the answer queries: causal, padding, window or chunk."""
    dev = idx.device
    positions = torch.arange(T, device=dev)
    allowed = (positions[None, None, :] <= idx[..., None]) & st.key_mask.to(dev)[:, None, :]
    if spec.window is not None:
        kind, size = spec.window
        if kind == "chunked_attention":
            pad = st.left_pad.to(dev)[:, None, None]
            allowed &= torch.div(positions[None, None, :] - pad, size, rounding_mode="floor") == \
                torch.div(idx[..., None] - pad, size, rounding_mode="floor")
        else:
            allowed &= (idx[..., None] - positions[None, None, :]) < size
    return allowed | ~valid[..., None]  # padded query slots see every key (no NaN)


@torch.no_grad()
def _answer_mass(spec: LayerSpec, hidden: torch.Tensor, pe: Any, actual: torch.Tensor,
                 st: _AnswerAttention) -> torch.Tensor:
    """One layer: (R, N) max over heads of the mean over answer queries of the attention mass on
    each segment, recomputed as the module computes it; the module's own output at the answer
    positions is checked against the recomputation."""
    dev = hidden.device
    q_all, k, v, _ = spec.project(hidden[:, :1])[0], *spec.project(hidden)[1:]
    rope = spec.rope if pe is not None else None  # no position embeddings passed: a layer without RoPE (Jamba)
    if rope is not None:
        cos, sin = pe
        k = rope(k, k, cos, sin)[0]
    groups = q_all.shape[1] // k.shape[1]  # GQA, from the projections themselves
    k = k.repeat_interleave(groups, dim=1).float()  # repeat_kv's head order
    v = v.repeat_interleave(groups, dim=1)
    keys = st.keys.to(dev)
    mass_sum, err, ref = 0.0, 0.0, 0.0
    for lo in range(0, st.index.shape[1], QUERY_CHUNK):
        idx, valid = st.index[:, lo: lo + QUERY_CHUNK].to(dev), st.valid[:, lo: lo + QUERY_CHUNK].to(dev)
        q, _, _, gate = spec.project(_gather_rows(hidden, idx))
        if rope is not None:
            q = rope(q, q, _gather_rows(cos, idx), _gather_rows(sin, idx))[0]
        scores = (q.float() @ k.transpose(2, 3)) * spec.scaling  # (R, H, A, T)
        if spec.softcap:
            scores = torch.tanh(scores / spec.softcap) * spec.softcap
        scores = scores.masked_fill(~_allowed(spec, idx, valid, st, hidden.shape[1])[:, None], float("-inf"))
        if spec.sinks is not None:  # the sink joins the softmax; its mass belongs to no segment
            sink = spec.sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        mass = probs @ keys[:, None]  # (R, H, A, N)
        mass_sum = mass_sum + (mass * valid[:, None, :, None]).sum(2)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(*idx.shape, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        diff = (spec.output(out) - _gather_rows(actual, idx)).float() * valid[..., None]
        err = err + float(diff.pow(2).sum())
        ref = ref + float((_gather_rows(actual, idx).float() * valid[..., None]).pow(2).sum())
    _check_reproduced(spec, err, ref, hidden.dtype)
    count = st.count.to(dev).clamp(min=1).float()
    return (mass_sum / count[:, None, None]).max(1).values.cpu()  # (R, N)


def _check_reproduced(spec: LayerSpec, err: float, ref: float, dtype: torch.dtype) -> None:
    """Relative error of the recomputed attention output vs the module's: float noise passes,
    a different rotary, scaling, mask or projection does not."""
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    rel = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
    if not rel <= tol:
        module = spec.module
        model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
        raise _unsupported(str(model_type), f"layer {spec.layer_idx}'s attention output is not "
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
    specs = layer_specs(model, layers)
    state = _AnswerAttention(specs, segment_ids, n_segments, attention_mask)
    handles = [s.module.register_forward_hook(state.hook, with_kwargs=True) for s in specs]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()
