"""``e3rl bench train``: where a training step's time goes, against what the same work costs bare.

Per step of a real ``Trainer`` (its data, rewards and settings), timed in alternation with the
reference on the same inputs:
- rollouts: ``Trainer._rollouts`` (generation with the reward hook, trace bookkeeping) vs the bare
  engine on the same prompts, seeds and config (the batched rate of ``e3rl bench generate``);
  both generate the same tokens, erased ones included;
- optimizer phase: ``Trainer._optimize`` on the step's batch (old log-probs and attention weights
  where the algorithm needs them, loss, backward, clipping, AdamW) vs one plain forward + backward
  of the same batch (mean token log-prob; no optimizer step).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Callable


from ..events import group_traces
from ..generation.generator import ErasableGenerator
from ..overrides import apply_overrides
from ..tasks.datasets import render_prompt
from ..tasks.rewards import reward
from ..training.config import TrainConfig
from ..training.losses import token_logps
from ..training.rollout import build_batch
from .bench_common import BenchResult, BenchRow, _sync, machine_description


def _plain_step(trainer: Any, batch: Any) -> None:
    """One forward + backward of the batch in the trainer's micro-batches, nothing else."""
    model, dev = trainer.model, trainer.device
    model.zero_grad(set_to_none=True)
    for sl in trainer._micro(len(batch)):
        mb = batch.rows(sl)
        logits = model(input_ids=mb.input_ids.to(dev), attention_mask=mb.attention_mask.to(dev), use_cache=False).logits
        logp = token_logps(logits, mb.input_ids.to(dev))
        mask = mb.completion_mask.to(dev)
        ((logp * mask).sum() / mask.sum().clamp_min(1)).backward()
    model.zero_grad(set_to_none=True)


def run_train_bench(model: str, data: str, algo: str, *, steps: int = 3, overrides: list[str] | None = None,
                    device: str | None = None, dtype: str = "float32",
                    progress: Callable[[str], None] = lambda msg: None) -> BenchResult:
    from ..models import recommended_config
    from ..training.trainer import Trainer

    # As ``e3rl train`` builds it: the algorithm's preset on the model's recommended generation settings.
    cfg = apply_overrides(TrainConfig.for_algo(algo, recommended_config(model)), ["log_rollouts=0", *(overrides or [])])

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, model=model, data=data, out=os.path.join(out, "run"), device=device, dtype=dtype)
        bare = ErasableGenerator(trainer.model, trainer.tokenizer, trainer.gen_config, model_name=model)
        dev = trainer.device
        result = BenchResult(machine=machine_description(dev), model=model)
        roll_t, bare_t, roll_tok, opt_t, plain_t = [], [], [], [], []
        for step in range(steps):
            progress(f"step {step + 1}/{steps}: rollouts")
            position, G = trainer.position, cfg.num_generations
            _sync(dev)
            t0 = time.perf_counter()
            generated, kept, _ = trainer._rollouts()
            _sync(dev)
            roll_t.append(time.perf_counter() - t0)
            roll_tok.append(sum(t.done.tokens_generated for t in generated))
            # The bare engine on the same prompts and seeds (dynamic sampling may draw several rounds:
            # replay them all, in the trainer's order).
            n_rounds = len(generated) // (cfg.prompts_per_step * G)
            after = trainer.position
            trainer.position = position  # draw the same prompts again from the trainer's own stream
            examples = [ex for _, ex in trainer._next_prompts(n_rounds * cfg.prompts_per_step)]
            trainer.position = after
            _sync(dev)
            t0 = time.perf_counter()
            tokens = 0
            for r in range(n_rounds):
                chunk = list(enumerate(examples[r * cfg.prompts_per_step:(r + 1) * cfg.prompts_per_step],
                                       start=position + r * cfg.prompts_per_step))
                seeds = [cfg.seed * 1_000_000_007 + pos * G + k for pos, _ in chunk for k in range(G)]
                traces = group_traces(bare.stream([render_prompt(ex.question, trainer.tokenizer) for _, ex in chunk],
                                                  group_size=G, seed=seeds))
                tokens += sum(t.done.tokens_generated for t in traces)
            _sync(dev)
            bare_t.append(time.perf_counter() - t0)
            if tokens != roll_tok[-1]:
                raise RuntimeError(f"the bare engine generated {tokens} tokens, the trainer {roll_tok[-1]}: not the "
                                   f"same rollouts, so the timings do not compare")
            rewards = [reward(t.done.text, t.start.gold, opened=trainer._opened) for t in kept]
            batch = build_batch(kept, rewards, trainer.generator.pad_id,
                                mask_truncated=cfg.mask_truncated_completions,
                                erased_rows=cfg.trains_erased)
            progress(f"step {step + 1}/{steps}: optimizer phase ({len(batch)} rows x {batch.input_ids.shape[1]})")
            for fn, times in ((lambda: _plain_step(trainer, batch), plain_t), (lambda: trainer._optimize(batch), opt_t)):
                _sync(dev)
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                times.append(time.perf_counter() - t0)
            trainer.step += 1
    toks = sum(roll_tok)
    ratio_roll = statistics.median(b / r for b, r in zip(bare_t, roll_t))
    ratio_opt = statistics.median(p / o for p, o in zip(plain_t, opt_t))
    setting = (f"{algo}, G={cfg.num_generations} x {cfg.prompts_per_step} prompts, "
               f"{cfg.effective_generation().max_new_tokens} max new tokens, {steps} steps")
    result.rows.append(BenchRow(
        "rollouts", setting, f"{toks / sum(roll_t):,.0f} tok/s (trainer)", f"{toks / sum(bare_t):,.0f} tok/s (bare engine)",
        f"{ratio_roll:.2f}x", ">= 0.9x"))
    result.rows.append(BenchRow(
        "optimizer phase", setting + f", micro-batch {cfg.micro_batch_size or 'all'}",
        f"{statistics.median(opt_t) * 1e3:,.0f} ms (_optimize)",
        f"{statistics.median(plain_t) * 1e3:,.0f} ms (forward + backward)", f"{ratio_opt:.2f}x", ">= 0.8x"))
    share = sum(roll_t) / (sum(roll_t) + sum(opt_t))
    result.notes.append(f"rollouts are {share:.0%} of the measured step time; ratio = reference time / trainer time "
                        f"(1.0 = no overhead), median over steps")
    return result

