"""Causal allocation in linear memory: the hooked answer-row attention equals the eager
``output_attentions`` reference, and a layout it cannot reproduce is refused, naming the fallback."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_config, median_score

from e3rl_core.errors import ConfigError
from e3rl_core.evaluation.compat import family_model, forced_erasure_config
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.models import random_model, recommended_config
from e3rl_core.overrides import apply_overrides
from e3rl_core.training import answer_attention as advantages
from e3rl_core.training import trainer as trainer_mod
from e3rl_core.training.advantages import attention_weights
from e3rl_core.training.answer_attention import UnsupportedAttentionError, answer_attention
from e3rl_core.training.config import TrainConfig
from e3rl_core.training.rollout import build_batch
from e3rl_core.training.trainer import Trainer

PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]
PROMPTS = ["Compute 12 + 7 = ", "Q: 3*4? A: "]
DEMO = str(Path(__file__).resolve().parents[2] / "checkpoints" / "arith-demo")
DATA = "synthetic:train?n=16&seed=3&difficulty=4"


@pytest.fixture(scope="module", params=PRESETS)
def model_and_batch(request):
    """A random-init model and a batch of its own erasing rollouts: two prompts of different
    lengths, rollouts of different lengths (right padding) and one row per erased attempt."""
    model, tok = random_model(request.param, init_std=0.3, seed=1)
    thr = median_score(model, tok, PROMPTS[0])
    cfg = make_config("threshold.policy=fixed", f"threshold.value={thr}", "erase.budget=2")
    traces = ErasableGenerator(model, tok, cfg).generate(PROMPTS, group_size=2, seed=0)
    batch = build_batch(traces, [1.0, 0.0, 1.0, 0.0], pad_id=tok.pad_token_id, erased_rows=True)
    assert sum(len(t.erasures) for t in traces) > 0 and (batch.parent >= 0).any()
    assert (batch.attention_mask == 0).any() and (batch.n_segments > 1).any()
    return model, batch


def eager_reference(model, batch, layers: int) -> torch.Tensor:
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                        output_attentions=True)
    finally:
        model.set_attn_implementation(impl)
    return attention_weights(out.attentions, batch.segment_ids, batch.n_segments, layers)


def linear(model, batch, layers: int) -> torch.Tensor:
    with torch.no_grad(), answer_attention(model, layers, batch.segment_ids, batch.n_segments,
                                           batch.attention_mask) as att:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return att.weights()


@pytest.mark.parametrize("layers", [0, 1, 4])
def test_linear_path_equals_eager_reference(model_and_batch, layers):
    model, batch = model_and_batch
    assert model.config._attn_implementation == "sdpa"  # the hooked forward is the ordinary one
    ref = eager_reference(model, batch, layers)
    got = linear(model, batch, layers)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5
    assert model.config._attn_implementation == "sdpa"
    # not vacuous: the weights differ between segments, and from layer to layer
    live = torch.arange(ref.shape[1])[None] < batch.n_segments[:, None]
    assert ref[live].std() > 1e-3


def test_answer_queries_in_several_chunks(model_and_batch, monkeypatch):
    model, batch = model_and_batch
    monkeypatch.setattr(advantages, "QUERY_CHUNK", 3)
    assert (linear(model, batch, 0) - eager_reference(model, batch, 0)).abs().max() <= 1e-5


def test_trainer_allocation_linear_equals_eager(tmp_path):
    """The trainer's own forward: old log-probs and segment weights agree between the two paths,
    and the linear one never switches the model to eager attention."""
    model, tok = random_model("tiny-qwen3", init_std=0.3, seed=1)
    thr = median_score(model, tok, PROMPTS[0])
    cfg = make_config("threshold.policy=fixed", f"threshold.value={thr}")
    traces = ErasableGenerator(model, tok, cfg).generate(PROMPTS, group_size=2, seed=1)
    batch = build_batch(traces, [1.0, 0.0, 1.0, 0.0], pad_id=tok.pad_token_id, erased_rows=True)
    config = apply_overrides(TrainConfig.for_algo("e3rl", recommended_config(DEMO)),
                             ["num_generations=2", "prompts_per_step=2", "micro_batch_size=3"])
    trainer = Trainer(config, model="random:tiny-qwen3", data=DATA, out=tmp_path / "run")
    trainer.model, trainer.device = model, torch.device("cpu")
    seen: list[str] = []
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    try:
        old_lin, _, w_lin = trainer._old_logps_and_weights(batch)
        trainer.cfg.attention_impl = "eager"
        old_eager, _, w_eager = trainer._old_logps_and_weights(batch)
    finally:
        handle.remove()
    micro = -(-len(batch) // 3)
    assert micro > 1 and seen == ["sdpa"] * micro + ["eager"] * micro  # every micro-batch, each way
    assert (w_lin - w_eager).abs().max() <= 1e-5
    assert (old_lin - old_eager).abs().max() <= 1e-4


def _alter_fused_qkv(model):
    del model.model.layers[-1].self_attn.q_proj


def _alter_query_size(model):
    attn = model.model.layers[-1].self_attn
    attn.q_proj = torch.nn.Linear(attn.q_proj.in_features, 3 * attn.q_proj.out_features)


def _alter_temperature(model):
    model.config.attn_temperature_tuning = True  # Llama 4's query temperature


LAYOUTS = {"no q_proj": _alter_fused_qkv, "query size": _alter_query_size, "query temperature": _alter_temperature}


@pytest.mark.parametrize("alter", list(LAYOUTS))
def test_unsupported_layout_names_the_eager_fallback(alter):
    model, _ = random_model("tiny-qwen3", init_std=0.3, seed=1)
    LAYOUTS[alter](model)
    seg = torch.tensor([[-1, 0, 0, 1, 1]])
    with pytest.raises(UnsupportedAttentionError, match="--set attention_impl=eager"):
        answer_attention(model, 4, seg, torch.tensor([2]), torch.ones(1, 5, dtype=torch.long)).__enter__()


def test_a_model_without_attention_is_told_to_allocate_uniformly():
    model, _ = family_model("mamba")
    seg = torch.tensor([[-1, 0, 0, 1, 1]])
    with pytest.raises(ConfigError, match="mamba has no attention layers.*allocation=uniform"):
        answer_attention(model, 4, seg, torch.tensor([2]), torch.ones(1, 5, dtype=torch.long)).__enter__()


FAMILIES = ["qwen3_moe", "mistral-window", "gemma2", "gemma3_text", "gpt_oss", "smollm3", "phi3", "olmo2", "gpt2",
            "gpt_neox", "qwen3_next", "lfm2", "jamba", "bamba", "falcon_h1"]


@pytest.mark.parametrize("name", FAMILIES)
def test_linear_path_equals_eager_reference_on_every_family(name):
    """MoE, sliding windows (the answer queries see only their window), sinks, soft-capping, NoPE,
    fused projections, absolute positions, gated attention and hybrids (attention layers only),
    on erasing rollouts with padding: equal to the eager ``output_attentions`` reference."""
    model, tok = family_model(name)
    cfg = apply_overrides(forced_erasure_config("dynamic"), ["max_new_tokens=48", "erase.budget=1"])
    traces = ErasableGenerator(model, tok, cfg).generate(PROMPTS, group_size=2, seed=0)
    batch = build_batch(traces, [1.0, 0.0, 1.0, 0.0], pad_id=tok.pad_token_id, erased_rows=True)
    assert (batch.attention_mask == 0).any() and (batch.parent >= 0).any()
    assert batch.input_ids.shape[1] > 32  # longer than the 16-token windows
    ref = eager_reference(model, batch, 0)
    got = linear(model, batch, 0)
    assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5
    live = torch.arange(ref.shape[1])[None] < batch.n_segments[:, None]
    assert ref[live].std() > 1e-3


def test_attention_the_hooks_do_not_reproduce_fails_loudly(model_and_batch):
    """A model whose attention scores differ from what its modules advertise (here: logits scaled
    by a factor the module's ``scaling`` does not show, as a soft-capping or altered kernel would):
    the recomputation is checked against the module's own output, so no wrong weighting goes by
    silently; the eager reference still works on it."""
    model, batch = model_and_batch
    attn = model.model.layers[-1].self_attn
    original = attn.forward

    def rescaled(*args, **kwargs):
        attn.scaling *= 3.0
        try:
            return original(*args, **kwargs)
        finally:
            attn.scaling /= 3.0

    attn.forward = rescaled
    try:
        with pytest.raises(UnsupportedAttentionError, match="--set attention_impl=eager") as err:
            linear(model, batch, 1)
        assert "not reproduced" in str(err.value)
        assert torch.isfinite(eager_reference(model, batch, 1)).all()
    finally:
        del attn.forward  # back to the class's forward
    assert (linear(model, batch, 1) - eager_reference(model, batch, 1)).abs().max() <= 1e-5


@pytest.mark.parametrize("family, error, fallback", [
    ("llama4_text", UnsupportedAttentionError, r"llama4_text.*--set attention_impl=eager"),
    ("recurrent_gemma", ConfigError, r"recurrent_gemma: recurrent layers beside sliding-window layers"),
    ("mpt", ConfigError, r"mpt: a check run with erasures left kept-token signals")])
def test_trainer_refuses_an_unsupported_model_before_any_rollout(tmp_path, monkeypatch, family, error, fallback):
    from e3rl_core.evaluation.compat import FAMILIES, generic_model

    build = family_model if family in FAMILIES else generic_model
    monkeypatch.setattr(trainer_mod, "load_model", lambda *a, **k: build(family))
    config = apply_overrides(TrainConfig.for_algo("e3rl", recommended_config(DEMO)),
                             ["num_generations=2", "prompts_per_step=2"])
    with pytest.raises(error, match=fallback):
        Trainer(config, model="random:tiny-qwen3", data=DATA, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # no empty run directory left behind
    if family == "llama4_text":
        eager = apply_overrides(config, ["attention_impl=eager"])
        assert Trainer(eager, model="x", data=DATA, out=tmp_path / "run2").cfg.attention_impl == "eager"


def test_attention_impl_is_validated():
    with pytest.raises(ConfigError, match="attention_impl must be one of linear, eager"):
        apply_overrides(TrainConfig.for_algo("e3rl"), ["attention_impl=flash"])


def test_one_pass_takes_its_weights_from_the_training_forward(tmp_path):
    """With num_iterations = 1 the attention weights come from hooks on the training forward (no
    extra forward); the loss, gradient norm and updated weights equal the two-forward path."""
    import copy

    model, tok = random_model("tiny-qwen3", init_std=0.3, seed=1)
    thr = median_score(model, tok, PROMPTS[0])
    cfg = make_config("threshold.policy=fixed", f"threshold.value={thr}")
    traces = ErasableGenerator(model, tok, cfg).generate(PROMPTS, group_size=2, seed=1)
    batch = build_batch(traces, [1.0, 0.0, 1.0, 0.0], pad_id=tok.pad_token_id, erased_rows=True)
    assert (batch.parent >= 0).any()
    config = apply_overrides(TrainConfig.for_algo("e3rl", recommended_config(DEMO)),
                             ["num_generations=2", "prompts_per_step=2", "micro_batch_size=3",
                              "erased_advantage_delta=0.5", "learning_rate=1e-3"])
    results = {}
    for fused in (True, False):
        trainer = Trainer(config, model="random:tiny-qwen3", data=DATA, out=tmp_path / f"run{fused}")
        trainer.model, trainer.device = copy.deepcopy(model), torch.device("cpu")
        trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-3)
        # the schedule follows the optimizer it steps (one built on the replaced optimizer never sees a step)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, trainer._lr_factor)
        trainer.fuse_attention = fused
        forwards = []
        handle = trainer.model.register_forward_pre_hook(lambda m, a: forwards.append(torch.is_grad_enabled()))
        metrics = trainer._optimize(batch)
        handle.remove()
        results[fused] = (metrics, forwards, [p.detach().clone() for p in trainer.model.parameters()])
    (m_f, fw_f, p_f), (m_u, fw_u, p_u) = results[True], results[False]
    micro = -(-len(batch) // 3)
    assert fw_f == [True] * micro and fw_u == [False] * micro + [True] * micro  # one forward per micro-batch saved
    for key in ("loss", "grad_norm", "advantage_abs_mean"):
        assert m_f[key] == pytest.approx(m_u[key], rel=1e-5, abs=1e-8), key
    assert m_f["advantage_abs_mean"] > 0
    assert max((a - b).abs().max() for a, b in zip(p_f, p_u)) <= 1e-6
