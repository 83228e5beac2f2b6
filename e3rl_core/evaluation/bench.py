"""``e3rl bench generate``: speed and memory of the erasable generator, measured side by side.

(a) tokens/s of the E3RL loop (signals on, erasure off) vs ``model.generate``, batch 1 and 8;
(b) erasing + regenerating an L-token segment at prefix P vs decoding L tokens, and vs naive
    regeneration that re-prefills the kept prefix;
(c) peak KV-cache memory vs tokens generated with erasures on (linear fit, R^2);
(d) a G=8 group decoded in lockstep with erasure vs the same 8 rollouts one after another;
(e)-(h) the long-trace parts, on a Qwen3-shaped model: see ``bench_long``;
(i) the family mechanics (sliding windows, recurrent states) against a Llama of the same size:
    see ``bench_families``;
(j) one decision's 2K branches for the decision-effect audit, prefix shared vs re-prefilled: see
    ``bench_effects``.
Shared helpers live in ``bench_common``; the part modules import only from there.
Returns rows; the CLI prints them. Timings are medians over ``repeats`` runs after a warm-up.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ..events import DoneEvent
from ..models import load_model
from . import bench_effects, bench_families, bench_long
from .bench_common import (BenchResult, BenchRow, _Bench, _bench_erase_cost, _bench_memory, _paired, _prompt_maker, _run,
                           machine_description)


def _bench_throughput(b: _Bench, p32: list[int], gen_tokens: int) -> list[BenchRow]:
    """(a) tokens/s of the loop with erasure off vs ``model.generate``, sampling at T=1."""
    plain = b.engine(f"max_new_tokens={gen_tokens}", "erase.enabled=false", "threshold.policy=none",
                     "segment.segment_tokens=64")
    rows = []
    for batch in (1, 8):
        b.progress(f"(a) throughput, batch {batch}")
        ids = torch.tensor([p32] * batch, device=b.dev)

        def hf() -> Any:
            with torch.no_grad():
                return b.model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                    top_p=1.0, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, eos_token_id=None,
                    pad_token_id=b.tok.pad_token_id or 0,
                )

        t_e3rl, t_hf, ratio, _, _ = _paired(lambda: _run(plain, p32, batch), hf, b.repeats, b.dev)
        n = batch * gen_tokens
        rows.append(BenchRow(
            "(a) throughput", f"batch {batch}, {gen_tokens} new tokens, T=1",
            f"{n / t_e3rl:,.0f} tok/s", f"{n / t_hf:,.0f} tok/s (model.generate)",
            f"{ratio:.2f}x", ">= 0.9x",
        ))
    return rows


def _bench_group(b: _Bench, p32: list[int], gen_tokens: int) -> BenchRow:
    """(d) G=8 lockstep with erasure vs the same 8 rollouts one after another."""
    b.progress("(d) batched group vs sequential")
    group = b.engine(f"max_new_tokens={gen_tokens}", "segment.mode=fixed", "segment.segment_tokens=32",
                     "threshold.policy=e3rl", "threshold.kappa=0.5", "sampling.temperature=1.0")

    def sequential() -> list[DoneEvent]:
        return [d for s in range(8) for d in _run(group, p32, 1, seed=s)]

    t_group, t_seq, _, dones, dones_seq = _paired(lambda: _run(group, p32, 8, seed=0), sequential, b.repeats, b.dev)
    n_group = sum(d.tokens_generated for d in dones)
    e_group = sum(d.erasures for d in dones)
    n_seq = sum(d.tokens_generated for d in dones_seq)
    e_seq = sum(d.erasures for d in dones_seq)
    return BenchRow(
        "(d) group lockstep", f"G=8, {gen_tokens} kept/row, e3rl policy",
        f"{n_group / t_group:,.0f} tok/s ({e_group} erasures)",
        f"{n_seq / t_seq:,.0f} tok/s sequential ({e_seq} erasures)",
        f"{(n_group / t_group) / (n_seq / t_seq):.2f}x", ">= 3x",
    )


PARTS = "abcdefghij"
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "checkpoints", "arith-demo")


def run_generate_bench(
    model_spec: str = "random:small",
    *,
    device: str | None = None,
    dtype: str = "auto",
    repeats: int = 3,
    quick: bool = False,
    progress: Callable[[str], None] = lambda msg: None,
    trust_remote_code: bool = False,
    parts: str = PARTS,
    long_model: str = "random:small-qwen3",
    shipped_model: str | None = SHIPPED,
    compile: bool = False,
) -> BenchResult:
    """Parts (a)-(d) on ``model_spec``; the long-trace parts (e)-(h) on ``long_model`` (Qwen3's
    layout) and (e) also on ``shipped_model`` at the lengths its context holds."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ConfigError(f"unknown bench parts {''.join(sorted(unknown)) or '(none given)'}; choose from {PARTS}")
    result = BenchResult(machine="", model=model_spec if set(parts) & set("abcd") else long_model)
    if set(parts) & set("abcd"):
        model, tok = load_model(model_spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        dev = next(model.parameters()).device
        result.machine = machine_description(dev)
        prompt = _prompt_maker(len(tok))
        gen_tokens = 64 if quick else 256
        p32 = prompt(32)
        b = _Bench(model, tok, model_spec, dev, repeats, progress)
        if "a" in parts:
            result.rows += _bench_throughput(b, p32, gen_tokens)
        if "b" in parts:
            long_prompts = {P: prompt(P) for P in (256, 1024)}
            result.rows += _bench_erase_cost(b, long_prompts, seg=32 if quick else 64)
        if "c" in parts:
            result.rows.append(_bench_memory(b, p32, [64, 128, 192, 256] if quick else [128, 256, 512, 768, 1024]))
        if "d" in parts:
            result.rows.append(_bench_group(b, p32, gen_tokens))
        del model, b
    if set(parts) & set("efgh"):
        result.rows += bench_long.run_long_parts(
            result, parts, long_model, shipped_model, device=device, dtype=dtype, repeats=repeats, quick=quick,
            progress=progress, trust_remote_code=trust_remote_code, compile=compile)
    if "j" in parts:
        result.rows += bench_effects.run_effects_part(result, long_model, device=device, dtype=dtype, repeats=repeats,
                                                      quick=quick, progress=progress)
    if "i" in parts:
        dev = torch.device(device) if device else torch.device("cpu")
        result.machine = result.machine or machine_description(dev)
        result.rows += bench_families.run_family_parts(dev, repeats, quick, progress)
    return result


def format_table(result: BenchResult) -> str:
    head = ["part", "setting", "E3RL", "reference", "ratio", "goal"]
    lines = [f"Machine: {result.machine}", f"Model: {result.model}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        lines.append(f"| {r.part} | {r.setting} | {r.e3rl} | {r.reference} | {r.ratio} | {r.goal} |")
    lines.extend(result.notes)
    return "\n".join(lines)
