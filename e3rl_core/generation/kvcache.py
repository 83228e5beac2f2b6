"""A batch KV cache in which each row can roll back on its own, without recomputing anything.

transformers' ``DynamicCache.crop`` cuts every row at once, so per-row rollback keeps erased
entries as masked holes: a column of the cache is valid for a row when its 2-D attention-mask entry
is 1. Each row also passes explicit ``position_ids`` that continue from its last kept token, so a
hole changes nothing about the positions of what follows. Two operations keep memory linear in the
kept tokens:
- ``crop_tail``: when the last columns are holes in every row (always so with one row), they are
  cut off with ``crop`` -- the plain single-sequence rollback.
- ``compact``: when holes pile up, each row's valid columns are gathered to the right (a copy of
  the kept entries, never a recomputation).

Two caches hold the columns (``GenerationConfig.kv_cache``): transformers' ``DynamicCache``, which
concatenates the whole cache with the new column at every step (O(cache) per token; the reference),
and ``GrowingCache``, a preallocated buffer per layer written in place at the current column, so a
step costs O(new tokens); it doubles its buffer when full (a copy only on growth, amortised), and
its ``crop`` moves the write position back without touching memory.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import ConfigError
from .config import KV_CACHES
from .families import ModelLayout


def cache_layers(cache: Any) -> list[tuple[Any, str, str]]:
    """(holder, key attribute, value attribute) per layer that holds key/value columns, for
    transformers 5.x and 4.x caches (recurrent-state and cache-less layers have none)."""
    if hasattr(cache, "layers"):
        return [(layer, "keys", "values") for layer in cache.layers if is_kv_layer(layer)]
    return [(cache, f"key_cache.{i}", f"value_cache.{i}") for i in range(len(cache.key_cache))]


def _get(holder: Any, attr: str) -> torch.Tensor:
    if "." in attr:
        name, i = attr.split(".")
        return getattr(holder, name)[int(i)]
    return getattr(holder, attr)


def _set(holder: Any, attr: str, value: torch.Tensor) -> None:
    if "." in attr:
        name, i = attr.split(".")
        getattr(holder, name)[int(i)] = value
    else:
        setattr(holder, attr, value)


class GrowingLayer(CacheLayerMixin):
    """One layer's keys and values in a preallocated (B, H, capacity, D) buffer.

    ``update`` copies only the new columns, at the write position ``length``; ``keys`` and ``values``
    are views of the first ``length`` columns (what attention reads), so code written for a
    ``DynamicLayer`` reads them unchanged. A full buffer is replaced by one of twice the capacity
    (rounded up to ``CHUNK`` columns): a copy only on growth, O(1) amortised per token.
    """

    CHUNK = 256
    is_compileable = False  # the attended length changes every step
    is_croppable = True
    is_sliding = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.key_buffer is None else self.key_buffer.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` columns in all; the kept ones are copied only if it grows."""
        if columns <= self.capacity:
            return
        size = max(columns, 2 * self.capacity)
        size = -(-size // self.CHUNK) * self.CHUNK
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], size, old.shape[-1])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.reserve(end)
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1  # grows on demand

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` columns: the write position moves back, no copy
        (the next update overwrites them)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count: the number of columns to drop")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    def keep_columns(self, order: torch.Tensor) -> None:
        """Rewrite the first ``order.shape[1]`` columns as ``order``'s columns, per row (B, T')."""
        new_len = order.shape[1]
        for name in ("key_buffer", "value_buffer"):
            buf = getattr(self, name)
            idx = order[:, None, :, None].expand(buf.shape[0], buf.shape[1], new_len, buf.shape[3])
            buf[:, :, :new_len] = torch.gather(buf[:, :, : self.length], 2, idx)
        self.length = new_len
        self._views()

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._views()


def _crop_columns(layer: Any, count: int) -> None:
    """Drop ``-count`` columns of one key/value layer (a hybrid layer's own ``crop`` would also
    try to crop its recurrent state, which has no columns)."""
    if count >= 0:
        return
    if isinstance(layer, GrowingLayer):
        layer.crop(count)
    else:
        layer.keys, layer.values = layer.keys[..., :count, :], layer.values[..., :count, :]


class GrowingCache(Cache):
    """A transformers ``Cache`` of ``GrowingLayer``s, one per model layer, created on first use."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=GrowingLayer)


def is_kv_layer(layer: Any) -> bool:
    """A layer with key/value columns (the hole mechanism applies), hybrid layers included."""
    if type(layer).__name__ == "DummyLayer":
        return False
    if isinstance(layer, GrowingLayer):
        return True
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return True
    return isinstance(layer, DynamicLayer)


def use_full_layers(layers: list[Any], kind: str) -> None:
    """Swap, in place, each attention layer of a cache built from the config for a full-attention
    one (``GrowingLayer`` for ``kind=static``): windows are the engine's masks, by position, and a
    transformers sliding layer would drop columns by count. State layers stay transformers' own."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for i, layer in enumerate(layers):
        if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer):
            layers[i] = GrowingLayer() if kind == "static" else DynamicLayer()


def make_cache(kind: str, layout: ModelLayout | None = None, config: Any = None) -> Cache:
    """A fresh cache of the ``GenerationConfig.kv_cache`` kind; for a model with windowed or
    state layers (``layout``), one layer per model layer as ``use_full_layers`` lays out."""
    if kind not in KV_CACHES:
        raise ConfigError(f"unknown kv_cache {kind!r}; choose one of: {', '.join(KV_CACHES)}")
    if layout is not None and (layout.windowed or layout.stateful):
        cache = DynamicCache(config=config)  # one layer per model layer, of the config's types
        use_full_layers(cache.layers, kind)
        return cache
    if kind == "dynamic":
        return DynamicCache()
    if kind == "static":
        return GrowingCache()
    raise ConfigError(f"unknown kv_cache {kind!r}; choose one of: {', '.join(KV_CACHES)}")


class BatchKV:
    """The cache plus its (B, T) column-validity mask."""

    def __init__(self, batch_size: int, device: torch.device, kind: str = "dynamic",
                 layout: ModelLayout | None = None, config: Any = None) -> None:
        self.cache = make_cache(kind, layout, config)
        self.batch_size = batch_size
        self.device = device
        self._mask = torch.zeros(batch_size, 256, dtype=torch.long, device=device)
        self._pos = torch.zeros(batch_size, 256, dtype=torch.long, device=device)  # each column's position
        self.length = 0  # columns in the cache

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) 1 where the column holds a valid entry for the row."""
        return self._mask[:, : self.length]

    @property
    def positions(self) -> torch.Tensor:
        """(B, T) the position id each column was fed at (what windowed layers count in)."""
        return self._pos[:, : self.length]

    def reserve(self, columns: int) -> None:
        need = self.length + columns
        if need > self._mask.shape[1]:
            size = max(need, 2 * self._mask.shape[1])
            for name in ("_mask", "_pos"):
                grown = torch.zeros(self.batch_size, size, dtype=torch.long, device=self.device)
                grown[:, : self.length] = getattr(self, name)[:, : self.length]
                setattr(self, name, grown)

    def attention_mask(self, new_valid: torch.Tensor, new_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Mask for a forward that appends ``new_valid.shape[1]`` columns: (B, T + n). The new
        columns' positions are recorded when given."""
        n = new_valid.shape[1]
        self.reserve(n)
        self._mask[:, self.length : self.length + n] = new_valid
        if new_positions is not None:
            self._pos[:, self.length : self.length + n] = new_positions
        return self._mask[:, : self.length + n]

    def pending_positions(self, n: int) -> torch.Tensor:
        """(B, T + n) positions including the ``n`` columns the next forward appends."""
        return self._pos[:, : self.length + n]

    def advance(self, n: int) -> None:
        """Record that the forward appended ``n`` columns."""
        self.length += n

    def nbytes(self) -> int:
        """Bytes held by the key and value tensors of every layer."""
        return sum(
            _get(holder, attr).nbytes for holder, k, v in cache_layers(self.cache) for attr in (k, v)
        )

    def capacity(self) -> int:
        """Columns allocated: the growing buffer's size, or the length for a concatenating cache."""
        layers = getattr(self.cache, "layers", None)
        if layers and isinstance(layers[0], GrowingLayer):
            return layers[0].capacity
        return self.length

    def repeat_first_row(self) -> None:
        """Copy row 0's key/value columns to every row: a shared prefix was fed to one row
        (``GenerationConfig.share_prefix``); the column masks and positions are already set."""
        B = self.batch_size
        for holder, k_attr, v_attr in cache_layers(self.cache):
            if isinstance(holder, GrowingLayer):
                holder.key_buffer = holder.key_buffer.repeat(B, 1, 1, 1)
                holder.value_buffer = holder.value_buffer.repeat(B, 1, 1, 1)
                holder._views()
                continue
            for attr in (k_attr, v_attr):
                _set(holder, attr, _get(holder, attr).repeat(B, 1, 1, 1))

    def invalidate(self, row: int, columns: list[int]) -> None:
        if columns:
            self._mask[row, columns] = 0

    def valid_count(self, row: int) -> int:
        return int(self.mask[row].sum())

    def reclaimable(self) -> int:
        """Columns that ``compact`` would free: the length minus the most valid entries of a row."""
        return self.length - int(self.mask.sum(1).max()) if self.length else 0

    def release(self, row: int) -> None:
        """A finished row keeps one valid column (a fully masked query row would give NaN in
        some attention kernels) and gives the rest back to compaction."""
        valid = self.mask[row].nonzero()
        if len(valid) > 1:
            self._mask[row, valid[:-1, 0]] = 0

    def crop_tail(self) -> int:
        """Cut trailing columns that are holes in every row; returns how many were cut."""
        any_valid = self.mask.any(0).nonzero()
        keep = int(any_valid[-1]) + 1 if len(any_valid) else 0
        cut = self.length - keep
        if cut > 0:
            # A negative count means "drop that many" on transformers 4.x and 5.x alike. Layer by
            # layer, since recurrent-state layers have no columns to drop.
            if hasattr(self.cache, "layers"):
                for holder, k, _ in cache_layers(self.cache):
                    n = _get(holder, k).shape[-2] if not isinstance(holder, GrowingLayer) else holder.length
                    _crop_columns(holder, keep - n)
            else:
                self.cache.crop(keep - self.cache.get_seq_length())
            self._mask[:, keep : self.length] = 0
            self.length = keep
        return cut

    def compact(self) -> torch.Tensor:
        """Gather each row's valid columns to the right end; returns (B, T_old) old->new column map
        (-1 for dropped columns)."""
        valid = self.mask.bool()  # (B, T)
        counts = valid.sum(1)
        new_len = int(counts.max())
        # A stable sort on validity puts each row's holes first and its valid columns after, in order.
        order = torch.sort(valid.long(), dim=1, stable=True).indices[:, self.length - new_len :]  # (B, T')
        new_mask = torch.gather(valid.long(), 1, order)
        new_pos = torch.gather(self.positions, 1, order)
        for holder, k_attr, v_attr in cache_layers(self.cache):
            if isinstance(holder, GrowingLayer):
                holder.keep_columns(order)  # in place, in the buffer it already holds
                continue
            for attr in (k_attr, v_attr):
                t = _get(holder, attr)  # (B, H, T, D)
                idx = order[:, None, :, None].expand(t.shape[0], t.shape[1], new_len, t.shape[3])
                _set(holder, attr, torch.gather(t, 2, idx))
        remap = torch.full((self.batch_size, self.length), -1, dtype=torch.long, device=self.device)
        positions = torch.arange(new_len, device=self.device).expand(self.batch_size, -1)
        remap.scatter_(1, order, torch.where(new_mask.bool(), positions, torch.full_like(positions, -1)))
        self._mask.zero_()
        self._mask[:, :new_len] = new_mask
        self._pos[:, :new_len] = new_pos
        self.length = new_len
        return remap
