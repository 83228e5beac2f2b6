"""E3RL inside TRL's GRPOTrainer (``e3rl_core.integrations.trl``), checked against ``e3rl train``:
one TRL step with ``E3RLGRPOTrainer`` on fixed rollouts gives the loss and the weights of one
``e3rl train`` step on the same rollouts; the rollout function returns the engine's kept tokens;
a 2-step run trains; empty completions and early stops do not crash it; bad input is refused."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from e3rl_core.errors import ConfigError  # noqa: E402
from e3rl_core.events import DoneEvent, StartEvent, Trace  # noqa: E402
from e3rl_core.generation.generator import ErasableGenerator  # noqa: E402
from e3rl_core.integrations import trl as bridge  # noqa: E402
from e3rl_core.models import byte_level_bpe, load_model  # noqa: E402
from e3rl_core.overrides import apply_overrides  # noqa: E402
from e3rl_core.training.config import TrainConfig  # noqa: E402
from e3rl_core.training.trainer import Trainer  # noqa: E402

from conftest import make_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
G = 4
PROMPTS = ["12+7=", "3*45-6="]
ERASING = ("threshold.policy=fixed", "threshold.value=0.5", "erase.budget=2")


def text_reward(text: str) -> float:
    """A reward that varies across random completions, so advantages are not all 0."""
    return float(len(text) % 5) / 4.0


def trl_reward(completions, **_):
    return [text_reward(c) for c in completions]


def grpo_args(out: Path, **kw) -> GRPOConfig:
    base = dict(output_dir=str(out), use_cpu=True, bf16=False, report_to=[], max_steps=1, logging_steps=1,
                save_strategy="no", per_device_train_batch_size=G * len(PROMPTS), num_generations=G,
                max_completion_length=48, learning_rate=1e-3, lr_scheduler_type="constant", optim="adamw_torch",
                adam_beta2=0.99, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, scale_rewards="none", beta=0.0,
                shuffle_dataset=False, seed=0)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.fixture(scope="module")
def fixed_traces(model_dir):
    """Rollouts with erasures, early stops (different lengths) and two groups, made once."""
    model, tok = load_model(str(model_dir), device="cpu")
    gen = ErasableGenerator(model, tok, make_config(*ERASING))
    traces = gen.generate(PROMPTS, group_size=G, seed=0)
    assert sum(len(t.erasures) for t in traces) > 0
    assert len({len(t.done.token_ids) for t in traces}) > 1
    return traces


class FixedRollout:
    """A rollout_func that answers each prompt with pre-made traces (the same for both trainers)."""

    def __init__(self, traces: list[Trace], pad_id: int) -> None:
        self.by_prompt: dict[str, list[Trace]] = {}
        for tr in traces:
            self.by_prompt.setdefault(tr.start.prompt, []).append(tr)
        self.pad_id = pad_id

    def __call__(self, prompts, trainer):
        chosen = [self.by_prompt[p][i % G] for i, p in enumerate(prompts)]
        return bridge.rollout_output(chosen, self.pad_id)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grads_at_step(optimizer, model) -> dict[str, torch.Tensor]:
    """Filled with each parameter's gradient (by the model's names) when ``optimizer`` steps."""
    grads: dict[str, torch.Tensor] = {}
    step = optimizer.step

    def wrapped(*a, **kw):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(*a, **kw)

    optimizer.step = wrapped
    return grads


class GradsBeforeStep(TrainerCallback):
    """Records the (clipped) gradients TRL's optimizer is about to step with."""

    def __init__(self, out: dict[str, torch.Tensor]) -> None:
        self.out = out

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.out.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("allocation", ["uniform", "causal_attention"])
def test_one_trl_step_equals_one_e3rl_train_step(allocation, fixed_traces, model_dir, tmp_path, monkeypatch):
    # e3rl train, one step on the fixed rollouts
    cfg = apply_overrides(TrainConfig.for_algo("e3rl"), [
        f"num_generations={G}", f"prompts_per_step={len(PROMPTS)}", "learning_rate=1e-3", "scale_rewards=none",
        f"allocation={allocation}", "loss_type=dapo", "epsilon_high=0.28", "max_completion_length=48",
        "log_rollouts=0", "save_steps=100"])
    ref = Trainer(cfg, model=str(model_dir), data="synthetic:train?n=8", out=tmp_path / "e3rl")
    monkeypatch.setattr(ref, "_rollouts", lambda: (list(fixed_traces), list(fixed_traces), len(PROMPTS)))
    monkeypatch.setattr(ref, "_reward", lambda text, gold: text_reward(text))
    start = weights(ref.model)
    ref_grads = grads_at_step(ref.optimizer, ref.model)
    row = ref.train_step()
    want = weights(ref.model)

    # TRL, one step with the subclass on the same rollouts
    ds = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    tok = ref.tokenizer
    trainer = bridge.E3RLGRPOTrainer(
        str(model_dir), reward_funcs=trl_reward, args=grpo_args(tmp_path / "trl"), train_dataset=ds,
        processing_class=tok, allocation=allocation, rollout_func=FixedRollout(fixed_traces, tok.pad_token_id))
    got0 = weights(trainer.model)
    assert all(torch.equal(start[k], got0[k]) for k in start)  # the same starting point
    trl_grads: dict[str, torch.Tensor] = {}
    trainer.add_callback(GradsBeforeStep(trl_grads))
    trainer.train()
    got = weights(trainer.model)
    loss = trainer.state.log_history[0]["loss"]
    assert row["loss"] != 0 and loss == pytest.approx(row["loss"], rel=1e-5, abs=1e-8)
    # the clipped gradients the optimizers stepped with
    for k, g in ref_grads.items():
        assert torch.allclose(trl_grads[k], g, rtol=1e-4, atol=1e-6), k
    # the weights after the step. AdamW's first step moves each weight by lr * g / (|g| + 1e-8):
    # where |g| is within float noise of 0 the two runs' updates may differ (by at most lr); where
    # the gradient is clearly non-zero they agree.
    lr = 1e-3
    moved = max(float((want[k] - start[k]).abs().max()) for k in start)
    assert moved > lr / 2  # the step did something
    for name, g in ref_grads.items():
        diff = (want[name] - got[name]).abs()
        firm = g.abs() > 1e-5
        assert firm.float().mean() > 0.5, name
        assert float(diff[firm].max()) < 1e-6, f"{name}: weights after the step differ by {float(diff[firm].max())}"
        assert float(diff.max()) <= lr * 1.01, name


def test_the_rollout_returns_the_engines_kept_tokens(model_dir, tmp_path):
    model, tok = load_model(str(model_dir), device="cpu")
    rollout = bridge.E3RLRollout(bridge.RolloutSettings(make_config(*ERASING), log_rollouts=-1))
    ds = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    trainer = bridge.E3RLGRPOTrainer(model, reward_funcs=trl_reward, args=grpo_args(tmp_path), train_dataset=ds,
                                     processing_class=tok, rollout_func=rollout, allocation="uniform")
    prompts = [p for p in PROMPTS for _ in range(G)]
    out = rollout(prompts, trainer)
    traces = out["e3rl_trace"]
    assert len(traces) == len(prompts) and sum(t.done.erasures for t in traces) > 0
    for i, tr in enumerate(traces):
        kept = tr.kept_tokens()
        assert tr.start.prompt == prompts[i]
        assert out["completion_ids"][i] == [t.token_id for t in kept] == list(tr.done.token_ids)
        assert out["logprobs"][i] == [-t.surprisal for t in kept]
        assert out["prompt_ids"][i] == list(tr.start.prompt_ids)
        assert len(out["e3rl_segment_ids"][i]) == len(kept)
    # the sampling and length are TRL's
    assert rollout._generator.config.max_new_tokens == 48
    # the traces went to the run's rollouts.jsonl and load as the Audit tab loads any trace file
    from app.audit import load_trace_file

    loaded = load_trace_file(tmp_path / "rollouts.jsonl")
    assert [t.done.token_ids for t in loaded] == [t.done.token_ids for t in traces]


def test_two_steps_train_and_count_erasures(model_dir, tmp_path):
    tok = load_model(str(model_dir), device="cpu")[1]
    ds = Dataset.from_list([{"prompt": p} for p in PROMPTS * 2])
    rollout = bridge.E3RLRollout(bridge.RolloutSettings(make_config(*ERASING)))
    trainer = bridge.E3RLGRPOTrainer(str(model_dir), reward_funcs=trl_reward, args=grpo_args(tmp_path, max_steps=2),
                                     train_dataset=ds, processing_class=tok, rollout_func=rollout)
    start = weights(trainer.model)
    trainer.train()
    end = weights(trainer.model)
    assert max(float((end[k] - start[k]).abs().max()) for k in start) > 0
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert "rewards/trl_reward/mean" in h and h["e3rl/erasures_per_rollout"] > 0
        assert 0 < h["e3rl/tokens_erased_fraction"] < 1
    assert (tmp_path / "rollouts.jsonl").stat().st_size > 0


def _empty_trace(prompt: str, prompt_ids: list[int], k: int) -> Trace:
    tid = f"e-0-{k}"
    return Trace([StartEvent(trace_id=tid, model="m", prompt=prompt, prompt_ids=prompt_ids, config={}, seed=k,
                             group_index=k, batch="e"),
                  DoneEvent(trace_id=tid, text="", token_ids=[], tokens_generated=0, erasures=0, answer=None,
                            correct=None, finish_reason="length")])


def test_empty_completions_cannot_crash_a_step(fixed_traces, model_dir, tmp_path):
    tok = load_model(str(model_dir), device="cpu")[1]
    first = [t for t in fixed_traces if t.start.prompt == PROMPTS[0]]
    empty = [_empty_trace(PROMPTS[0], list(first[0].start.prompt_ids), k) for k in range(2)]
    traces = [empty[0], first[1], empty[1], first[3]] + [t for t in fixed_traces if t.start.prompt == PROMPTS[1]]
    out = bridge.rollout_output(traces, tok.pad_token_id)
    assert out["completion_ids"][0] == [tok.pad_token_id] and out["env_mask"][0] == [0]
    assert out["e3rl_segment_ids"][0] == [-1]
    ds = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    trainer = bridge.E3RLGRPOTrainer(str(model_dir), reward_funcs=trl_reward, args=grpo_args(tmp_path),
                                     train_dataset=ds, processing_class=tok, rollout_func=FixedRollout(traces, tok.pad_token_id))
    trainer.train()
    assert trainer.state.global_step == 1 and "loss" in trainer.state.log_history[0]


def test_token_advantages_spread_the_rollout_advantage_over_segments():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 2, -1, -1, -1], [-1] * 6])
    adv = torch.tensor([1.0, -2.0, 0.5])
    uni = bridge.token_advantages(adv, seg, torch.ones(3, 3), "uniform", 0.5)
    assert torch.equal(uni, adv[:, None] * (seg >= 0))
    w = torch.tensor([[0.25, 0.75, 0.0], [1.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    causal = bridge.token_advantages(adv, seg, w, "causal_attention", 0.5)
    # row 0: N = 2, hat_w = 2 * w / sum(w) = (0.5, 1.5): A * (0.5 + 0.5 * hat_w)
    assert causal[0].tolist() == pytest.approx([0.75, 0.75, 1.25, 1.25, 1.25, 0.0])
    assert causal[1].tolist() == pytest.approx([-1.75, -1.75, -2.5, 0, 0, 0])
    assert causal[2].abs().sum() == 0


def test_a_tokenizer_unlike_the_trainers_is_refused_before_generation(model_dir, tmp_path):
    tok = load_model(str(model_dir), device="cpu")[1]
    other = byte_level_bpe(["12+7=19", "3*45-6=129"] * 20, vocab_size=300)
    rollout = bridge.E3RLRollout(tokenizer=other)
    ds = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    trainer = bridge.E3RLGRPOTrainer(str(model_dir), reward_funcs=trl_reward, args=grpo_args(tmp_path),
                                     train_dataset=ds, processing_class=tok, rollout_func=rollout)
    with pytest.raises(ConfigError, match="tokenizer is not the trainer's: vocabularies differ"):
        rollout([p for p in PROMPTS for _ in range(G)], trainer)
    assert rollout._generator is None  # nothing was generated
    with pytest.raises(ConfigError, match="not one prompt repeated"):
        bridge.E3RLRollout()(PROMPTS * G, trainer)
    with pytest.raises(ConfigError, match="not whole groups of num_generations=4.*multiple of num_generations"):
        bridge.E3RLRollout()(PROMPTS[:1] * 3, trainer)
    assert bridge.same_tokenizer(tok, tok) is None


def test_a_trl_version_outside_the_tested_range_gets_one_line(monkeypatch):
    monkeypatch.delenv(bridge.UNTESTED_ENV, raising=False)
    with pytest.raises(bridge.TRLVersionError) as err:
        bridge.check_trl_version("0.29.1")
    msg = str(err.value)
    assert "\n" not in msg and "1.16.x" in msg and "0.29.1" in msg and bridge.UNTESTED_ENV in msg
    assert bridge.check_trl_version("1.16.3") == "1.16.3"
    monkeypatch.setenv(bridge.UNTESTED_ENV, "1")
    assert bridge.check_trl_version("1.20.0") == "1.20.0"


def test_the_core_imports_without_trl():
    """e3rl_core and its integrations package import with trl missing; the bridge names the extra."""
    code = ("import sys; sys.modules['trl'] = None\n"
            "import e3rl_core, e3rl_core.integrations, e3rl_core.training.trainer\n"
            "try:\n    import e3rl_core.integrations.trl\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR the TRL bridge needs trl: pip install 'e3rl-workbench[trl]'" in out.stdout


def test_the_readme_example_runs(tmp_path):
    """examples/trl_e3rl.py, as the README shows it, for one small step on the shipped model."""
    out = tmp_path / "run"
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_e3rl.py"), "--max-steps", "1",
                           "--prompts-per-step", "2", "--num-generations", "2", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "e3rl_generation.json").is_file()
    from app.audit import load_trace_file

    assert load_trace_file(out / "rollouts.jsonl")
    from e3rl_core.models import recommended_config

    assert recommended_config(str(out)).erase.budget == recommended_config(str(ROOT / "checkpoints" / "arith-demo")).erase.budget


def test_a_resumed_run_draws_what_the_uninterrupted_one_would(model_dir, tmp_path):
    model, tok = load_model(str(model_dir), device="cpu")
    ds = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    settings = bridge.RolloutSettings(make_config(*ERASING), log_rollouts=0)
    first = bridge.E3RLRollout(settings)
    trainer = bridge.E3RLGRPOTrainer(model, reward_funcs=trl_reward, args=grpo_args(tmp_path), train_dataset=ds,
                                     processing_class=tok, rollout_func=first, allocation="uniform")
    prompts = [p for p in PROMPTS for _ in range(G)]
    a0 = first(prompts, trainer)["completion_ids"]
    trainer.state.global_step = 1
    a1 = first(prompts, trainer)["completion_ids"]
    resumed = bridge.E3RLRollout(settings)  # a new process after a resume at step 1
    assert resumed(prompts, trainer)["completion_ids"] == a1 != a0


def test_attention_weights_are_measured_without_dropout_in_a_training_step(fixed_traces, tmp_path):
    """TRL scores rollouts in train mode; the causal weights' forward must not see dropout (the
    hooks recompute attention without it, and would refuse the mismatch)."""
    from e3rl_core.models import random_model

    model, tok = random_model("tiny-llama", init_std=0.3, seed=1)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    ds = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    trainer = bridge.E3RLGRPOTrainer(model, reward_funcs=trl_reward, args=grpo_args(tmp_path), train_dataset=ds,
                                     processing_class=tok, rollout_func=FixedRollout(fixed_traces, tok.pad_token_id))
    seen = []
    measure = trainer._segment_weights

    def spy(out, seg, adv):
        w = measure(out, seg, adv)
        seen.append((w, trainer.model.training))
        return w

    trainer._segment_weights = spy
    trainer.train()
    (w, training), = seen
    assert training  # back in train mode after the measurement
    assert (w != 1).any()  # real attention weights were measured


def test_lora_adapters_train_through_the_bridge(model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    tok = load_model(str(model_dir), device="cpu")[1]
    ds = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    rollout = bridge.E3RLRollout(bridge.RolloutSettings(make_config(*ERASING), log_rollouts=0))
    trainer = bridge.E3RLGRPOTrainer(str(model_dir), reward_funcs=trl_reward, args=grpo_args(tmp_path),
                                     train_dataset=ds, processing_class=tok, rollout_func=rollout,
                                     peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))
    before = weights(trainer.model)
    trainer.train()
    after = weights(trainer.model)
    lora = [k for k in before if "lora_" in k]
    assert lora and any(not torch.equal(before[k], after[k]) for k in lora)
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_" not in k)  # the base stays frozen
    assert trainer.state.log_history[0]["e3rl/erasures_per_rollout"] > 0



@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_data_parallel_two_processes_generate_their_own_groups(model_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo): each generates its own groups and writes its own trace
    file; the processes end with the same weights."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(Path(__file__).parent / "trl_ddp_worker.py"),
                           str(model_dir), str(out)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((out / f"result.rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["rank"] for r in rows] == [0, 1] and all(r["world"] == 2 and r["steps"] == 2 for r in rows)
    assert rows[0]["checksum"] == rows[1]["checksum"]  # gradients were averaged: one model
    assert all(e > 0 for e in rows[0]["erasures"])
    from app.audit import load_trace_file

    a, b = load_trace_file(out / "rollouts.jsonl"), load_trace_file(out / "rollouts.rank1.jsonl")
    assert len(a) == len(b) == 2 * 8  # per process and step: 2 groups of 4
    assert all("r0" in t.trace_id for t in a) and all("r1" in t.trace_id for t in b)
