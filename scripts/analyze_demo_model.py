"""Measure how the demo model fails, whether its uncertainty sees the failures, and what erasure buys.

    python scripts/analyze_demo_model.py --model checkpoints/arith-demo --n 200 --out docs/results/demo-model.json

1. Greedy accuracy on a mixed-difficulty test set, per level; failures split into wrong-step
   (well-formed steps, wrong arithmetic or a wrong copied value) and format (anything else).
2. The first wrong token: the task's solutions are canonical, so the first token where a greedy
   completion leaves the reference solution is its first mistake. Entropy and surprisal there vs
   at the correct tokens before it: means and AUROC.
3. Accuracy and tokens with erasure off vs on, greedy and at T = 1, for a few threshold settings.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from e3rl_core.evaluation.evaluate import evaluate
from e3rl_core.generation.config import GenerationConfig
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.generation.signals import sequence_signals
from e3rl_core.models import load_model
from e3rl_core.overrides import apply_overrides
from e3rl_core.tasks.arith import problems
from e3rl_core.tasks.datasets import Example
from e3rl_core.tasks.rewards import extract_answer, is_correct

STEP = re.compile(r"^([a-h]) = (\d+) ([+\-*]) (\d+) = (\d+)$")


def classify(question: str, completion: str) -> str:
    """correct / wrong_step / format."""
    lines = completion.strip().split("\n")
    if not lines or not re.fullmatch(r"\\boxed\{\d+\}", lines[-1]):
        return "format"
    n_steps = question.count(" = ")
    steps = lines[:-1]
    if len(steps) != n_steps or not all(STEP.match(s) for s in steps):
        return "format"
    return "wrong_step"


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    scores = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    rank_sum, i = 0.0, 0
    while i < len(scores):
        j = i
        while j < len(scores) and scores[j][0] == scores[i][0]:
            j += 1
        avg_rank = (i + j + 1) / 2
        rank_sum += avg_rank * sum(1 for k in range(i, j) if scores[k][1] == 1)
        i = j
    n1, n0 = len(pos), len(neg)
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)


def first_wrong_signals(model, tok, probs, completions):
    """Signals at each failure's first wrong token and at the correct tokens before it."""
    wrong_e, wrong_s, right_e, right_s = [], [], [], []
    for p, text in zip(probs, completions):
        ref = p.solution
        if text.strip() == ref:
            continue
        k = next((i for i, (a, b) in enumerate(zip(text, ref)) if a != b), min(len(text), len(ref)))
        prompt_ids = tok(p.prompt)["input_ids"]
        comp_ids = tok(text, add_special_tokens=False)["input_ids"]  # one token per character
        if k >= len(comp_ids):
            continue
        ids = torch.tensor([prompt_ids + comp_ids])
        with torch.no_grad():
            ent, sur = sequence_signals(model(ids).logits, ids)
        off = len(prompt_ids) - 1
        wrong_e.append(float(ent[0, off + k]))
        wrong_s.append(float(sur[0, off + k]))
        right_e += ent[0, off : off + k].tolist()
        right_s += sur[0, off : off + k].tolist()
    return wrong_e, wrong_s, right_e, right_s


def histogram(values: list[float], edges: list[float]) -> list[int]:
    return [sum(lo <= v < hi for v in values) for lo, hi in zip(edges, edges[1:])]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--samples", type=int, default=4, help="samples per problem at T = 1")
    ap.add_argument("--out")
    args = ap.parse_args()
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    probs = problems("test", args.n, seed=0)
    examples = [Example(id=p.id, question=p.question, answer=p.answer, difficulty=p.difficulty) for p in probs]
    base = ["max_new_tokens=256", "segment.mode=delimiter", "segment.segment_tokens=32", "erase.budget=3"]
    report: dict = {"model": args.model, "n_problems": len(probs)}

    # 1. greedy, erasure off
    gen = ErasableGenerator(model, tok, apply_overrides(GenerationConfig(), base + [
        "sampling.temperature=0", "threshold.policy=none"]), checker=is_correct, answer_fn=extract_answer)
    summary, rows = evaluate(gen, examples, samples=1)
    texts = {r["problem_id"]: r["text"] for r in rows}
    kinds = [("correct" if r["correct"] else classify(p.question, r["text"])) for p, r in zip(probs, rows)]
    fails = [k for k in kinds if k != "correct"]
    report["greedy"] = {
        "accuracy": summary.avg_at_k, "by_difficulty": summary.accuracy_by_difficulty,
        "failures": len(fails), "wrong_step": fails.count("wrong_step"), "format": fails.count("format"),
    }
    print(json.dumps(report["greedy"]), file=sys.stderr)

    # 2. first wrong token
    we, ws, re_, rs = first_wrong_signals(model, tok, probs, [texts[p.id] for p in probs])
    edges = [0, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 100]
    report["first_wrong_token"] = {
        "n_failures": len(we), "n_correct_tokens": len(re_),
        "entropy_mean_wrong": sum(we) / max(1, len(we)), "entropy_mean_correct": sum(re_) / max(1, len(re_)),
        "surprisal_mean_wrong": sum(ws) / max(1, len(ws)), "surprisal_mean_correct": sum(rs) / max(1, len(rs)),
        "entropy_auroc": auroc(we, re_) if we and re_ else None,
        "surprisal_auroc": auroc(ws, rs) if ws and rs else None,
        "entropy_hist_edges": edges, "entropy_hist_wrong": histogram(we, edges),
        "entropy_hist_correct": histogram(re_, edges),
    }
    print(json.dumps({k: v for k, v in report["first_wrong_token"].items() if "hist" not in k}), file=sys.stderr)

    # 3. erasure off vs on
    settings = {
        "off": ["threshold.policy=none"],
        "fixed U>1.0": ["threshold.policy=fixed", "threshold.value=1.0"],
        "fixed U>1.5": ["threshold.policy=fixed", "threshold.value=1.5"],
        "e3rl (group)": ["threshold.policy=e3rl"],
    }
    runs = []
    for temp, samples in ((0.0, 1), (1.0, args.samples)):
        for name, extra in settings.items():
            if temp == 0.0 and name == "e3rl (group)":
                continue  # a greedy group is G identical rollouts: no group statistics
            cfg = apply_overrides(GenerationConfig(), base + [f"sampling.temperature={temp}"] + extra)
            gen = ErasableGenerator(model, tok, cfg, checker=is_correct, answer_fn=extract_answer)
            t0 = time.perf_counter()
            s, _ = evaluate(gen, examples, samples=samples, seed=1)
            runs.append({
                "temperature": temp, "samples": samples, "setting": name, "accuracy": s.avg_at_k,
                "pass_at_k": s.pass_at_k, "tokens_generated": s.mean_tokens_generated,
                "tokens_kept": s.mean_tokens_kept, "erase_rate": s.erase_rate,
                "by_difficulty": s.accuracy_by_difficulty, "seconds": time.perf_counter() - t0,
            })
            print(json.dumps(runs[-1]), file=sys.stderr)
    report["erasure"] = runs
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
