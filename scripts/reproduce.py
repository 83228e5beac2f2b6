"""Miniature reproduction of the paper's claim on the synthetic task (see docs/results/).

    python scripts/reproduce.py                       # 5 seeds x GRPO/DAPO/E3RL + 6 ablations/variants x 2 seeds, 2 at a time
    python scripts/reproduce.py --seeds 1 --no-ablations --token-budget 50000   # a quick look
    nohup python scripts/reproduce.py > runs/reproduce.log 2>&1 &                 # in the background
    python scripts/reproduce.py --plan readings --seeds 3 --model M --root runs/readings --name readings
    python scripts/reproduce.py --report-only         # the outputs from the runs finished so far

Every run trains from the starting checkpoint to the same rollout-token budget in --eval-points legs
and is scored after each on held-out test problems (Avg@K at T = 1, erasure off; after the last,
erasure on too), so every run has a learning curve. Runs are resumable: finished legs and
evaluations are kept and finished runs (ROOT/<run>/result.json) skipped, so the comparison can be
completed in parts; run the same command again after a stop. Writes NAME.json, NAME-table.md and
NAME.html (plotly: Avg@K vs rollout tokens, mean ± 95% band over seeds; training reward) to
--results.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e3rl_core.errors import E3RLError  # noqa: E402
from e3rl_core.evaluation.curves import learning_figure, sample_efficiency  # noqa: E402
from e3rl_core.evaluation.experiment import (Settings, baseline, markdown_table, paired_text, plan,  # noqa: E402
                                             readings_plan, run_all, summarize)


def _ratio(v: float) -> str:
    return "∞" if math.isinf(v) else f"{v:.2f}"


def efficiency_text(eff: dict | None) -> str:
    if not eff:
        return ""
    reach = (f"does not reach {eff['ref']}'s final mean Avg@K ({eff['target']:.3f}) within the budget"
             if math.isinf(eff["ratio"]) else
             f"reaches {eff['ref']}'s final mean Avg@K ({eff['target']:.3f}) with {eff['ratio']:.2f}× the rollout "
             f"tokens {eff['ref']} used")
    return (f"Sample efficiency: {eff['name']} {reach}. 95% bootstrap interval of that ratio over seeds "
            f"({eff['seeds'][0]} and {eff['seeds'][1]}, {eff['n_boot']} resamples; ∞ = not reached): "
            f"{_ratio(eff['ci_low'])} – {_ratio(eff['ci_high'])}; the target was reached in {eff['reached_share']:.0%} "
            f"of the resamples.\n")


def efficiency_table(effs: list[dict]) -> str:
    """Every other run name's rollout tokens to reach the reference's final Avg@K, as a ratio of
    the reference's tokens (∞: not within the budget), with the bootstrap interval over seeds."""
    if not effs:
        return ""
    lines = [f"| run | seeds | tokens to reach {effs[0]['ref']}'s final {effs[0]['target']:.3f}, × {effs[0]['ref']}'s | "
             f"95% bootstrap interval | resamples that reach it |", "|---|---|---|---|---|"]
    lines += [f"| {e['name']} | {e['seeds'][0]} | {_ratio(e['ratio'])} | {_ratio(e['ci_low'])} – {_ratio(e['ci_high'])} | "
              f"{e['reached_share']:.0%} |" for e in effs]
    return "\n".join(lines) + "\n"


def slips_table(results: list[dict], base: dict) -> str:
    """Slips per 100 steps under plain sampling, before (the starting model) and after, per run name:
    the change from the starting model (over seeds) and the seed-paired difference from GRPO."""
    if not base.get("slips_off"):
        return ""
    from e3rl_core.evaluation.curves import by_name, mean_ci, paired_differences

    start = base["slips_off"]["slips_per_100_steps"]
    flat = [{**r, "slips": r["slips_off"]["slips_per_100_steps"]} for r in results if r.get("slips_off")]
    vs_grpo = paired_differences(flat, "GRPO", key="slips")
    lines = ["| policy | seeds | slips per 100 steps (first wrong step, plain sampling) | change from the starting model "
             "| vs GRPO, seed-paired | samples with a slip |",
             "|---|---|---|---|---|---|",
             f"| starting model | - | {start:.2f} | - | - | {base['slips_off']['samples_with_slip']:.3f} |"]
    for name, runs in by_name(flat).items():
        vals = [r["slips_off"] for r in runs]
        m, h = mean_ci([v["slips_per_100_steps"] for v in vals])
        s, hs = mean_ci([v["samples_with_slip"] for v in vals])
        pm = (lambda a, b: f"{a:.2f} ± {b:.2f}") if len(vals) > 1 else (lambda a, b: f"{a:.2f}")
        vs_text = paired_text(vs_grpo.get(name), digits=2)
        change = f"{m - start:+.2f} ± {h:.2f}" if len(vals) > 1 else f"{m - start:+.2f}"
        lines.append(f"| {name} | {len(vals)} | {pm(m, h)} | {change} | {vs_text} | {pm(s, hs)} |")
    return "\n".join(lines) + "\n"


def steps_table(results: list[dict], base: dict) -> str:
    """The comparison at equal optimizer steps: each run name's final Avg@K against GRPO's curve (same
    seed) read at that run's step count, for runs that took fewer steps than GRPO for the same tokens."""
    from e3rl_core.evaluation.curves import at_equal_steps

    vs = at_equal_steps(results, base, "GRPO")
    if not vs:
        return ""
    lines = ["At equal optimizer steps (GRPO's held-out curve, linear between its evaluations, read at each "
             "run's final step count, same seed):", "",
             "| run | steps (mean) | vs GRPO at the same step, seed-paired |", "|---|---|---|"]
    lines += [f"| {name} | {v['steps']:.0f} | {paired_text(v)} |" for name, v in vs.items()]
    return "\n".join(lines) + "\n"


def dynamics_table(results: list[dict], root: Path) -> str:
    """How each run name trained: its training log's first- and last-quarter means (over seeds) of
    reward, kept rollout tokens' entropy, mean |advantage| per trained token and erased share, read from
    ROOT/<run>/run/log.jsonl."""
    from e3rl_core.evaluation.curves import by_name, training_dynamics

    per_run = {}  # run_id -> its log rows, read once for the table and the correlation below
    for r in results:
        f = root / r["run_id"] / "run" / "log.jsonl"
        if f.is_file():
            per_run[r["run_id"]] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    logs = {name: [per_run[r["run_id"]] for r in runs if r["run_id"] in per_run]
            for name, runs in by_name(results).items()}
    dyn = training_dynamics({n: v for n, v in logs.items() if v})
    if not dyn:
        return ""
    fmt = lambda v, nd: "-" if v is None else f"{v[0]:.{nd}f} → {v[1]:.{nd}f}"  # noqa: E731
    lines = ["| run | seeds | training reward | token entropy (kept rollout tokens) | mean abs advantage per trained token | "
             "erased share of rollout tokens | trained groups with no signal |", "|---|---|---|---|---|---|---|"]
    for name, d in dyn.items():
        zv = fmt(d["zero_variance_groups"], 3)
        if d["zero_variance_groups"] is not None and d["zero_variance_groups_seeds"] < d["seeds"]:
            n = d["zero_variance_groups_seeds"]
            zv += f" ({n} seed{'s' if n != 1 else ''})"  # runs logged before the metric existed
        lines.append(f"| {name} | {d['seeds']} | {fmt(d['reward_mean'], 3)} | {fmt(d['entropy_mean'], 4)} | "
                     f"{fmt(d['advantage_abs_mean'], 3)} | {fmt(d['erase_rate'], 3)} | {zv} |")
    return ("Training dynamics (each cell: mean over the first quarter of a run's steps → over the last "
            "quarter, averaged over seeds):\n\n" + "\n".join(lines) + "\n" + signal_line(results, per_run))


def signal_line(results: list[dict], logs: dict[str, list[dict]]) -> str:
    """Across every run that logged it: does a run's share of trained groups with no signal (mean over
    its steps) go with its final held-out score? Runs of different rows differ in more than that, so
    this is a correlation, not a cause. DAPO drops such groups before training (its share is 0 by
    construction, paid for in rollout tokens), so its runs are left out. ``logs``: run_id -> log rows."""
    from e3rl_core.evaluation.curves import pearson

    xs, ys = [], []
    for r in results:
        if r["spec"]["algo"] == "dapo":
            continue
        vals = [row["zero_variance_groups"] for row in logs.get(r["run_id"], [])
                if isinstance(row.get("zero_variance_groups"), (int, float))]
        if vals:
            xs.append(sum(vals) / len(vals))
            ys.append(r["avg_at_k_off"])
    c = pearson(xs, ys)
    if c is None:
        return ""
    return (f"\nAcross the {c['n']} runs that logged it (DAPO's left out: it drops such groups), a run's mean "
            f"share of trained groups with no signal and its final Avg@K (plain): Pearson r = {c['r']:+.2f} (95% interval {c['low']:+.2f} to {c['high']:+.2f}).\n")


def run_commands(log: Path, root: Path) -> list[str]:
    """The e3rl commands a run (or the baseline) ran, from its commands.log, in order, with ROOT for
    the runs directory and ``python`` for the interpreter: a run's legs and evaluations, seeds
    included, to rerun one by hand."""
    if not log.is_file():
        return []
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("$ "):
            _interpreter, _, args = line[2:].partition(" ")
            out.append("python " + args.replace(str(root.resolve()), "ROOT").replace(str(root), "ROOT"))
    return out


def _finite(eff: dict) -> dict:
    """A sample-efficiency record for JSON: infinite ratios (not reached) as null."""
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in eff.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    p.add_argument("--root", default="runs/reproduce", help="where runs are trained (resumable)")
    p.add_argument("--results", default="docs/results", help="where the table and figure go")
    p.add_argument("--seeds", type=int, default=5, help="seeds of GRPO, DAPO and E3RL")
    p.add_argument("--ablation-seeds", type=int, default=2, help="seeds of each E3RL ablation")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--plan", choices=("reproduction", "readings"), default="reproduction",
                   help="reproduction: GRPO/DAPO/E3RL + ablations; readings: E3RL's readings R0-R3 vs GRPO and DAPO")
    p.add_argument("--more", action="append", help="readings: rows run with --more-seeds (default GRPO, E3RL R0)")
    p.add_argument("--more-seeds", type=int, default=5, help="readings: seeds of the --more rows")
    p.add_argument("--only", action="append", help="run only these names (e.g. --only GRPO)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each single-threaded when > 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: 1 when --jobs > 1, else all)")
    p.add_argument("--model", default=d.model, help="starting checkpoint")
    p.add_argument("--token-budget", type=int, default=d.token_budget)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--eval-points", type=int, default=d.eval_points, help="evaluations per run (every 1/N of the budget)")
    p.add_argument("--test-data", default=d.test_data)
    p.add_argument("--train-data", default=d.train_data)
    p.add_argument("--name", default="reproduction", help="file name stem of the outputs")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the outputs from the runs under --root that have finished")
    p.add_argument("--set", dest="common", action="append", default=list(d.common),
                   help="extra --set for every run (added to the defaults: %(default)s)")
    args = p.parse_args()
    try:
        st = Settings(model=args.model, token_budget=args.token_budget, learning_rate=args.learning_rate,
                      prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                      eval_samples=args.eval_samples, eval_points=args.eval_points, test_data=args.test_data,
                      train_data=args.train_data, common=args.common)
    except E3RLError as err:
        p.error(str(err))
    if args.plan == "readings":  # the readings of how to train on healed rollouts (docs/method.md §6)
        specs = readings_plan(args.seeds, more=args.more or ("GRPO", "E3RL R0"), more_seeds=args.more_seeds)
    else:
        specs = plan(args.seeds, not args.no_ablations, args.ablation_seeds)
    specs = [s for s in specs if not args.only or s.name in args.only]
    root = Path(args.root)
    settings_file = root / "settings.json"
    if settings_file.is_file():  # finished runs are reused, so they must have been run like the new ones
        old = json.loads(settings_file.read_text())
        differ = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in asdict(st).items() if old.get(k) != v]
        if differ:
            p.error(f"{root} holds runs made with other settings ({'; '.join(differ)}); use another --root")
    root.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(asdict(st), indent=2))
    t0 = time.time()
    print(f"{len(specs)} runs under {root}; settings: {asdict(st)}", flush=True)
    base = baseline(st, root, threads=args.threads or 1)
    print(f"starting model: Avg@{st.eval_samples} {base['avg_at_k_off']:.3f} (erasure at test {base['avg_at_k_on']:.3f})",
          flush=True)

    def point(spec, pt: dict) -> None:
        print(f"  {spec.run_id}: {pt['point']}/{st.eval_points} of the budget, {pt['rollout_tokens']:,} tokens, "
              f"step {pt['step']}: Avg@{st.eval_samples} {pt['avg_at_k']:.3f}", flush=True)

    def report(r: dict) -> None:
        print(f"{r['run_id']}: {r['steps']} steps, {r['rollout_tokens']:,} tokens, {r['train_seconds'] / 60:.1f} min; "
              f"Avg@{st.eval_samples} {r['avg_at_k_off']:.3f} (erasure at test {r['avg_at_k_on']:.3f}) "
              f"[{time.time() - t0:.0f} s since start]", flush=True)

    if args.report_only:
        results = [json.loads(f.read_text()) for f in (root / s.run_id / "result.json" for s in specs) if f.is_file()]
        if not results:
            p.error(f"no finished run under {root}; run without --report-only to train them")
        print(f"{len(results)} of {len(specs)} runs finished", flush=True)
    else:
        results = run_all(specs, st, root, jobs=args.jobs, threads=args.threads, on_done=report, on_point=point)
    rows = summarize(results, base)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    others = [e for e in (sample_efficiency(results, base, name=r["name"]) for r in rows if r["name"] != "GRPO") if e]
    eff = next((e for e in others if e["name"] == "E3RL"), None)  # the headline; bootstrapped once
    text = (markdown_table(rows, base, st.eval_samples) + "\n" + efficiency_text(eff) + "\n"
            + efficiency_table(others) + "\n" + steps_table(results, base) + "\n" + slips_table(results, base)
            + "\n" + dynamics_table(results, root))
    (out / f"{args.name}.json").write_text(json.dumps(
        {"settings": asdict(st), "command": " ".join(sys.argv), "base": base, "rows": rows,
         "sample_efficiency": eff and _finite(eff), "sample_efficiency_all": [_finite(e) for e in others],
         "base_commands": run_commands(root / "base-commands.log", root),
         "runs": [{**{k: v for k, v in r.items() if k != "curve"},
                   "commands": run_commands(root / r["run_id"] / "commands.log", root)} for r in results]},
        indent=2, default=str))
    (out / f"{args.name}-table.md").write_text(text)
    learning_figure(results, base, k=st.eval_samples).write_html(out / f"{args.name}.html", include_plotlyjs="cdn")
    print(text)
    print(f"total {(time.time() - t0) / 60:.1f} min; wrote {out}/{args.name}.json, {args.name}-table.md, {args.name}.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
