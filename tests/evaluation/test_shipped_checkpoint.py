"""The shipped checkpoints: plain transformers loads them, and `e3rl eval` runs on them."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from e3rl_core.cli import main
from e3rl_core.tasks.arith import problems

CKPT = Path(__file__).resolve().parents[2] / "checkpoints" / "arith-demo"
TRAINED = CKPT.with_name("arith-demo-grpo")


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


def test_the_trained_checkpoint_is_the_demo_model_after_rl():
    """arith-demo-grpo: same shape, tokenizer and E3RL decoding settings as the model it was trained
    from (so the app compares the weights alone), other weights, a card and its training log."""
    assert sum(p.stat().st_size for p in TRAINED.iterdir()) < 25 * 2**20
    base, trained = (AutoModelForCausalLM.from_pretrained(p) for p in (CKPT, TRAINED))
    shape = lambda m: {k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert shape(base) == shape(trained)
    for name in ("tokenizer.json", "e3rl_generation.json"):
        assert (TRAINED / name).read_text() == (CKPT / name).read_text(), name
    a, b = base.state_dict(), trained.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    card = (TRAINED / "README.md").read_text()
    assert "--algo grpo" in card and "0.4893" in card
    log = [json.loads(line) for line in (TRAINED / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 63)) and log[-1]["rollout_tokens_total"] == 600_132
