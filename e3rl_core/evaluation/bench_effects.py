"""``e3rl bench generate``, part (j): what one decision's branches cost.

The decision-effect audit (``effects.py``) runs 2K continuations from a decision's rollback point.
They share the prefix: it is prefilled once, as one row, and its cache entries are copied to the 2K
rows (``GenerationConfig.share_prefix``). The reference re-prefills the prefix in every branch row.
Both run the same seeds and give the same tokens (tests/generation/test_share_prefix.py; checked
again here), so the ratio is the prefill work saved, timed side by side (alternating runs).
"""
from __future__ import annotations

from typing import Any

from ..generation.config import GenerationConfig
from .bench_common import BenchRow, _Bench, _paired
from .effects import Decision, EffectsConfig, run_branches


def branch_decision(prompt: list[int], prefix: list[int], segment: list[int], continuation: int) -> Decision:
    """A decision at ``len(prefix)`` kept tokens whose branches continue ``continuation`` tokens."""
    config = GenerationConfig(max_new_tokens=len(prefix) + len(segment) + continuation)
    config.erase.enabled = False
    config.threshold.policy = "none"
    return Decision(trace_id="bench-0-0", segment=1, attempt=0, decision="erase", reason="above_threshold",
                    score=1.0, threshold=0.5, start=len(prefix), end=len(prefix) + len(segment), prompt="",
                    prompt_ids=prompt, prefix_ids=prefix, segment_ids=segment, gold="0",
                    config=config.to_dict(), model="bench")


def bench_branch_cost(b: _Bench, prompt: list[int], prefixes: list[int], samples: int = 8, segment: int = 32,
                      continuation: int = 64, part: str = "(j)") -> list[BenchRow]:
    """One decision's 2K branches (K = ``samples``) at each prefix length, shared vs re-prefilled:
    the branches' set-up (every row's cache holds the prefix and each row draws its first tokens: a
    one-token segment, one token after it) and the whole decision (a ``segment``-token segment and
    ``continuation`` tokens after it, as far as the model does not end earlier)."""
    rows = []
    body = prompt * (max(prefixes) // max(1, len(prompt)) + 2)
    for P in prefixes:
        for what, seg, cont in (("set-up", 1, 1), ("whole decision", segment, continuation)):
            b.progress(f"{part} decision branches at prefix {P}: {what}")
            decision = branch_decision(prompt[:32], body[:P], body[P: P + seg], cont)
            shared = EffectsConfig(samples=samples, share_prefix=True)
            each = EffectsConfig(samples=samples, share_prefix=False)

            def run(cfg: EffectsConfig, decision: Decision = decision) -> Any:
                return run_branches(b.model, b.tok, decision, cfg)

            t_shared, t_each, ratio, out_s, out_e = _paired(lambda: run(shared), lambda: run(each), b.repeats, b.dev)
            same = out_s.keep_texts == out_e.keep_texts and out_s.redraw_texts == out_e.redraw_texts
            setting = (f"prefix {P}, 2K = {2 * samples} rows: " + (
                "prefix in every row's cache, first tokens drawn" if what == "set-up" else
                f"{seg}-token segment, then up to {cont} tokens ({out_s.tokens} tokens in all)"))
            rows.append(BenchRow(
                f"{part} decision branches, {what}", setting, f"{t_shared:.2f} s (prefix once)",
                f"{t_each:.2f} s (prefix in every row)", f"{ratio:.2f}x faster{'' if same else ' (tokens differ!)'}",
                ">= 2x at a 1k-token prefix" if what == "set-up" else ""))
    return rows


def run_effects_part(result: Any, long_model: str, *, device: str | None, dtype: str, repeats: int, quick: bool,
                     progress: Any) -> list[BenchRow]:
    """Part (j) on the long-trace model: prefixes 256 and 1024 (64 and 128 with ``quick``)."""
    from ..models import load_model
    from .bench_common import _prompt_maker, machine_description

    model, tok = load_model(long_model, device=device, dtype=dtype)
    dev = next(model.parameters()).device
    result.machine = result.machine or machine_description(dev)
    result.notes.append(f"(j): {long_model}, {dtype} weights on {dev}")
    b = _Bench(model, tok, long_model, dev, repeats, progress)
    prompt = _prompt_maker(len(tok))(2048)
    return bench_branch_cost(b, prompt, [64, 128] if quick else [256, 1024], continuation=16 if quick else 64)
