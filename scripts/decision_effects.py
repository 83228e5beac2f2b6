"""How often does an E3RL erasure help, and how often does it hurt? The decision-effect audit
(``e3rl audit --effects``) on the shipped model and on one E3RL training run.

    python scripts/decision_effects.py shipped                 # 100 held-out problems, G = 4, the app's defaults
    python scripts/decision_effects.py training RUN_DIR        # first and last quarter of a run's rollouts
    python scripts/decision_effects.py report                  # docs/results/effects/README.md from what exists

Each part is resumable (run it again after a stop). Outputs go to docs/results/effects/<part>/: the
job's effects.csv, aggregates.json, calibration.html and record (effects.jsonl, with every
continuation's text, stays beside them; it is large and not committed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from app.session import GenRequest  # noqa: E402  (the Generate tab's defaults)
from e3rl_core.evaluation.effect_stats import aggregates, summary_text  # noqa: E402
from e3rl_core.evaluation.effects import EffectsConfig  # noqa: E402
from e3rl_core.evaluation.effects_job import JOB_FILE, JobSpec, read_rows, run_job  # noqa: E402
from e3rl_core.evaluation.evaluate import evaluate  # noqa: E402
from e3rl_core.events import TraceWriter  # noqa: E402
from e3rl_core.generation.generator import ErasableGenerator  # noqa: E402
from e3rl_core.models import load_model  # noqa: E402
from e3rl_core.tasks.datasets import load_examples  # noqa: E402
from e3rl_core.tasks.rewards import for_prompt  # noqa: E402

RESULTS = REPO / "docs" / "results" / "effects"
# The training run of docs/results/effects/training: the reproduction's E3RL settings, seed 0, with 32
# rollouts per step logged (4 whole groups; the default logs 2) so a quarter holds ~400 rollouts.
TRAIN_COMMAND = ("e3rl train --model checkpoints/arith-demo --data 'synthetic:train?n=4000&seed=1' --algo e3rl "
                 "--seed 0 --group-size 8 --prompts-per-step 16 --learning-rate 1e-4 --token-budget 600000 "
                 "--steps 1000 --save-steps 13 --device cpu --set log_rollouts=32 --out RUN")
MODEL = "checkpoints/arith-demo"
TEST = "synthetic:test?n=100"


def progress(done: int, total: int, row: dict | None) -> None:
    if done % 50 == 0 or done == total:
        print(f"  {done}/{total} decisions", flush=True)


def shipped(samples: int) -> None:
    """Traces of 100 held-out problems (G = 4, the Generate tab's defaults), then their effects."""
    out = RESULTS / "shipped"
    out.mkdir(parents=True, exist_ok=True)
    traces = out / "traces.jsonl.gz"
    model, tok = load_model(MODEL)
    if not traces.is_file():
        req = GenRequest(model=MODEL, prompt="-")
        config = req.config(str(REPO / MODEL))
        config.record_top_k = 0  # hover cards only: the tokens and decisions are the same
        answer_fn, checker = for_prompt("")
        gen = ErasableGenerator(model, tok, config, model_name=MODEL, checker=checker, answer_fn=answer_fn)
        tmp = traces.with_name("partial-" + traces.name)
        with TraceWriter(tmp) as writer:
            summary, _ = evaluate(gen, load_examples(TEST), samples=req.group_size, seed=req.seed,
                                  on_events=lambda evs: [writer.write(e) for e in evs])
        tmp.rename(traces)
        print(f"traces: Avg@{req.group_size} {summary.avg_at_k:.3f}, erase rate {summary.erase_rate:.3f}")
    spec = JobSpec(traces=[str(traces)], model=MODEL, config=EffectsConfig(samples=samples))
    record = run_job(spec, out / "job", model, tok, progress=progress)
    print(summary_text(record["aggregates"]))


def training(run: Path, samples: int) -> None:
    """The first and the last quarter of a run's rollouts: the first branched with the starting model
    (the policy that wrote step 1), the last with the checkpoint nearest before that quarter."""
    record = json.loads((run / "run.json").read_text())
    steps = int(record["step"])
    quarter = max(1, math.ceil(steps / 4))
    start = json.loads((run / "config.json").read_text())["model"] if (run / "config.json").is_file() else MODEL
    last_first = steps - quarter + 1
    ckpts = sorted((int(p.name.split("-")[1]), p) for p in run.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    before = [p for s, p in ckpts if s < last_first] or [p for _, p in ckpts]
    parts = {"first-quarter": ((1, quarter), start, False),
             "last-quarter": ((last_first, steps), str(before[-1]), True)}
    for name, (span, model_path, other) in parts.items():
        model, tok = load_model(model_path)
        spec = JobSpec(traces=[str(run / "rollouts.jsonl")], model=model_path, steps=span, other_model=other,
                       config=EffectsConfig(samples=samples))
        print(f"{name}: steps {span[0]}..{span[1]}, branched with {model_path}", flush=True)
        rec = run_job(spec, RESULTS / "training" / name, model, tok, progress=progress)
        print(summary_text(rec["aggregates"]))


def report() -> None:
    """docs/results/effects/README.md: each finished part's aggregates."""
    lines = ["# Decision effects (generated by scripts/decision_effects.py)", "",
             "`shipped/`: the shipped model on 100 held-out problems, G = 4 under the Generate tab's defaults "
             "(`python scripts/decision_effects.py shipped`). `training/`: one E3RL training run, "
             f"`OMP_NUM_THREADS=1 {TRAIN_COMMAND}`, then `python scripts/decision_effects.py training RUN`.", ""]
    for job in sorted(RESULTS.glob("**/" + JOB_FILE)):
        rec = json.loads(job.read_text())
        rec["aggregates"] = aggregates(read_rows(job.parent))  # a job still running has none recorded yet
        part = job.parent.relative_to(RESULTS)
        st = rec["settings"]
        lines += [f"## {part}", "",
                  f"model branched: `{rec['model']}` (traces written by `{rec['trace_model']}`); "
                  f"K = {st['config']['samples']}, erasure in branches {'on' if st['config']['erasure'] else 'off'}, "
                  f"steps {st['steps'] or 'all'}; status {rec['status']}, {rec['done']}/{rec['total']} decisions "
                  f"in {rec['seconds']:.0f} s", "", "```", summary_text(rec["aggregates"]), "```", "",
                  f"Calibration plot: [{part}/calibration.html]({part}/calibration.html)", ""]
    (RESULTS / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("shipped", "training", "report"))
    p.add_argument("run", nargs="?", help="the training run's folder (training)")
    p.add_argument("--samples", type=int, default=8, help="K continuations per branch")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "shipped":
        shipped(args.samples)
    elif args.part == "training":
        if not args.run:
            p.error("training needs the run's folder")
        training(Path(args.run), args.samples)
    report()


if __name__ == "__main__":
    main()
