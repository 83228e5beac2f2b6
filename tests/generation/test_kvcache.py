"""BatchKV against slow references: a cache with per-row holes must give the logits of a fresh
forward over only the kept tokens, before and after compaction and tail cropping."""
from __future__ import annotations

import inspect

import pytest
import torch

from e3rl_core.errors import ConfigError
from e3rl_core.generation.config import KV_CACHES
from e3rl_core.generation.kvcache import BatchKV, GrowingCache, GrowingLayer, cache_layers

ATOL = 1e-4
X, Y, Z = 40, 41, 42  # tokens fed after the erasure


def _ids(seed: int, n: int = 8) -> list[int]:
    return torch.randint(4, 99, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [_ids(1), _ids(2)]


@torch.no_grad()
def _forward(model, kv: BatchKV, ids: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Append ``ids`` (B, n) to the cache; returns the last position's logits (B, V)."""
    # transformers renamed past_key_values to cache; pass whichever this version takes, as the generator does.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, attention_mask=kv.attention_mask(valid), position_ids=pos,
                use_cache=True, **{cache_kw: kv.cache})
    kv.advance(ids.shape[1])
    return out.logits[:, -1].float()


@pytest.fixture(params=KV_CACHES)
def kind(request) -> str:
    """Every BatchKV test runs on both caches: the reference DynamicCache and the GrowingCache."""
    return request.param


def _prefill(model, prompts: list[list[int]], kind: str = "dynamic") -> BatchKV:
    kv = BatchKV(len(prompts), torch.device("cpu"), kind)
    ids = torch.tensor(prompts)
    valid = torch.ones_like(ids)
    _forward(model, kv, ids, valid, (valid.cumsum(1) - 1))
    return kv


def _feed(model, kv: BatchKV, tokens: list[int | None], positions: list[int]) -> torch.Tensor:
    """One column for every row; ``None`` rows get a hole (as rows that are not fed do)."""
    ids = torch.tensor([[t if t is not None else 0] for t in tokens])
    valid = torch.tensor([[int(t is not None)] for t in tokens])
    return _forward(model, kv, ids, valid, torch.tensor(positions)[:, None])


@torch.no_grad()
def _reference(model, ids: list[int]) -> torch.Tensor:
    """Logits after ``ids`` from a fresh forward, no cache: what rollback must reproduce. (V,)"""
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def _erased_state(model, kind: str = "dynamic") -> BatchKV:
    """Both rows erase a tail (row 0 its last 3 prompt tokens, row 1 its last 2), both take X, then
    only row 0 takes Y: holes sit in the middle of each row, and 3 columns are reclaimable."""
    kv = _prefill(model, PROMPTS, kind)
    kv.invalidate(0, [5, 6, 7])
    kv.invalidate(1, [6, 7])
    _feed(model, kv, [X, X], [5, 6])
    _feed(model, kv, [Y, None], [6, 7])
    return kv


def test_prefill_mask_and_sizes(tiny_llama, kind):
    model, _ = tiny_llama
    kv = _prefill(model, PROMPTS, kind)
    cfg = model.config
    assert kv.length == 8 and kv.cache.get_seq_length() == 8
    assert torch.equal(kv.mask, torch.ones(2, 8, dtype=torch.long))
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = cfg.num_hidden_layers * 2 * 2 * cfg.num_key_value_heads * 8 * head_dim * 4  # float32
    assert kv.nbytes() == expected
    assert kv.reclaimable() == 0 and kv.valid_count(0) == kv.valid_count(1) == 8


def test_invalidate_makes_holes_that_change_nothing_downstream(tiny_llama, kind):
    model, _ = tiny_llama
    kv = _prefill(model, PROMPTS, kind)
    kv.invalidate(0, [5, 6, 7])
    kv.invalidate(1, [])  # a no-op, as for an empty segment
    assert kv.mask[0].tolist() == [1] * 5 + [0] * 3 and kv.valid_count(1) == 8
    logits = _feed(model, kv, [X, X], [5, 8])
    assert kv.mask.tolist() == [[1] * 5 + [0] * 3 + [1], [1] * 9]
    # The holed row equals a model that never saw the erased tokens; the other row is untouched.
    torch.testing.assert_close(logits[0], _reference(model, PROMPTS[0][:5] + [X]), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], _reference(model, PROMPTS[1] + [X]), atol=ATOL, rtol=0)


def test_holes_in_the_middle_and_unfed_rows(tiny_llama, kind):
    model, _ = tiny_llama
    kv = _erased_state(model, kind)
    assert kv.mask.tolist() == [[1] * 5 + [0, 0, 0] + [1, 1], [1] * 6 + [0, 0] + [1, 0]]
    assert kv.valid_count(0) == kv.valid_count(1) == 7
    assert kv.reclaimable() == 3
    logits = _feed(model, kv, [Z, Z], [7, 7])
    torch.testing.assert_close(logits[0], _reference(model, PROMPTS[0][:5] + [X, Y, Z]), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], _reference(model, PROMPTS[1][:6] + [X, Z]), atol=ATOL, rtol=0)


def test_compact_gathers_kept_columns_and_keeps_logits(tiny_llama, kind):
    model, _ = tiny_llama
    before = _erased_state(model, kind)
    kv = _erased_state(model, kind)
    old_mask = kv.mask.clone()
    old = [(holder.keys.clone(), holder.values.clone()) for holder, _, _ in cache_layers(kv.cache)]
    bytes_before = kv.nbytes()

    remap = kv.compact()

    assert kv.length == 7 and kv.cache.get_seq_length() == 7
    assert kv.reclaimable() == 0
    assert kv.nbytes() == bytes_before * 7 // 10
    assert torch.equal(kv.mask, torch.ones(2, 7, dtype=torch.long))
    for row in range(2):
        kept = old_mask[row].nonzero()[:, 0]
        # Slow reference: the kept columns in order, right-aligned; everything else maps to -1.
        expected_remap = torch.full((10,), -1)
        expected_remap[kept] = torch.arange(7 - len(kept), 7)
        assert torch.equal(remap[row], expected_remap)
        for (k_old, v_old), (holder, _, _) in zip(old, cache_layers(kv.cache)):
            assert torch.equal(holder.keys[row], k_old[row][:, kept])
            assert torch.equal(holder.values[row], v_old[row][:, kept])

    # A forward after compaction gives the logits of the same forward without it.
    after_logits = _feed(model, kv, [Z, Z], [7, 7])
    before_logits = _feed(model, before, [Z, Z], [7, 7])
    torch.testing.assert_close(after_logits, before_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(after_logits[0], _reference(model, PROMPTS[0][:5] + [X, Y, Z]), atol=ATOL, rtol=0)


def test_compact_right_aligns_rows_of_different_lengths(tiny_llama, kind):
    model, _ = tiny_llama
    kv, holed = _prefill(model, PROMPTS, kind), _prefill(model, PROMPTS, kind)
    for cache in (kv, holed):
        cache.invalidate(0, [1, 2, 3, 4, 5, 6, 7])
        cache.invalidate(1, [2, 3])
    remap = kv.compact()
    # Row 0 keeps 1 column, row 1 six: the short row is left-padded with holes, as in prefill.
    assert kv.length == 6
    assert kv.mask.tolist() == [[0, 0, 0, 0, 0, 1], [1] * 6]
    assert remap.tolist() == [[5] + [-1] * 7, [0, 1, -1, -1, 2, 3, 4, 5]]
    logits = _feed(model, kv, [X, X], [1, 8])
    torch.testing.assert_close(logits[0], _reference(model, PROMPTS[0][:1] + [X]), atol=ATOL, rtol=0)
    # Row 1's kept columns 4..7 were computed while 2 and 3 were visible, so no fresh forward
    # reproduces them; the reference is the same forward on the uncompacted cache.
    torch.testing.assert_close(logits, _feed(model, holed, [X, X], [1, 8]), atol=ATOL, rtol=0)


def test_crop_tail_single_row_is_plain_rollback(tiny_llama, kind):
    model, _ = tiny_llama
    kv = _prefill(model, PROMPTS[:1], kind)
    full = kv.nbytes()
    kv.invalidate(0, [5, 6, 7])
    assert kv.crop_tail() == 3
    assert kv.length == 5 and kv.cache.get_seq_length() == 5 and kv.nbytes() == full * 5 // 8
    assert kv.crop_tail() == 0  # nothing left to cut
    logits = _feed(model, kv, [X], [5])
    torch.testing.assert_close(logits[0], _reference(model, PROMPTS[0][:5] + [X]), atol=ATOL, rtol=0)
    assert kv.mask.tolist() == [[1] * 6]  # the cut columns' mask was cleared, not reused


def test_crop_tail_cuts_only_columns_that_are_holes_in_every_row(tiny_llama, kind):
    model, _ = tiny_llama
    kv = _prefill(model, PROMPTS, kind)
    kv.invalidate(0, [5, 6, 7])
    assert kv.crop_tail() == 0  # row 1 still holds the tail
    assert kv.length == 8
    kv.invalidate(1, [6, 7])
    assert kv.crop_tail() == 2
    assert kv.length == 6 and kv.cache.get_seq_length() == 6
    assert kv.mask.tolist() == [[1] * 5 + [0], [1] * 6]
    logits = _feed(model, kv, [X, X], [5, 6])
    torch.testing.assert_close(logits[0], _reference(model, PROMPTS[0][:5] + [X]), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], _reference(model, PROMPTS[1][:6] + [X]), atol=ATOL, rtol=0)


def test_release_keeps_one_column_for_the_finished_row(tiny_llama, kind):
    model, _ = tiny_llama
    kv = _prefill(model, PROMPTS, kind)
    kv.invalidate(0, [7])
    kv.release(0)
    # The last valid column stays, so the finished row's query never sees an all-masked row.
    assert kv.mask[0].tolist() == [0] * 6 + [1, 0]
    assert kv.valid_count(0) == 1 and kv.valid_count(1) == 8
    assert kv.reclaimable() == 0  # row 1 still needs every column
    kv.invalidate(1, [0, 1, 2])
    assert kv.reclaimable() == 3
    logits = _feed(model, kv, [None, X], [0, 8])
    assert torch.isfinite(logits).all()
    kv.release(0)  # idempotent once one column is left
    assert kv.valid_count(0) == 1


def test_mask_grows_past_its_initial_reservation():
    kv = BatchKV(2, torch.device("cpu"))
    first = torch.ones(2, 200, dtype=torch.long)
    first[1, :50] = 0
    assert kv.attention_mask(first).shape == (2, 200)
    assert kv.length == 0  # only advance() commits the columns
    kv.advance(200)
    second = torch.tensor([[1, 0] * 50, [0, 1] * 50])
    mask = kv.attention_mask(second)
    kv.advance(100)
    assert mask.shape == (2, 300) and kv.mask.shape == (2, 300)
    assert torch.equal(kv.mask, torch.cat([first, second], 1))
    kv.invalidate(0, [0, 280])
    assert kv.valid_count(0) == 200 + 50 - 2 and kv.valid_count(1) == 150 + 50
    assert kv.reclaimable() == 300 - 248


def test_attention_mask_overwrites_uncommitted_columns():
    kv = BatchKV(1, torch.device("cpu"))
    kv.attention_mask(torch.ones(1, 4, dtype=torch.long))
    mask = kv.attention_mask(torch.tensor([[1, 0]]))  # a retried forward replaces the first
    assert mask.tolist() == [[1, 0]]


@pytest.mark.parametrize("rows", [1, 3])
def test_nbytes_of_an_empty_and_a_directly_filled_cache(rows, kind):
    kv = BatchKV(rows, torch.device("cpu"), kind)
    assert kv.nbytes() == 0 and kv.reclaimable() == 0
    k = torch.randn(rows, 2, 5, 4)
    for layer in range(3):
        kv.cache.update(k, k.clone(), layer)
    kv.attention_mask(torch.ones(rows, 5, dtype=torch.long))
    kv.advance(5)
    assert kv.nbytes() == 3 * 2 * k.nbytes
    kv.invalidate(0, [1, 3])
    remap = kv.compact()
    if rows == 1:
        assert remap.tolist() == [[0, -1, 1, -1, 2]]
        assert torch.equal(kv.cache.layers[0].keys, k[:, :, [0, 2, 4]])
    assert kv.nbytes() == 3 * 2 * k.nbytes * kv.length // 5


def test_compact_keeps_column_order_on_long_rows(kind):
    # Long enough that an unstable sort would reorder columns (it does from ~100 on the CPU).
    rows, T = 3, 300
    kv = BatchKV(rows, torch.device("cpu"), kind)
    gen = torch.Generator().manual_seed(0)
    old = []
    for layer in range(2):
        k, v = torch.randn(rows, 2, T, 4, generator=gen), torch.randn(rows, 2, T, 4, generator=gen)
        kv.cache.update(k, v, layer)
        old.append((k, v))
    valid = (torch.rand(rows, T, generator=gen) > 0.4).long()
    kv.attention_mask(valid)
    kv.advance(T)
    remap = kv.compact()
    new_len = int(valid.sum(1).max())
    assert kv.length == new_len
    for row in range(rows):
        kept = valid[row].nonzero()[:, 0]
        pad = new_len - len(kept)
        assert kv.mask[row].tolist() == [0] * pad + [1] * len(kept)
        assert torch.equal(remap[row][kept], torch.arange(pad, new_len))
        assert bool((remap[row][valid[row] == 0] == -1).all())
        for (k, v), layer in zip(old, kv.cache.layers):
            assert torch.equal(layer.keys[row, :, pad:], k[row][:, kept])
            assert torch.equal(layer.values[row, :, pad:], v[row][:, kept])


# ------------------------------------------------------------------ GrowingCache on its own
def _kv(n: int, start: int, rows: int = 2) -> torch.Tensor:
    """(rows, 2 heads, n, 4) whose entries name their column, so a misplaced write shows."""
    cols = torch.arange(start, start + n, dtype=torch.float32)
    return cols[None, None, :, None].expand(rows, 2, n, 4) + torch.arange(rows, dtype=torch.float32)[:, None, None, None] * 1000


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_growing_layer_writes_new_columns_at_the_write_position():
    layer = GrowingLayer()
    keys, values = layer.update(_kv(3, 0), -_kv(3, 0))
    assert layer.get_seq_length() == 3 and layer.capacity == GrowingLayer.CHUNK
    storage = _ptr(layer.key_buffer)
    keys, values = layer.update(_kv(1, 3), -_kv(1, 3))
    assert torch.equal(keys, _kv(4, 0)) and torch.equal(values, -_kv(4, 0))
    # What attention reads is a view of the buffer: no concatenation, no new storage.
    assert _ptr(keys) == _ptr(layer.keys) == storage
    assert layer.get_mask_sizes(1) == (5, 0)


def test_growing_layer_crop_moves_the_write_position_back_without_a_copy():
    layer = GrowingLayer()
    layer.update(_kv(5, 0), -_kv(5, 0))
    storage = (_ptr(layer.key_buffer), _ptr(layer.value_buffer))
    layer.crop(-2)
    assert layer.get_seq_length() == 3 and torch.equal(layer.keys, _kv(3, 0))
    assert (_ptr(layer.keys), _ptr(layer.values)) == storage
    keys, _ = layer.update(_kv(1, 50), -_kv(1, 50))  # overwrites the cropped column 3
    assert torch.equal(keys, torch.cat([_kv(3, 0), _kv(1, 50)], 2))
    assert (_ptr(layer.key_buffer), _ptr(layer.value_buffer)) == storage
    with pytest.raises(ValueError, match="negative"):
        layer.crop(1)


def test_growing_layer_grows_by_doubling_and_keeps_its_contents():
    layer = GrowingLayer()
    pointers = set()
    for start in range(0, 1000, 10):
        keys, values = layer.update(_kv(10, start), -_kv(10, start))
        pointers.add(_ptr(layer.key_buffer))
    assert torch.equal(keys, _kv(1000, 0)) and torch.equal(values, -_kv(1000, 0))
    # 256 -> 512 -> 1024 columns: three buffers for 100 updates, the copy only on growth.
    assert layer.capacity == 1024 and len(pointers) == 3
    layer.update(_kv(600, 1000), -_kv(600, 1000))  # one update past twice the capacity
    assert layer.capacity == 2048 and torch.equal(layer.keys, _kv(1600, 0))


def test_growing_cache_compaction_gathers_in_place():
    kv = BatchKV(2, torch.device("cpu"), "static")
    assert isinstance(kv.cache, GrowingCache)
    for layer in range(2):
        kv.cache.update(_kv(6, 0), -_kv(6, 0), layer)
    kv.attention_mask(torch.ones(2, 6, dtype=torch.long))
    kv.advance(6)
    storage = [_ptr(layer.key_buffer) for layer in kv.cache.layers]
    kv.invalidate(0, [1, 2])
    kv.invalidate(1, [0, 5])
    kv.compact()
    assert kv.length == kv.cache.get_seq_length() == 4
    for layer in kv.cache.layers:
        assert torch.equal(layer.keys[0], _kv(6, 0)[0][:, [0, 3, 4, 5]])
        assert torch.equal(layer.keys[1], _kv(6, 0)[1][:, [1, 2, 3, 4]])
        assert torch.equal(layer.values[1], -_kv(6, 0)[1][:, [1, 2, 3, 4]])
    assert [_ptr(layer.key_buffer) for layer in kv.cache.layers] == storage
    kv.cache.update(_kv(1, 9), -_kv(1, 9), 0)  # the next write lands right after the kept columns
    assert torch.equal(kv.cache.layers[0].keys[:, :, 4], _kv(1, 9)[:, :, 0])


def test_unknown_kv_cache_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown kv_cache 'paged'; choose one of: dynamic, static"):
        BatchKV(1, torch.device("cpu"), "paged")
    from e3rl_core.generation.config import GenerationConfig

    with pytest.raises(ConfigError, match="unknown kv_cache 'paged'"):
        GenerationConfig(kv_cache="paged")


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_run_stats_count_allocated_columns_as_well_as_used_ones(tiny_llama, kind):
    model, tok = tiny_llama
    from e3rl_core.generation.config import GenerationConfig
    from e3rl_core.generation.generator import ErasableGenerator
    from e3rl_core.overrides import apply_overrides

    gen = ErasableGenerator(model, tok, apply_overrides(GenerationConfig(), [
        f"kv_cache={kind}", "max_new_tokens=40", "erase.enabled=false", "threshold.policy=none"]))
    gen.eos_ids = set()
    gen.generate([_ids(3, 300)], group_size=2)
    st = gen.last_stats
    assert st.peak_columns == 300 + 39  # the last token is drawn, never fed
    c = model.config
    # keys and values of every layer, 2 rows, float32
    per_column = c.num_hidden_layers * 2 * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert st.kv_bytes_per_column == per_column
    if kind == "static":  # 339 columns in a buffer that doubled from 256 to 512
        assert st.peak_capacity == 512 and st.peak_kv_allocated == 512 * per_column
    else:
        assert st.peak_kv_allocated == st.peak_kv_bytes == 339 * per_column
