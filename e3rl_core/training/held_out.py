"""Held-out evaluation around a training run (TRL's ``eval_dataset``): with ``eval_data`` set, the
policy is scored on it before the first step and after the last (Avg@K and Pass@k, K =
``eval_samples``, plain sampling at the rollout temperature, erasure off, seed 0), so a run says
whether it improved the model on problems it never trained on. Results and progress go to
OUT/eval.json, which the Train tab reads:

    {"data": SPEC, "samples": K, "before": {... EvalSummary, "step": 0},
     "after": {..., "step": N}, "running": {"label": "after", "done": 40, "total": 100}}

Evaluation leaves the training RNG as it found it, so a run with evaluation trains exactly as one
without, and a resumed run as one that was never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..generation.generator import ErasableGenerator
from ..tasks.datasets import DataError, Example, load_examples
from ..tasks.rewards import extract_answer
from . import checkpoint as ckpt

EVAL_FILE = "eval.json"


def load_eval_examples(spec: str) -> list[Example]:
    """The held-out examples, loaded when the trainer starts so a bad spec fails before any step."""
    examples = load_examples(spec)
    if not examples:
        raise DataError(f"eval_data {spec} yields no problems; check the file or loosen its filters")
    if any(ex.answer is None for ex in examples):
        raise DataError(f"eval_data {spec} has problems without a gold answer; held-out accuracy needs one")
    return examples


def read(out: Path) -> dict[str, Any]:
    """eval.json of a run directory ({} before any evaluation, or while it is being replaced)."""
    try:
        return json.loads((out / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return {}


def run(trainer: Any, label: str, examples: list[Example]) -> dict[str, Any]:
    """Score the trainer's current policy on ``examples``; stores the summary under ``label``
    ("before" or "after") in OUT/eval.json, with progress while it runs."""
    from ..evaluation.evaluate import evaluate

    cfg = trainer.cfg
    if trainer.rollout_copy is not None:  # parallel=fsdp: the copy is refreshed before each step's rollouts
        trainer.rollout_copy.refresh(trainer.model)
    gen_cfg = dataclasses.replace(trainer.gen_config,
                                  erase=dataclasses.replace(trainer.gen_config.erase, enabled=False))
    gen = ErasableGenerator(trainer.rollout_model, trainer.tokenizer, gen_cfg, model_name=trainer.model_spec,
                            checker=trainer._correct, answer_fn=partial(extract_answer, opened=trainer._opened))
    path = trainer.out / EVAL_FILE
    record = read(trainer.out)
    if record.get("data") != cfg.eval_data or record.get("samples") != cfg.eval_samples:
        record = {}  # another held-out set: the old figures do not compare
    record.update(data=cfg.eval_data, samples=cfg.eval_samples)
    done, last_write = 0, 0.0

    def progress(n: int) -> None:
        nonlocal done, last_write
        done += n
        if time.time() - last_write > 1.0 or done == len(examples):  # the tab polls every 2 s
            ckpt.write_json_atomic(path, {**record, "running": {"label": label, "done": done, "total": len(examples)}})
            last_write = time.time()

    progress(0)
    rng = (random.getstate(), torch.get_rng_state())
    t0 = time.time()
    try:
        summary, _ = evaluate(gen, examples, samples=cfg.eval_samples, seed=0, on_problem_done=progress)
    finally:
        random.setstate(rng[0])
        torch.set_rng_state(rng[1])
    record[label] = {**summary.to_dict(), "step": trainer.step, "rollout_tokens": trainer.tokens_total,
                     "seconds": time.time() - t0}
    ckpt.write_json_atomic(path, record)
    return record[label]
