"""How often does an E3RL erasure help, and how often does it hurt? The decision-effect audit
(``e3rl audit --effects``) on the shipped model and on one E3RL training run.

    python scripts/decision_effects.py shipped                 # 100 held-out problems, G = 4, the app's defaults
    python scripts/decision_effects.py training RUN_DIR        # first and last quarter of a run's rollouts
    python scripts/decision_effects.py readings ROOT           # both quarters of every E3RL run of a readings study
    python scripts/decision_effects.py report                  # docs/results/effects/README.md from what exists

Each part is resumable (run it again after a stop). Outputs go to docs/results/effects/<part>/: the
job's effects.csv, aggregates.json, calibration.html and record (effects.jsonl, with every
continuation's text, stays beside them; it is large and not committed). ``readings`` keeps each
run's jobs under ROOT/<run>/effects/ and writes the rows pooled over seeds, per reading and quarter,
to docs/results/<name>-effects.md and .json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from app.session import GenRequest  # noqa: E402  (the Generate tab's defaults)
from e3rl_core.errors import E3RLError  # noqa: E402
from e3rl_core.evaluation.effect_stats import aggregates, summary_text  # noqa: E402
from e3rl_core.evaluation.effects import EffectsConfig, EffectsError  # noqa: E402
from e3rl_core.evaluation.experiment import READINGS, RunSpec  # noqa: E402
from e3rl_core.evaluation.effects_job import JOB_FILE, JobSpec, read_rows, run_job, run_quarters  # noqa: E402
from e3rl_core.evaluation.evaluate import evaluate  # noqa: E402
from e3rl_core.events import TraceWriter  # noqa: E402
from e3rl_core.generation.generator import ErasableGenerator  # noqa: E402
from e3rl_core.models import load_model  # noqa: E402
from e3rl_core.outdirs import read_json  # noqa: E402
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


def measure_quarters(run: Path, start: str, out: Path, samples: int) -> dict[str, dict]:
    """Both quarters' jobs of one run (resumable); each quarter's final record."""
    records = {}
    for name, (span, model_path, other) in run_quarters(run, start).items():
        model, tok = load_model(model_path)
        spec = JobSpec(traces=[str(run / "rollouts.jsonl")], model=model_path, steps=span, other_model=other,
                       config=EffectsConfig(samples=samples))
        print(f"{run.parent.name} {name}: steps {span[0]}..{span[1]}, branched with {model_path}", flush=True)
        records[name] = run_job(spec, out / name, model, tok, progress=progress)
    return records


def training(run: Path, samples: int) -> None:
    """The first and the last quarter of one training run's rollouts (docs/results/effects/training)."""
    start = json.loads((run / "config.json").read_text())["model"] if (run / "config.json").is_file() else MODEL
    for rec in measure_quarters(run, start, RESULTS / "training", samples).values():
        print(summary_text(rec["aggregates"]))


def study_runs(root: Path) -> list[tuple[RunSpec, Path]]:
    """The finished E3RL runs of a readings study, seed by seed across the readings (as it runs them)."""
    out = []
    for seed in itertools.count():
        specs = [RunSpec(row, algo, seed, list(ov)) for row, algo, ov in READINGS if algo == "e3rl"]
        if not any((root / s.run_id).exists() for s in specs):
            return out
        out += [(s, root / s.run_id) for s in specs if (root / s.run_id / "result.json").is_file()]
    return out


def readings(root: Path, samples: int, name: str, only: list[str] | None, measure: bool = True) -> None:
    """Both quarters of every finished E3RL run of a readings study (``only``: of these readings;
    two processes can split the readings between them), then the rows of every finished job pooled
    over seeds per reading: does training under a reading make the erasure rule better or worse?"""
    settings = read_json(root / "settings.json")
    if not isinstance(settings, dict) or not isinstance(settings.get("model"), str):
        raise EffectsError(f"{root} holds no readings study (settings.json naming its starting model); pass the "
                           f"folder that scripts/reproduce.py --plan readings trained in (its --root)")
    start = settings["model"]
    runs = study_runs(root)
    for spec, folder in runs:
        if measure and (not only or spec.name in only):
            measure_quarters(folder / "run", start, folder / "effects", samples)
    pooled: dict[tuple[str, str], dict] = {}
    for spec, folder in runs:
        for quarter, (span, model_path, _) in run_quarters(folder / "run", start).items():
            entry = pooled.setdefault((spec.name, quarter), {"runs": [], "rows": [], "unfinished": []})
            record = read_json(folder / "effects" / quarter / JOB_FILE) or {}
            measured = record.get("settings", {}).get("config", {}).get("samples")
            if record.get("status") != "finished" or measured != samples:
                entry["unfinished"].append(spec.run_id)
                continue
            entry["runs"].append({"run": spec.run_id, "model": model_path, "steps": list(span),
                                  "decisions": record["done"], "seconds": record["seconds"]})
            entry["rows"] += read_rows(folder / "effects" / quarter)
    write_readings(pooled, start, samples, name)


def _pct(c: int, n: int) -> str:
    return f"{c} ({100 * c / n:.0f}%)" if n else "0"


def readings_table(pooled: dict[tuple[str, str], dict]) -> tuple[str, dict]:
    """One line per reading and quarter, the aggregates of the rows pooled over its seeds."""
    head = ("| reading | quarter | seeds | decisions | erasures | mean effect of an erasure | helped | hurt | "
            "chance each way | erased by margin < 0.001 | on the first slip (precision) | after a slip (helped) | "
            "missed erasures / accepted | AUROC U | AUROC U − Θ |")
    lines = [head, "|" + "---|" * 15]
    out = {}
    for (row, quarter), entry in pooled.items():
        agg = aggregates(entry["rows"]) if entry["rows"] else None
        out[f"{row} / {quarter}"] = {"runs": entry["runs"], "not_measured_yet": entry["unfinished"],
                                     "aggregates": agg}
        if agg is None:
            lines.append(f"| {row} | {quarter} | {len(entry['runs'])} | 0 |" + " - |" * 11)
            continue
        e, a, s = agg["erased"], agg["accepted"], agg.get("slips") or {}
        auc = [("-" if x is None else f"{x:.3f}") for x in (agg["auroc_score"], agg["auroc_margin"])]
        prec = "-" if s.get("precision") is None else f"{s['erasures_on_first_slip']} ({s['precision']:.2f})"
        after = f"{s.get('erasures_after_a_slip', 0)} ({s.get('erasures_after_a_slip_that_helped', 0)})"
        effect = "-" if e["mean_effect"] is None else f"{e['mean_effect']:+.3f}"
        lines.append(f"| {row} | {quarter} | {len(entry['runs'])} | {agg['decisions']} | {e['n']} | {effect} | "
                     f"{_pct(e['helps'], e['n'])} | {_pct(e['hurts'], e['n'])} | {e['chance_helps']:.1f} | "
                     f"{_pct(agg['erased_near_threshold']['n'], e['n'])} | {prec} | {after} | "
                     f"{a['helps']} / {a['n']} | {auc[0]} | {auc[1]} |")
    return "\n".join(lines), out


def write_readings(pooled: dict[tuple[str, str], dict], start: str, samples: int, name: str) -> None:
    table, data = readings_table(pooled)
    text = "\n".join([
        f"# Decision effects per reading ({name}; generated by scripts/decision_effects.py readings)", "",
        f"Every erasure decision (and every accepted segment) in the rollouts each E3RL run logged (2 per step; R3 "
        f"also 2 of the step's healed ones) in "
        f"the first and the last quarter of its steps, branched K = {samples} times from the segment start with "
        f"the segment kept and K times redrawn, erasure off in the branches. The first quarter is branched with the "
        f"starting model ({start}); the last with the run's checkpoint named in the JSON (a study keeps its last "
        f"two, so that checkpoint lies inside the quarter). Rows are pooled over the seeds. 'helped' / 'hurt': the "
        f"redraw was right more / less often than the kept segment, with a 95% interval excluding 0; 'chance each "
        f"way' is what the test would flag with no effect at all; the mean effect is P(right | redraw) - "
        f"P(right | keep) averaged over the erasures.", "", table, ""]
        + [f"Not measured yet: {key}: {', '.join(v['not_measured_yet'])}." for key, v in data.items()
           if v["not_measured_yet"]])
    out = REPO / "docs" / "results"
    (out / f"{name}-effects.md").write_text(text)
    (out / f"{name}-effects.json").write_text(json.dumps({"start": start, "samples": samples, "rows": data},
                                                         indent=2, default=str))
    print(text)


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
    p.add_argument("part", choices=("shipped", "training", "readings", "report"))
    p.add_argument("run", nargs="?", help="the training run's folder (training); the study's root (readings)")
    p.add_argument("--name", default="readings-level3", help="readings: file name stem of the outputs")
    p.add_argument("--only", action="append", help="readings: measure only these readings (e.g. 'E3RL R0')")
    p.add_argument("--report-only", action="store_true", help="readings: measure nothing, pool what is finished")
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
    elif args.part == "readings":
        if not args.run:
            p.error("readings needs the study's root (e.g. runs/regime-level3)")
        try:
            readings(Path(args.run), args.samples, args.name, args.only, measure=not args.report_only)
        except E3RLError as err:  # a folder that is not a study, a run without run.json or checkpoints
            p.error(str(err))
        return
    report()


if __name__ == "__main__":
    main()
