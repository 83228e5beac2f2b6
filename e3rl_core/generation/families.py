"""What erasure must do per model family, behind one small interface the generator calls.

A row's rollback keeps erased cache columns as masked holes (``kvcache.BatchKV``). That is exact
for full attention, but two kinds of layer need more, and this module gives it to them:

- **Sliding-window and chunked attention** (Mistral, Gemma 2/3, gpt-oss, Llama 4): transformers
  counts the window in cache columns, so holes would push kept tokens out of it. The engine builds
  these layers' masks itself from each column's *position* (``window_overlay``: a key is seen when
  ``p_q - p_k < window``, transformers' rule in positions), and keeps every column of them in a
  full-attention cache layer (a transformers sliding layer would drop columns by count). Memory
  stays linear in the kept tokens; nothing kept is recomputed.
- **Recurrent, linear-attention and convolution layers** (Qwen3-Next, LFM2, Jamba, Bamba,
  Falcon-H1, Mamba): their state has no columns to mask. At each row's segment start the row's
  slice of every state is copied (one snapshot per row, O(state)), an erasure writes it back for
  that row alone, and a row that sits out a forward (it waits for its group) gets its slice back
  after it, since the padding token it was fed moved its state.

``inspect_model`` reads the layer types from the config (transformers' own
``get_layer_types_and_kwargs``) and refuses, in one line naming the family, what neither
mechanism makes exact. Families with full attention only take the plain path: a 2-D mask, no
snapshot, no cost.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from ..errors import ConfigError

FULL = "full_attention"
WINDOWED = ("sliding_attention", "chunked_attention")
STATEFUL = ("linear_attention", "conv", "hybrid")  # "hybrid": a state and full attention in one layer (Falcon-H1)
NO_CACHE = ("dummy", "moe", "mlp")


class UnsupportedModelError(ConfigError):
    """A model family erasure cannot make exact: refused before any generation."""


@dataclass(frozen=True)
class ModelLayout:
    """The per-layer facts erasure depends on, read from a model's config."""

    model_type: str
    layer_types: tuple[str, ...]
    windows: tuple[int | None, ...]  # per layer: the window (sliding) or chunk (chunked), else None

    @property
    def windowed(self) -> bool:
        return any(t in WINDOWED for t in self.layer_types)

    @property
    def stateful(self) -> bool:
        return any(t in STATEFUL for t in self.layer_types)

    @property
    def attention_types(self) -> tuple[str, ...]:
        """The attention layer types present, in first-seen order (the keys of a mask mapping)."""
        return tuple(dict.fromkeys(t for t in self.layer_types if t == FULL or t in WINDOWED))

    @property
    def has_attention(self) -> bool:
        return bool(self.attention_types) or "hybrid" in self.layer_types

    @property
    def kind(self) -> str:
        """One word for the compatibility matrix: full / windowed / recurrent / hybrid."""
        if self.stateful:
            return "hybrid" if self.has_attention else "recurrent"
        return "windowed" if self.windowed else "full"


def _refuse(model_type: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{model_type}: {why}; erasure cannot roll it back exactly, so E3RL refuses to run it "
        f"(use a model of a family listed by `e3rl bench compat`)")


def inspect_model(model: Any) -> ModelLayout:
    """The layout of ``model``, or ``UnsupportedModelError`` (one line: the family and why)."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", type(model).__name__))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # transformers 4.x: no per-layer cache types; attention-only models
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is None:
        n = int(getattr(text, "num_hidden_layers", 0) or 0)
        window = getattr(text, "sliding_window", None)
        types = tuple(getattr(text, "layer_types", None) or [("sliding_attention" if window else FULL)] * n)
        windows = tuple(window if t == "sliding_attention" else None for t in types)
    else:
        try:
            types_list, kwargs = get_layer_types_and_kwargs(text)
        except Exception as err:  # a config transformers itself cannot lay out
            raise _refuse(model_type, f"its layer layout cannot be read ({type(err).__name__}: {err})") from None
        types = tuple(types_list)
        windows = tuple(kw.get("sliding_window") for kw in kwargs)
    layout = ModelLayout(model_type, types, windows)
    _check(layout, text)
    return layout


def _check(layout: ModelLayout, config: Any) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(layout.model_type, "the decoder of an encoder-decoder model (its cache holds the encoder's "
                                         "keys too)")
    known = {FULL, *WINDOWED, *STATEFUL, *NO_CACHE}
    odd = sorted({t for t in layout.layer_types if t not in known})
    if odd:
        raise _refuse(layout.model_type, f"layers of type {', '.join(odd)} (state held inside an attention layer "
                                         f"or a compressed cache)")
    if layout.stateful and layout.windowed:
        raise _refuse(layout.model_type, "recurrent layers beside sliding-window layers")
    if any(t in WINDOWED and not w for t, w in zip(layout.layer_types, layout.windows)):
        raise _refuse(layout.model_type, "a sliding-window layer without a window size")
    if getattr(config, "attention_chunk_size", None) and "chunked_attention" not in layout.layer_types:
        raise _refuse(layout.model_type, "chunked attention not declared per layer")


# ------------------------------------------------------------------------------------ caches
def is_state_layer(layer: Any) -> bool:
    try:
        from transformers.cache_utils import LinearAttentionCacheLayerMixin
    except ImportError:
        return False
    return isinstance(layer, LinearAttentionCacheLayerMixin)


# ------------------------------------------------------------------------------------ masks
def window_overlay(layer_type: str, window: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(B, Q, K) True where a sliding (``p_q - p_k < window``) or chunked (same chunk) layer lets
    the query at position ``q_pos`` (B, Q) see the key at ``k_pos`` (B, K): transformers' rules,
    counted in positions instead of cache columns."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    if layer_type == "chunked_attention":
        return torch.div(q, window, rounding_mode="floor") == torch.div(k, window, rounding_mode="floor")
    return (q - k) < window


class Masks:
    """Builds what a forward gets as ``attention_mask``: the plain (B, T) validity mask for a
    model without windowed layers, else additive 4-D masks (B, 1, Q, K) from positions, one per
    attention type (a mapping when the model mixes types, which the mixing models read)."""

    def __init__(self, layout: ModelLayout, dtype: torch.dtype) -> None:
        self.layout = layout
        self.dtype = dtype if dtype.is_floating_point else torch.float32
        self.windows = {t: w for t, w in zip(layout.layer_types, layout.windows) if t in WINDOWED}

    def __call__(self, valid: torch.Tensor, positions: torch.Tensor, n_new: int, fed: torch.Tensor) -> Any:
        """valid, positions: (B, K) of every column after this forward; the last ``n_new`` are
        the new queries. fed: (B,) whether the row's new column is real (others see every valid
        key, so no softmax row is empty)."""
        if not self.layout.has_attention:
            # No attention at all (Mamba): the model reads the mask only to zero padded inputs,
            # one entry per new column.
            return valid[:, valid.shape[1] - n_new:]
        if not self.layout.windowed:
            return valid
        K = valid.shape[1]
        cols = torch.arange(K, device=valid.device)
        q_cols = cols[K - n_new:]
        base = valid.bool()[:, None, :] & (cols[None, None, :] <= q_cols[None, :, None])  # (B, Q, K)
        q_pos, k_pos = positions[:, K - n_new:], positions
        idle = ~fed.bool()[:, None, None]
        masks = {}
        for t in self.layout.attention_types:
            allowed = base
            if t in WINDOWED:
                allowed = base & (window_overlay(t, self.windows[t], q_pos, k_pos) | idle)
            masks[t] = torch.zeros(allowed.shape, dtype=self.dtype, device=valid.device).masked_fill_(
                ~allowed, torch.finfo(self.dtype).min)[:, None]  # (B, 1, Q, K)
        if len(masks) == 1:
            return next(iter(masks.values()))
        return masks


# ------------------------------------------------------------------------------------ states
class RowStates:
    """Per-row snapshots of recurrent/convolution states (no-op for attention-only models)."""

    def __init__(self, cache: Any) -> None:
        self.layers = [layer for layer in getattr(cache, "layers", []) if is_state_layer(layer)]
        self.snapshots: dict[int, list[torch.Tensor | None]] = {}

    def __bool__(self) -> bool:
        return bool(self.layers)

    def _slots(self) -> Iterable[tuple[dict, int]]:
        for layer in self.layers:
            for i in range(layer.number_of_states):
                yield layer.conv_states, i
                yield layer.recurrent_states, i

    def take(self, rows: Iterable[int]) -> dict[int, list[torch.Tensor | None]]:
        """Copies of each row's slice of every state."""
        return {r: [None if d[i] is None else d[i][r].clone() for d, i in self._slots()] for r in rows}

    def put(self, saved: dict[int, list[torch.Tensor | None]]) -> None:
        """Write saved slices back, row by row (the other rows are untouched)."""
        for r, values in saved.items():
            for (d, i), value in zip(self._slots(), values):
                if value is not None and d[i] is not None:
                    d[i][r] = value

    @contextlib.contextmanager
    def hold(self, rows: Iterable[int]) -> Iterator[None]:
        """Rows that sit out a forward (fed padding) come out of it with the states they had."""
        saved = self.take(rows) if self.layers else {}
        yield
        self.put(saved)

    def repeat(self, batch: int) -> None:
        """Copy one row's states to ``batch`` rows (a prefix prefilled once, shared by every row)."""
        for d, i in self._slots():
            if d[i] is not None:
                d[i] = d[i].repeat(batch, *([1] * (d[i].dim() - 1)))

    def mark_segment_start(self, rows: Iterable[int]) -> None:
        if self.layers:
            self.snapshots.update(self.take(rows))

    def roll_back(self, row: int) -> None:
        """The row's states as they were at its segment start."""
        if self.layers:
            self.put({row: self.snapshots[row]})
