"""``e3rl bench compat``: which model families erasure handles exactly, proved on tiny models.

For each family: a random-init model of two layers from its config (no download; a character
tokenizer), group generation (G = 2, two prompts of different lengths) with forced erasures
(every first attempt erased, up to the budget), and every kept token's entropy and surprisal
compared with one fresh forward over prompt + final completion, on both caches; then one
``e3rl train --algo e3rl`` step (causal allocation, linear-memory path) from the saved model. A row
says ``exact`` (with the largest signal error), ``refused`` (the one-line reason the engine gives)
or ``error``. The README's table is this command's output.

``FAMILIES`` are hand-sized configs, one per layout the engine distinguishes; ``all_installed``
adds every other causal-LM type of the installed transformers, shrunk generically (a config it
cannot shrink is listed as ``not built``).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import E3RLError
from ..generation.selfcheck import forced_erasure_config, kept_signal_error, tolerance

GENERIC_MAX_PARAMS = 20_000_000  # a generically shrunk config larger than this is listed, not built
TOL = tolerance(torch.float32)  # float noise is <= 2e-4 here (linear attention's chunked prefill vs recurrent steps)

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1)

# name -> (model_type, config overrides, what it exercises)
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama": ("llama", {}, "full attention, RoPE"),
    "qwen3": ("qwen3", {}, "per-head q/k norm"),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), "MoE"),
    "mistral-window": ("mistral", dict(sliding_window=16), "sliding window on every layer"),
    # Gemma scales its embeddings by sqrt(hidden): at random init its logits are so peaked that every
    # signal is ~0 and no error could show; a final soft-cap of 3 gives signals that vary.
    "gemma2": ("gemma2", dict(sliding_window=16, final_logit_softcapping=3.0),
               "alternating sliding/full, soft-capping"),
    "gemma3_text": ("gemma3_text", dict(sliding_window=16, final_logit_softcapping=3.0,
                                        layer_types=["sliding_attention", "full_attention"]),
                    "alternating sliding/full, per-head norms, two RoPE bases"),
    "gpt_oss": ("gpt_oss", dict(sliding_window=16, num_local_experts=4, num_experts_per_tok=2,
                                layer_types=["sliding_attention", "full_attention"]), "sinks, sliding, MoE"),
    "llama4_text": ("llama4_text", dict(attention_chunk_size=16, num_local_experts=2, interleave_moe_layer_step=2,
                                        intermediate_size_mlp=128, no_rope_layers=[1, 0]),
                    "chunked attention, NoPE layer, MoE"),
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0]), "NoPE layer"),
    "phi3": ("phi3", {}, "fused qkv projection"),
    "olmo2": ("olmo2", {}, "q/k norm over the whole projection"),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4), "absolute positions"),
    "gpt_neox": ("gpt_neox", {}, "partial rotary, parallel residual"),
    "qwen3_next": ("qwen3_next", dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                      linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                      layer_types=["linear_attention", "full_attention"]),
                   "gated linear attention + full attention"),
    "qwen3_5_text": ("qwen3_5_text", dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                          linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16),
                     "gated delta-net + gated attention (Qwen3.5)"),
    "lfm2": ("lfm2", dict(layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
             "short convolutions + full attention"),
    "jamba": ("jamba", dict(attn_layer_period=2, attn_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                            expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8), "Mamba + attention, MoE"),
    "bamba": ("bamba", dict(attn_layer_indices=[1], **_MAMBA2), "Mamba-2 + attention"),
    "falcon_h1": ("falcon_h1", dict(mamba_d_ssm=128, **_MAMBA2), "Mamba-2 and attention in one layer"),
    "granitemoehybrid": ("granitemoehybrid", dict(layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_head=16,
                                                  mamba_d_state=16, num_local_experts=4, num_experts_per_tok=2,
                                                  shared_intermediate_size=64), "Mamba-2 + attention, MoE (Granite 4)"),
    "mamba": ("mamba", dict(state_size=8), "Mamba, no attention"),
    "recurrent_gemma": ("recurrent_gemma", dict(block_types=["recurrent", "attention"], attention_window_size=16,
                                                lru_width=64), "recurrence + local attention"),
}


@dataclass
class CompatRow:
    family: str
    model_type: str
    layout: str
    exercises: str
    status: str  # exact | refused | wrong | error | not built
    max_error: float | None
    erasures: int
    train: str
    detail: str
    seconds: float


def tiny_config(model_type: str, overrides: dict[str, Any], vocab_size: int) -> Any:
    """A two-layer config of ``model_type`` with the shared tiny sizes (each family's own
    overrides on top) and the character tokenizer's special ids."""
    from transformers import AutoConfig

    from ..models import BOS_ID, EOS_ID, PAD_ID

    base = {k: v for k, v in _BASE.items() if not (model_type == "gpt2" and k != "intermediate_size")}
    kwargs = dict(base, **overrides, vocab_size=vocab_size, max_position_embeddings=2048, initializer_range=0.3,
                  pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if model_type == "gpt2":
        kwargs["n_positions"] = kwargs.pop("max_position_embeddings")
    return AutoConfig.for_model(model_type, **kwargs)


def family_model(name: str, *, seed: int = 1) -> tuple[Any, Any]:
    """(model in eval mode, character tokenizer) of family ``name`` (a key of ``FAMILIES``), with
    peaked output distributions (init std 0.3) so signals vary from token to token."""
    from transformers import AutoModelForCausalLM

    from ..models import char_tokenizer

    model_type, overrides, _ = FAMILIES[name]
    tok = char_tokenizer()
    config = tiny_config(model_type, overrides, len(tok))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval(), tok


def check_generation(model: Any, tok: Any) -> tuple[float, int]:
    """(largest kept-signal error over both caches, erasures) of a forced-erasure group run."""
    from ..generation.generator import ErasableGenerator

    worst, erased = 0.0, 0
    for kv in ("dynamic", "static"):
        traces = ErasableGenerator(model, tok, forced_erasure_config(kv)).generate(
            ["Compute 12 + 7 = ", "xy"], group_size=2, seed=3)
        erased += sum(len(t.erasures) for t in traces)
        worst = max(worst, kept_signal_error(model, traces))
    return worst, erased


def check_train_step(model: Any, tok: Any, work: Path) -> str:
    """One ``--algo e3rl`` step from the saved model, with forced erasures: ``ok`` with the
    linear-memory causal allocation; else the refusal, then the fallback it names (``eager``
    allocation, or ``uniform`` for a model without attention) and how that went."""
    from ..training.answer_attention import UnsupportedAttentionError

    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    try:
        _train_once(work, "linear", [])
        return "ok"
    except UnsupportedAttentionError as err:
        refused, fallback = str(err).split("; rerun with")[0], ["attention_impl=eager"]
    except E3RLError as err:
        if "no attention layers" not in str(err):
            return f"refused: {err}"
        refused, fallback = str(err).split("; use")[0], ["allocation=uniform"]
    try:
        _train_once(work, "fallback", fallback)
    except E3RLError as err:
        return f"refused: {refused}; {fallback[0]} also refused: {err}"
    return f"{fallback[0]}: ok (linear path refused: {refused.split(': ', 1)[-1]})"


def _train_once(work: Path, name: str, extra: list[str]) -> None:
    from ..overrides import apply_overrides
    from ..training.config import TrainConfig
    from ..training.trainer import Trainer

    cfg = apply_overrides(TrainConfig.for_algo("e3rl"), [
        "num_generations=2", "prompts_per_step=2", "max_steps=1", "max_completion_length=48",
        "generation.segment.mode=fixed", "generation.segment.segment_tokens=8",
        "generation.threshold.policy=fixed", "generation.threshold.value=-1000", "generation.erase.budget=1", *extra])
    trainer = Trainer(cfg, model=str(work / "model"), data="synthetic:train?n=4&seed=3", out=work / name)
    try:
        trainer.train()
    finally:
        trainer.close()


def check_family(name: str, work: Path | None = None, train: bool = True) -> CompatRow:
    from ..generation.families import inspect_model

    model_type, _, exercises = FAMILIES.get(name, (name, {}, ""))
    t0 = time.perf_counter()
    row = CompatRow(name, model_type, "", exercises, "error", None, 0, "", "", 0.0)
    try:
        model, tok = family_model(name) if name in FAMILIES else generic_model(name)
    except Exception as err:  # a config this transformers will not build at the tiny sizes
        row.status, row.detail = "not built", f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    try:
        row.layout = inspect_model(model).kind
        row.max_error, row.erasures = check_generation(model, tok)
        row.status = "exact" if row.max_error <= TOL else "wrong"
        if train and row.status == "exact":
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                row.train = check_train_step(model, tok, Path(tmp))
    except E3RLError as err:
        row.status, row.detail = "refused", str(err)
    except Exception as err:
        row.detail = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    row.seconds = time.perf_counter() - t0
    return row


def generic_model(model_type: str) -> tuple[Any, Any]:
    """A tiny model of any causal-LM type: its default config with the common size fields shrunk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import char_tokenizer

    tok = char_tokenizer()
    defaults = AutoConfig.for_model(model_type).to_dict()
    shrink = {k: v for k, v in dict(_BASE, n_embd=64, n_layer=2, n_head=4, d_model=64, n_layers=2, n_heads=4,
                                    num_layers=2).items() if k in defaults}
    config = tiny_config(model_type, shrink, len(tok))
    with torch.device("meta"):  # sized before anything is allocated: sub-configs keep their defaults
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if params > GENERIC_MAX_PARAMS:
        raise ValueError(f"{params / 1e6:,.0f}M parameters after shrinking the common size fields (limit "
                         f"{GENERIC_MAX_PARAMS / 1e6:.0f}M); give it a hand-sized entry in FAMILIES")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # a config the shrinking made inconsistent fails here, not in the engine
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    return model, tok


def installed_causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def run_compat(families: list[str] | None = None, *, all_installed: bool = False, train: bool = True,
               progress: Callable[[str], None] = lambda msg: None) -> list[CompatRow]:
    names = list(families or FAMILIES)
    unknown = [n for n in names if n not in FAMILIES and n not in installed_causal_lm_types()]
    if unknown:
        raise E3RLError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; choose from "
                        f"{', '.join(FAMILIES)} or a causal-LM model type of the installed transformers")
    if all_installed:
        covered = {FAMILIES[n][0] for n in names if n in FAMILIES}
        names += [t for t in installed_causal_lm_types() if t not in covered and t not in names]
    rows = []
    for i, name in enumerate(names, 1):
        progress(f"{i}/{len(names)} {name}")
        rows.append(check_family(name, train=train))
    return rows


def format_compat(rows: list[CompatRow]) -> str:
    import transformers

    lines = [f"transformers {transformers.__version__}, torch {torch.__version__}; exact = every kept token's "
             f"entropy and surprisal within {TOL:g} nats of a fresh forward, after forced erasures in a G = 2 group, "
             f"on both caches",
             "",
             "| family | model type | layers | exercises | generation | max error | erasures | e3rl train step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "-" if r.max_error is None else f"{r.max_error:.1e}"
        gen = r.status if not r.detail else f"{r.status}: {r.detail}"
        lines.append(f"| {r.family} | {r.model_type} | {r.layout or '-'} | {r.exercises or '-'} | {gen} | {err} | "
                     f"{r.erasures} | {r.train or '-'} |")
    return "\n".join(lines)
