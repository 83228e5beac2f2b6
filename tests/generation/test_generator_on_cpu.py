"""The erasable generator against slow references: full recomputation, one-row-at-a-time."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config, median_score

from e3rl_core.events import TokenEvent
from e3rl_core.generation.config import KV_CACHES
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.generation.signals import sequence_signals

PROMPTS = ["Compute 12 + 7 = ", "x", "The quick brown fox jumps over"]


def reference_signals(model, prompt_ids, completion_ids):
    """Signals of the completion from one fresh forward over prompt + completion (no cache)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits
    ent, sur = sequence_signals(logits, ids)  # (1, T-1)
    n = len(prompt_ids) - 1
    return ent[0, n:], sur[0, n:]


def check_trace_against_forward(model, trace):
    kept = trace.kept_tokens()
    assert [t.token_id for t in kept] == trace.done.token_ids
    ent, sur = reference_signals(model, trace.start.prompt_ids, trace.done.token_ids)
    got_ent = torch.tensor([t.entropy for t in kept])
    got_sur = torch.tensor([t.surprisal for t in kept])
    torch.testing.assert_close(got_ent, ent, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_sur, sur, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("group_size", [1, 4])
def test_kept_signals_match_full_forward_after_erasures(tiny, group_size, temperature, kv_cache):
    model, tok = tiny
    extra = [f"sampling.temperature={temperature}", f"kv_cache={kv_cache}"]
    thr = median_score(model, tok, PROMPTS[0], *extra)
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=fixed", f"threshold.value={thr}", *extra))
    traces = gen.generate(PROMPTS[:2], group_size=group_size, seed=3)
    assert len(traces) == 2 * group_size
    assert sum(len(t.erasures) for t in traces) > 0, "the test must exercise erasures"
    for trace in traces:
        check_trace_against_forward(model, trace)


@pytest.mark.parametrize("kv_cache", KV_CACHES)
def test_compaction_keeps_signals_exact(tiny_llama, kv_cache):
    model, tok = tiny_llama
    thr = median_score(model, tok, PROMPTS[0])
    cfg = make_config("threshold.policy=fixed", f"threshold.value={thr}", "erase.compact_ratio=0.2",
                      "max_new_tokens=96", f"kv_cache={kv_cache}")
    gen = ErasableGenerator(model, tok, cfg)
    traces = gen.generate(PROMPTS, group_size=3, seed=0)
    assert gen.last_stats.compactions > 0
    for trace in traces:
        check_trace_against_forward(model, trace)


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_rows_equal_rows_generated_alone(tiny, temperature, kv_cache):
    model, tok = tiny
    extra = [f"sampling.temperature={temperature}", f"kv_cache={kv_cache}"]
    thr = median_score(model, tok, PROMPTS[0], *extra)
    cfg = make_config("threshold.policy=fixed", f"threshold.value={thr}", *extra)
    gen = ErasableGenerator(model, tok, cfg)
    seeds = [11, 12, 13]
    batched = gen.generate(PROMPTS, group_size=1, seed=seeds)
    assert sum(len(t.erasures) for t in batched) > 0
    for prompt, seed, trace in zip(PROMPTS, seeds, batched):
        alone = gen.generate(prompt, seed=seed)[0]
        assert alone.done.token_ids == trace.done.token_ids
        assert [(t.token_id, t.segment, t.attempt) for t in alone.tokens] == [
            (t.token_id, t.segment, t.attempt) for t in trace.tokens
        ]
        assert [s.decision for s in alone.segments] == [s.decision for s in trace.segments]


def test_event_accounting(tiny_llama):
    model, tok = tiny_llama
    thr = median_score(model, tok, PROMPTS[0])
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=fixed", f"threshold.value={thr}"))
    for trace in gen.generate(PROMPTS[0], group_size=4, seed=5):
        done = trace.done
        assert done.tokens_generated == len(trace.tokens)
        assert [t.step for t in trace.tokens] == list(range(len(trace.tokens)))
        assert done.erasures == len(trace.erasures)
        assert done.text == tok.decode(done.token_ids, skip_special_tokens=True)
        prompt_len = len(trace.start.prompt_ids)
        for er in trace.erasures:
            # Rolled back to the segment start: prompt + kept prefix, the attempt gone.
            assert er.cache_len_after == prompt_len + er.start
            assert er.cache_len_before == prompt_len + er.end - 1  # the last token was never fed
            attempt_tokens = [t for t in trace.tokens if (t.segment, t.attempt) == (er.segment, er.attempt)]
            assert "".join(t.text for t in attempt_tokens) == er.text
        decided = {(s.segment, s.attempt): s.decision for s in trace.segments}
        assert {(e.segment, e.attempt) for e in trace.erasures} == {k for k, d in decided.items() if d == "erase"}
        assert len(done.token_ids) <= 48


def test_same_seed_same_trace(tiny_llama):
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=e3rl", "threshold.kappa=0"))
    a = gen.generate(PROMPTS[0], group_size=4, seed=7)
    b = gen.generate(PROMPTS[0], group_size=4, seed=7)
    ids = ("trace_id", "batch")  # random per call; everything else must repeat
    strip = lambda tr: [(type(e).__name__, {k: v for k, v in vars(e).items() if k not in ids}) for e in tr.events]
    assert [strip(t) for t in a] == [strip(t) for t in b]
    c = gen.generate(PROMPTS[0], group_size=4, seed=8)
    assert [t.done.token_ids for t in a] != [t.done.token_ids for t in c]


def test_greedy_retry_diverges_at_most_uncertain_position(tiny_llama):
    model, tok = tiny_llama
    thr = median_score(model, tok, PROMPTS[0], "sampling.temperature=0")
    gen = ErasableGenerator(model, tok, make_config("sampling.temperature=0", "threshold.policy=fixed",
                                                    f"threshold.value={thr}", "erase.budget=1"))
    trace = gen.generate(PROMPTS[0], seed=0)[0]
    assert trace.erasures
    for er in trace.erasures:
        first = [t for t in trace.tokens if (t.segment, t.attempt) == (er.segment, er.attempt)]
        retry = [t for t in trace.tokens if (t.segment, t.attempt) == (er.segment, er.attempt + 1)]
        k = max(range(len(first)), key=lambda i: first[i].surprisal)
        # Same prefix up to the most uncertain position (greedy is deterministic), another token there.
        assert [t.token_id for t in retry[:k]] == [t.token_id for t in first[:k]]
        assert retry[k].token_id != first[k].token_id


def test_fallback_restores_best_attempt(tiny_llama):
    model, tok = tiny_llama
    # Erase every attempt: after the budget the lowest-scoring attempt is restored.
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=fixed", "threshold.value=-1",
                                                    "erase.budget=2", "max_new_tokens=16",
                                                    "erase.max_per_trace=100"))
    trace = gen.generate(PROMPTS[0], seed=0)[0]
    segs = trace.segments
    reasons = set()
    for n in {s.segment for s in segs}:
        tried = [s for s in segs if s.segment == n]
        final = tried[-1]
        assert final.decision == "forced_accept"
        candidates = tried[:-1] if final.reason == "restored" else tried
        best = min(candidates, key=lambda s: (s.score, -s.attempt))
        if final.reason == "restored":
            assert final.restored_from == best.attempt
            assert best.score < tried[-2].score - 1e-6  # strictly better than the discarded one
            ids = lambda a: [t.token_id for t in trace.tokens if (t.segment, t.attempt) == (n, a)]
            assert ids(final.attempt) == ids(best.attempt)
            assert final.score == pytest.approx(best.score, abs=1e-4)
        elif final.reason == "budget":
            assert final.score <= best.score + 1e-6  # already the best (ties keep the latest)
        else:
            assert final.reason == "trace_cap"  # the cap stops spending: no restore
        reasons.add(final.reason)
    assert "restored" in reasons
    check_trace_against_forward(model, trace)


def test_group_baseline_is_group_mean_plus_kappa_std(tiny_llama):
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=e3rl", "threshold.kappa=0.5",
                                                    "threshold.min_group=4"))
    traces = gen.generate(PROMPTS[0], group_size=4, seed=1)
    segs = [s for t in traces for s in t.segments]
    first = {}
    for s in segs:
        if s.attempt == 0:
            first.setdefault(s.segment, []).append(s)
    checked = 0
    for n, group in first.items():
        if len(group) < 4:
            continue
        scores = torch.tensor([s.score for s in group], dtype=torch.float64)
        beta = float(scores.mean() + 0.5 * scores.std(unbiased=False))
        for s in group:
            assert s.baseline == pytest.approx(beta, rel=1e-9)
            assert s.threshold == pytest.approx(s.baseline * s.penalty * s.history, rel=1e-9)
            assert s.decision == ("erase" if s.score > s.threshold else "accept")
        checked += 1
    assert checked >= 2
    retries = [s for s in segs if s.attempt > 0 and s.reason != "restored"]
    for s in retries:
        assert s.penalty == pytest.approx(torch.exp(torch.tensor(0.3 * s.attempt)).item(), rel=1e-6)


def test_erasure_disabled_scores_but_never_erases(tiny_llama):
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=fixed", "threshold.value=-1",
                                                    "erase.enabled=false"))
    trace = gen.generate(PROMPTS[0], seed=0)[0]
    assert not trace.erasures and trace.segments
    assert all(s.decision == "accept" and s.reason == "disabled" for s in trace.segments)


def test_trace_cap_bounds_erasures(tiny_llama):
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=fixed", "threshold.value=-1",
                                                    "erase.max_per_trace=3", "erase.fallback=last"))
    trace = gen.generate(PROMPTS[0], seed=0)[0]
    assert len(trace.erasures) == 3
    assert any(s.reason == "trace_cap" for s in trace.segments)


def test_short_prompt_scores_do_not_depend_on_batch_mates(tiny_llama):
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=none", "sampling.temperature=0"))
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 2
    for short in ("x", "ab"):
        alone = gen.generate(short, seed=0)[0]
        batched = gen.generate([short, long_prompt], seed=[0, 1])[0]
        for a, b in zip(alone.segments, batched.segments):
            for key in ("base", "max", "delta"):
                assert a.features[key] == pytest.approx(b.features[key], abs=1e-5)


@pytest.mark.parametrize("kv_cache", KV_CACHES)
def test_compaction_only_when_it_frees_columns(tiny_llama, kv_cache):
    model, tok = tiny_llama
    # Padding alone (very different prompt lengths) must not trigger a compaction every step.
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=none", "max_new_tokens=80", f"kv_cache={kv_cache}"))
    gen.eos_ids = set()
    gen.generate(["x", "y" * 200], seed=0)
    assert gen.last_stats.compactions == 0
    # Finished rows give their columns back: one row stops at once, the other runs on.
    thr = median_score(model, tok, PROMPTS[0])
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=fixed", f"threshold.value={thr}",
                                                    "max_new_tokens=120", "erase.compact_ratio=0.3",
                                                    f"kv_cache={kv_cache}"))
    traces = gen.generate(PROMPTS, group_size=2, seed=4)
    for trace in traces:
        check_trace_against_forward(model, trace)
    stats = gen.last_stats
    assert stats.compactions <= stats.forwards // 10


def test_record_top_k_lists_the_most_likely_tokens(tiny_llama):
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("record_top_k=3", "sampling.temperature=0", "threshold.policy=none"))
    events = [e for e in gen.stream("abc", seed=0) if isinstance(e, TokenEvent)]
    assert events
    for e in events:
        assert len(e.top) == 3
        probs = [p for _, _, p in e.top]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert e.top[0][0] == e.token_id  # greedy takes the most likely token
        assert e.top[0][2] == pytest.approx(math.exp(-e.surprisal), rel=1e-4)
    off = [e for e in ErasableGenerator(model, tok, make_config()).stream("abc", seed=0) if isinstance(e, TokenEvent)]
    assert all(e.top is None for e in off)
