"""GRPO in TRL on E3RL's self-healed rollouts: a script to copy.

    pip install 'e3rl-workbench[trl]'
    python examples/trl_e3rl.py                                   # the shipped demo model, offline, CPU
    python examples/trl_e3rl.py --model Qwen/Qwen3-4B --data "deepmath:/data/deepmath.parquet?difficulty_min=5" \
        --learning-rate 1e-6 --max-completion-length 4096 --out runs/qwen3-e3rl

Everything but the rollouts and the advantages is TRL's: GRPOConfig, the optimizer, accelerate,
PEFT, logging and checkpoints. The rollout appends its traces to OUT/rollouts.jsonl, which the
workbench's Audit tab (and ``e3rl audit``) opens like any trace file.
"""
from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig

from e3rl_core.integrations.trl import E3RLGRPOTrainer, E3RLRollout, accuracy_reward
from e3rl_core.tasks.datasets import USER_TEMPLATE, load_examples, render_prompt


def prompts(data: str, tokenizer) -> Dataset:
    """A dataset of prompts and gold answers. A chat model gets conversations (the rollout applies
    its chat template); a model without a template gets plain text."""
    rows = []
    for ex in load_examples(data):  # or: datasets.load_dataset("zwhe99/DeepMath-103K", split="train")
        if tokenizer.chat_template:
            prompt = [{"role": "user", "content": USER_TEMPLATE.replace("{question}", ex.question)}]
        else:
            prompt = render_prompt(ex.question, tokenizer)
        rows.append({"prompt": prompt, "answer": ex.answer})  # `answer` reaches accuracy_reward by name
    return Dataset.from_list(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/arith-demo", help="a model directory or hub id")
    p.add_argument("--data", default="synthetic:train?n=4000&seed=1", help="an e3rl dataset SPEC (see e3rl train)")
    p.add_argument("--out", default="runs/trl-e3rl")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=1e-4, help="1e-4 suits the 1.6M-parameter demo model")
    args = p.parse_args()

    gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = GRPOConfig(
        output_dir=args.out,
        max_steps=args.max_steps,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,  # one optimizer step per batch
        max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        loss_type="dapo",  # token-mean loss with clip-higher, as `e3rl train --algo e3rl`
        epsilon_high=0.28,
        beta=0.0,
        logging_steps=1,
        save_steps=25,
        report_to=[],
        use_cpu=not gpu,
        bf16=gpu,
    )
    rollout = E3RLRollout.from_pretrained(args.model)  # the model's recommended erasure settings
    trainer = E3RLGRPOTrainer(
        args.model,
        reward_funcs=accuracy_reward,
        args=config,
        train_dataset=prompts(args.data, tokenizer),
        processing_class=tokenizer,
        rollout_func=rollout,
        allocation="causal_attention",  # E3RL's segment-level advantages; "uniform" = TRL's own
    )
    trainer.train()
    trainer.save_model(args.out)
    rollout.save_pretrained(args.out)  # e3rl_generation.json: the workbench decodes it as it was trained


if __name__ == "__main__":
    main()
