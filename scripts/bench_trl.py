"""Per-step time of E3RL inside TRL, against TRL's own rollouts and against `e3rl train`.

    python scripts/bench_trl.py                     # the shipped model, 8 prompts x 8 rollouts, 8 steps each
    python scripts/bench_trl.py --steps 4 --prompts 4 --out docs/results/bench-trl.md

Four ways to take the same RL steps (same model, prompts, group size, length cap, learning rate,
token-mean loss), one after another in one process with the same torch threads:

  trl-generate       TRL's GRPOTrainer, rollouts from its own `model.generate`
  trl-e3rl-off       E3RLGRPOTrainer + E3RLRollout with erasure off (the engine, nothing erased), uniform
  trl-e3rl           E3RLGRPOTrainer + E3RLRollout (erasure on) + causal-attention allocation
  e3rl-train         `e3rl train --algo e3rl` (the project's trainer), the same settings

Each step is timed from start to end, with its parts apart: the rollouts (TRL: `_generate`; e3rl
train: its generation_time), for trl-e3rl the causal-attention forward (`e3rl train` takes those
weights from hooks on the loss's own forward), the rewards (TRL: `_calculate_rewards`; e3rl train:
what is left besides rollouts and `_optimize`, i.e. rewards and batch tensors), and the loss
forward, backward and AdamW (TRL: what is left). The first step of each is left out
(warm-up); the table gives medians and ratios to trl-generate.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from e3rl_core.integrations.trl import E3RLGRPOTrainer, E3RLRollout, RolloutSettings, accuracy_reward  # noqa: E402
from e3rl_core.models import load_model, recommended_config  # noqa: E402
from e3rl_core.overrides import apply_overrides  # noqa: E402
from e3rl_core.tasks.datasets import load_examples, render_prompt  # noqa: E402
from e3rl_core.training.config import TrainConfig  # noqa: E402
from e3rl_core.training.trainer import Trainer  # noqa: E402


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[float] = []
        self._t = 0.0

    def on_step_begin(self, *a, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, *a, **kw):
        self.steps.append(time.perf_counter() - self._t)


def timed(obj, name: str, into: list[float]) -> None:
    """Wrap ``obj.name`` so each call's seconds are appended to ``into``."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            into.append(time.perf_counter() - t)

    setattr(obj, name, wrapper)


def run_trl(kind: str, a, data: str, out: Path) -> dict:
    tok = load_model(a.model, device="cpu")[1]
    ds = Dataset.from_list([{"prompt": render_prompt(ex.question, tok), "answer": ex.answer} for ex in load_examples(data)])
    cfg = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to=[], max_steps=a.steps, logging_steps=1,
                     save_strategy="no", per_device_train_batch_size=a.prompts * a.group, num_generations=a.group,
                     max_completion_length=a.max_tokens, learning_rate=a.learning_rate, lr_scheduler_type="constant",
                     optim="adamw_torch", adam_beta2=0.99, loss_type="dapo", epsilon_high=0.28, scale_rewards="group",
                     beta=0.0, shuffle_dataset=False, seed=0, disable_tqdm=True)
    gen, weights, rewards = [], [], []
    if kind == "trl-generate":
        trainer = GRPOTrainer(a.model, reward_funcs=accuracy_reward, args=cfg, train_dataset=ds, processing_class=tok)
    else:
        settings = recommended_config(a.model)
        if kind == "trl-e3rl-off":
            settings = apply_overrides(settings, ["erase.enabled=false"])
        rollout = E3RLRollout(RolloutSettings(settings, log_rollouts=0))
        trainer = E3RLGRPOTrainer(a.model, reward_funcs=accuracy_reward, args=cfg, train_dataset=ds,
                                  processing_class=tok, rollout_func=rollout,
                                  allocation="uniform" if kind == "trl-e3rl-off" else "causal_attention")
        if kind == "trl-e3rl":
            timed(trainer, "_segment_weights", weights)
    timed(trainer, "_generate", gen)
    timed(trainer, "_calculate_rewards", rewards)
    clock = StepTimes()
    trainer.add_callback(clock)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tokens = [h.get("e3rl/tokens_generated", h["completions/mean_length"] * a.prompts * a.group) for h in logs]
    step = clock.steps
    loss = [t - g - (weights[i] if weights else 0.0) - r for i, (t, g, r) in enumerate(zip(step, gen, rewards))]
    return {"step": step, "gen": gen, "weights": weights, "rewards": rewards, "loss": loss, "tokens": tokens}


def run_e3rl(a, data: str, out: Path) -> dict:
    cfg = apply_overrides(TrainConfig.for_algo("e3rl", recommended_config(a.model)), [
        f"num_generations={a.group}", f"prompts_per_step={a.prompts}", f"learning_rate={a.learning_rate}",
        f"max_completion_length={a.max_tokens}", f"max_steps={a.steps}", "log_rollouts=0", f"save_steps={a.steps + 1}"])
    trainer = Trainer(cfg, model=a.model, data=data, out=out, device="cpu")
    loss: list[float] = []
    timed(trainer, "_optimize", loss)  # the loss forward (causal weights fused in it), backward, AdamW
    rows = [trainer.train_step() for _ in range(a.steps)]
    step, gen = [r["step_time"] for r in rows], [r["generation_time"] for r in rows]
    return {"step": step, "gen": gen, "weights": [], "loss": loss,
            "rewards": [t - g - o for t, g, o in zip(step, gen, loss)], "tokens": [r["tokens_generated"] for r in rows]}


def med(xs: list[float]) -> float:
    xs = xs[1:] if len(xs) > 1 else xs  # the first step warms up
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "arith-demo"))
    p.add_argument("--data", default="synthetic:train?n=400&seed=1")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the table (Markdown) here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("trl-generate", "trl-e3rl-off", "trl-e3rl", "e3rl-train"):
            t0 = time.perf_counter()
            results[kind] = (run_e3rl(a, a.data, Path(tmp) / kind) if kind == "e3rl-train"
                             else run_trl(kind, a, a.data, Path(tmp) / kind))
            print(f"{kind}: {a.steps} steps in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    base = med(results["trl-generate"]["step"])
    lines = [f"{a.prompts} prompts x {a.group} rollouts per step, <= {a.max_tokens} kept tokens, {a.steps} steps "
             f"(median of steps 2-{a.steps}), torch threads {a.threads}, model {Path(a.model).name}", "",
             "| run | step s | vs trl-generate | rollouts s | causal weights s | rewards + batch s "
             "| loss, backward, AdamW s | tokens generated / step | rollout ms / token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, r in results.items():
        step, gen, tok = med(r["step"]), med(r["gen"]), med(r["tokens"])
        w = f"{med(r['weights']):.2f}" if r["weights"] else ("in the loss's forward" if kind == "e3rl-train" else "-")
        lines.append(f"| {kind} | {step:.2f} | {step / base:.2f}x | {gen:.2f} | {w} | {med(r['rewards']):.2f} | "
                     f"{med(r['loss']):.2f} | {tok:,.0f} | {1000 * gen / max(tok, 1):.2f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
