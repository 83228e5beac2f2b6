"""The shipped demo checkpoint: plain transformers loads it, and `e3rl eval` runs on it."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from e3rl_core.cli import main
from e3rl_core.tasks.arith import problems

CKPT = Path(__file__).resolve().parents[2] / "checkpoints" / "arith-demo"


def test_loads_with_plain_transformers_and_solves_a_step():
    model = AutoModelForCausalLM.from_pretrained(CKPT)
    tok = AutoTokenizer.from_pretrained(CKPT)
    assert sum(p.stat().st_size for p in CKPT.iterdir()) < 25 * 2**20
    prompt = problems("test", 1, seed=0, difficulty=1)[0].prompt
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=80, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.startswith("a = ") and "\\boxed{" in text  # the step format it was trained on


def test_eval_on_the_shipped_checkpoint(capsys):
    code = main(["eval", "--model", str(CKPT), "--data", "synthetic:test?n=4&difficulty=1", "--samples", "2",
                 "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_problems"] == 4 and 0.0 <= summary["avg_at_k"] <= 1.0
    assert summary["mean_tokens_kept"] > 10  # it writes out its steps
