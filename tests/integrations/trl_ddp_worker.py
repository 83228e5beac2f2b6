"""One process of tests/integrations/test_trl.py's data-parallel run (launched by torchrun): two
TRL steps with E3RLGRPOTrainer and E3RLRollout; writes what the test checks to OUT/result.rank{k}.json."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from e3rl_core.generation.config import GenerationConfig  # noqa: E402
from e3rl_core.integrations import trl as bridge  # noqa: E402
from e3rl_core.models import load_model  # noqa: E402
from e3rl_core.overrides import apply_overrides  # noqa: E402


def main(model: str, out: str) -> None:
    tok = load_model(model, device="cpu")[1]
    ds = Dataset.from_list([{"prompt": p} for p in ["12+7=", "3*45-6=", "8-3=", "9*9="]])
    args = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, report_to=[], max_steps=2, logging_steps=1,
                      save_strategy="no", per_device_train_batch_size=8, num_generations=4, max_completion_length=32,
                      learning_rate=1e-3, optim="adamw_torch", scale_rewards="none", disable_tqdm=True)
    gen = apply_overrides(GenerationConfig(), ["segment.mode=fixed", "segment.segment_tokens=8", "threshold.policy=fixed",
                                               "threshold.value=0.5", "erase.budget=2"])
    trainer = bridge.E3RLGRPOTrainer(model, reward_funcs=lambda completions, **_: [len(c) % 5 / 4 for c in completions],
                                     args=args, train_dataset=ds, processing_class=tok,
                                     rollout_func=bridge.E3RLRollout(bridge.RolloutSettings(gen, log_rollouts=-1)))
    trainer.train()
    weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    rank = trainer.accelerator.process_index
    # one file per process: two processes printing to one pipe can interleave their lines
    (Path(out) / f"result.rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": trainer.accelerator.num_processes, "steps": trainer.state.global_step,
        "erasures": [h["e3rl/erasures_per_rollout"] for h in trainer.state.log_history if "loss" in h],
        "checksum": float(sum(v.double().sum() for v in weights.values()))}))

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
