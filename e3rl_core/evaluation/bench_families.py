"""``e3rl bench generate --parts i``: what the family mechanics cost, against a Llama of the same size.

For a sliding-window family (Mistral's layout, window 128), a convolution hybrid (LFM2) and a
Mamba hybrid (Jamba), each built at the ``small`` preset's sizes (hidden 256, 4 layers, 8 heads),
and the Llama ``small`` itself, in one run:
- decode tokens/s of the E3RL loop, erasure off, G = 8 (``bench._run``);
- one erase + regenerate of a 64-token segment at a 256-token prefix against decoding those 64
  tokens (``bench._bench_erase_cost``: the rollback restores per-row states on the hybrids, builds
  position masks on the sliding family);
- peak KV-cache bytes per kept token with erasures on (G = 8, linear fit over lengths), the
  recurrent states being a constant the fit's intercept holds.
Ratios are to the Llama's figures from the same run.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .bench_common import BenchRow, _Bench, _bench_erase_cost, _bench_memory, _prompt_maker, _run, _sync

SIZES = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             head_dim=32)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama (full attention)": ("llama", {}),
    "mistral, window 128 (sliding)": ("mistral", dict(sliding_window=128)),
    "lfm2 (conv + attention)": ("lfm2", dict(layer_types=["conv", "full_attention"] * 2,
                                             block_auto_adjust_ff_dim=False)),
    "jamba (Mamba + attention)": ("jamba", dict(attn_layer_period=2, attn_layer_offset=1, num_experts=1,
                                                expert_layer_period=100, mamba_d_state=16)),
}


def _model(model_type: str, overrides: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from ..models import char_tokenizer
    from .compat import tiny_config

    tok = char_tokenizer()
    config = tiny_config(model_type, dict(SIZES, **overrides), len(tok))
    config.initializer_range = 0.02
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tok


def run_family_parts(device: torch.device, repeats: int, quick: bool,
                     progress: Callable[[str], None]) -> list[BenchRow]:
    gen_tokens = 64 if quick else 256
    seg = 32 if quick else 64
    lengths = [64, 128, 192] if quick else [128, 256, 384, 512]
    measured: dict[str, tuple[float, float, float]] = {}
    rows: list[BenchRow] = []
    for name, (model_type, overrides) in MODELS.items():
        progress(f"(i) {name}")
        model, tok = _model(model_type, overrides)
        model.to(device)
        b = _Bench(model, tok, name, device, repeats, lambda msg: None)
        prompt = _prompt_maker(len(tok))
        p32 = prompt(32)
        plain = b.engine(f"max_new_tokens={gen_tokens}", "erase.enabled=false", "threshold.policy=none",
                         "segment.segment_tokens=64")
        _run(plain, p32, 8)  # warm-up
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            _run(plain, p32, 8)
            _sync(device)
            times.append(time.perf_counter() - t0)
        tps = 8 * gen_tokens / sorted(times)[len(times) // 2]
        erase = _bench_erase_cost(b, {256: prompt(256)}, seg, part="(i)")[0]
        redo_ms = float(erase.e3rl.split()[0])
        decode_ms = float(erase.reference.split("decode L: ")[1].split(" ms")[0])
        mem = _bench_memory(b, p32, lengths)
        per_token = float(mem.e3rl.split()[0].replace(",", ""))
        measured[name] = (tps, redo_ms / decode_ms, per_token)
        base = measured[next(iter(MODELS))]
        rows.append(BenchRow(
            "(i) families", f"{name}: decode G=8 x {gen_tokens}, T=1; erase+regenerate L={seg} at P=256; "
                            f"KV bytes per kept token ({mem.ratio})",
            f"{tps:,.0f} tok/s; redo {redo_ms / decode_ms:.2f}x decode; {per_token:,.0f} B/token",
            f"llama: {base[0]:,.0f} tok/s; {base[1]:.2f}x; {base[2]:,.0f} B/token",
            f"{tps / base[0]:.2f}x tok/s; {(redo_ms / decode_ms) / base[1]:.2f}x erase cost",
            "exact, same order as llama"))
        del model, b, plain
    return rows
