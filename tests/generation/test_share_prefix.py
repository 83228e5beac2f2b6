"""``GenerationConfig.share_prefix`` (a prefix prefilled once, its cache copied to every row) gives
the same tokens, decisions and signals as the plain prefill that feeds every row in full: the
reference. Checked on the toy layout with both caches, and on one model per layout family
(sliding, mixed, sinks, recurrent, convolution, Mamba), with erasure on and off."""
from __future__ import annotations

import pytest

from e3rl_core.evaluation.compat import family_model
from e3rl_core.events import SegmentEvent, TokenEvent
from e3rl_core.generation.generator import ErasableGenerator

from conftest import make_config
from test_families import SUBSET, TOL

BASE = list(range(3, 40))
# Branches of one decision: the prefix with a segment after it (keep) and the bare prefix (redraw),
# plus a third length so a stateful model evens out in more than one step.
PROMPTS = [BASE + [5, 6, 7], BASE, BASE + [9]]


def run(model, tok, share: bool, *overrides: str, prompts=PROMPTS):
    config = make_config(f"share_prefix={str(share).lower()}", "threshold.policy=fixed", "threshold.value=1.0",
                         *overrides)
    gen = ErasableGenerator(model, tok, config)
    events = list(gen.stream(prompts, group_size=2, seed=0, trace_prefix="t"))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    decisions = [(e.trace_id, e.segment, e.attempt, e.decision) for e in events if isinstance(e, SegmentEvent)]
    return tokens, decisions, gen.last_stats


def assert_same(model, tok, *overrides: str, tol: float = 1e-4) -> None:
    plain, plain_dec, _ = run(model, tok, False, *overrides)
    shared, shared_dec, _ = run(model, tok, True, *overrides)
    assert [(t.trace_id, t.token_id, t.segment, t.attempt) for t in shared] == \
           [(t.trace_id, t.token_id, t.segment, t.attempt) for t in plain]
    assert shared_dec == plain_dec
    worst = max(max(abs(a.surprisal - b.surprisal), abs(a.entropy - b.entropy)) for a, b in zip(plain, shared))
    assert worst < tol


@pytest.mark.parametrize("kv", ["static", "dynamic"])
@pytest.mark.parametrize("erase", ["true", "false"])
def test_shared_prefix_prefill_matches_the_full_prefill(tiny_llama, kv, erase):
    model, tok = tiny_llama
    assert_same(model, tok, f"kv_cache={kv}", f"erase.enabled={erase}")
    _, decisions, _ = run(model, tok, True, f"kv_cache={kv}", f"erase.enabled={erase}")
    if erase == "true":  # the comparison covered rollbacks, not only plain decoding
        assert any(d[3] == "erase" for d in decisions)


@pytest.mark.parametrize("name", SUBSET)
def test_shared_prefix_on_every_layout_family(name):
    model, tok = family_model(name)
    assert_same(model, tok, tol=TOL.get(name, 1e-4) * 5)


def test_shared_prefix_feeds_the_prefix_once(tiny_llama):
    """The shared part goes through the model as one row: count the rows × tokens each forward sees."""
    model, tok = tiny_llama
    base = BASE * 4  # long enough that most of it is shared (each row prefills its last window + 1)
    prompts = [base + [5, 6, 7], base, base + [9]]
    seen: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    try:
        for share in (False, True):
            run(model, tok, share, "max_new_tokens=1", prompts=prompts)
            seen.append(-1)
    finally:
        hook.remove()
    plain_prefill, shared_prefill = seen[0], sum(seen[seen.index(-1) + 1: seen.index(-1) + 3])
    rows = len(prompts) * 2
    assert plain_prefill == rows * (len(base) + 3)  # every row padded to the longest prompt
    window = make_config().smoothing_window
    shared_len = len(base) - (window + 1)
    assert shared_prefill == shared_len + rows * (len(base) + 3 - shared_len)
    assert shared_prefill < plain_prefill / 2


def test_one_row_or_no_common_prefix_shares_nothing(tiny_llama):
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("share_prefix=true"))
    traces = gen.generate([[4, 5, 6, 7] * 5, [8, 9] * 10], seed=0)  # differ at the first token
    plain = ErasableGenerator(model, tok, make_config()).generate([[4, 5, 6, 7] * 5, [8, 9] * 10], seed=0)
    assert [t.done.token_ids for t in traces] == [t.done.token_ids for t in plain]
