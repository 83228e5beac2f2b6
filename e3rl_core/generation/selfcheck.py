"""A one-time check that erasure is exact on a model whose family no test covers.

``families.inspect_model`` knows the layer types transformers declares, but not everything a
model does with positions (ALiBi built from cache columns, a cache class of its own, a layer that
ignores the cache it is given). So a model of a family outside ``VERIFIED`` is checked once, before
its first generation: a G = 2 group on a short prompt with forced erasures (every first attempt
erased), whose kept tokens' signals must equal one fresh forward over prompt + completion. A
model that fails, or raises, is refused in one line with the measured error. The result is kept
per model object, so the check costs one short run per loaded model.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

from .families import UnsupportedModelError

VERIFIED = frozenset({
    # tests/generation/test_generator_on_cpu.py and test_families.py check these on every run
    "llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "gemma3_text", "gpt_oss", "smollm3", "gpt2", "qwen3_next",
    "lfm2", "jamba", "mamba",
})
"""Model types whose exactness the test suite proves on every run: no self-check. Every other
family (the rest of ``e3rl bench compat``'s table included) is checked once per loaded model."""

_CHECKED: "weakref.WeakKeyDictionary[Any, str | None]" = weakref.WeakKeyDictionary()


def tolerance(dtype: torch.dtype) -> float:
    """Nats of kept-signal error that float noise explains (float32: linear attention's chunked
    prefill vs its recurrent steps reach ~2e-4; half precision ~1e-2)."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 0.1


def ensure_exact(gen: Any) -> None:
    """Raise ``UnsupportedModelError`` unless erasure is exact on ``gen.model`` (checked once per
    model; families in ``VERIFIED`` are taken as proven)."""
    model = gen.model
    model_type = gen.layout.model_type
    if model_type in VERIFIED:
        return
    if model not in _CHECKED:
        _CHECKED[model] = _probe(gen)
    why = _CHECKED[model]
    if why is not None:
        raise UnsupportedModelError(
            f"{model_type}: {why}; erasure is not exact on this model, so E3RL refuses to run it "
            f"(use a model of a family listed by `e3rl bench compat`)")


def forced_erasure_config(kv_cache: str = "static", *extra: str) -> Any:
    """Settings that erase every first attempt until the budget is spent (a fixed threshold below
    every score), G = 2 friendly and short: the check run's, and ``e3rl bench compat``'s."""
    from ..overrides import apply_overrides
    from .config import GenerationConfig

    return apply_overrides(GenerationConfig(), [
        "max_new_tokens=96", "segment.mode=fixed", "segment.segment_tokens=8", "threshold.policy=fixed",
        "threshold.value=-1000", "erase.budget=2", "sampling.temperature=1.0", f"kv_cache={kv_cache}", *extra])


@torch.no_grad()
def kept_signal_error(model: Any, traces: list[Any]) -> float:
    """Largest |difference| between the recorded entropy/surprisal of every kept token and one
    fresh forward (no cache) over prompt + final completion, in nats."""
    from .signals import sequence_signals

    worst = 0.0
    device = next(model.parameters()).device
    for t in traces:
        kept = t.kept_tokens()
        if not kept:
            continue
        ids = torch.tensor([t.start.prompt_ids + t.done.token_ids], device=device)
        ent, sur = sequence_signals(model(input_ids=ids).logits, ids)  # (1, T-1)
        n = len(t.start.prompt_ids) - 1
        got = torch.tensor([[k.entropy for k in kept], [k.surprisal for k in kept]])
        worst = max(worst, float((got - torch.stack([ent[0, n:], sur[0, n:]]).float().cpu()).abs().max()))
    return worst


def _probe(gen: Any) -> str | None:
    cfg = forced_erasure_config(gen.config.kv_cache, "max_new_tokens=24", "segment.segment_tokens=6",
                                "erase.budget=1", "compile=false")
    probe = type(gen)(gen.model, gen.tokenizer, cfg, self_check=False)  # the engine's own class: no import back
    probe.eos_ids = set()  # run to the length asked for: erasures and holes in both rows
    vocab = int(getattr(gen.model.config.get_text_config(), "vocab_size", 0) or 0)
    low, high = min(8, max(vocab - 1, 1)), max(min(vocab, 1000), 9)
    prompts = [torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 6)]
    try:
        worst = kept_signal_error(gen.model, probe.generate(prompts, group_size=2, seed=0))
    except Exception as err:  # the model's own error is the reason: say it, in one line
        text = str(err).splitlines()[0][:200] if str(err) else ""
        return f"a check run with erasures failed ({type(err).__name__}: {text})"
    tol = tolerance(next(gen.model.parameters()).dtype)
    if not worst <= tol:
        return (f"a check run with erasures left kept-token signals {worst:.3g} nats off a fresh forward "
                f"(float noise explains {tol:g})")
    return None
