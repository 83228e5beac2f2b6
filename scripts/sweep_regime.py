"""The search for a training regime in which GRPO measurably improves the shipped model: each setting
trains GRPO from the shipped checkpoint to one rollout-token budget and is scored on the held-out
test problems (Avg@4 at T = 1, seed 0, erasure off; and on), like every run of scripts/reproduce.py.

    python scripts/sweep_regime.py                      # every setting, 2 runs at once on 1 thread each
    python scripts/sweep_regime.py --only iters4 --seeds 0,1
    python scripts/sweep_regime.py --list
    python scripts/sweep_regime.py --ceiling            # the starting model at lower temperatures and greedy

Runs are resumable (finished ones, ROOT/<setting>-s<seed>/result.json, are skipped), so the sweep
can be completed in parts; progress goes to stdout, each run's commands and output to its
commands.log. Writes docs/results/regime-sweep.json and regime-sweep-table.md: setting -> Avg@4
gain over the shipped model, for every finished run under --root (earlier invocations' too), the
settings that did not work included.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e3rl_core.evaluation.experiment import RunSpec, Settings, baseline, eval_command, mean_ci, run_one  # noqa: E402

BASE = Settings(token_budget=600_000, group_size=8, prompts_per_step=4, learning_rate=3e-5)
"""The calibration's settings (lr 3e-5, G = 8, 4 prompts per step), at ~250 steps."""

# name -> (what it changes, Settings fields, --set overrides). The first is the calibration.
SETTINGS: dict[str, tuple[str, dict, list[str]]] = {
    "calib": ("lr 3e-5, 1 update per batch (the calibration)", {}, []),
    "iters4": ("lr 3e-5, 4 updates per batch (num_iterations=4, clipped)", {}, ["num_iterations=4"]),
    "iters4-lr1e-5": ("lr 1e-5, 4 updates per batch", {"learning_rate": 1e-5}, ["num_iterations=4"]),
    "iters2-p8": ("lr 3e-5, 2 updates per batch, 8 prompts per step", {"prompts_per_step": 8},
                  ["num_iterations=2"]),
    "iters4-d4": ("lr 3e-5, 4 updates per batch, training on difficulty 4 only",
                  {"train_data": "synthetic:train?n=4000&seed=1&difficulty=4"}, ["num_iterations=4"]),
    # one leg: a decaying schedule ends at each leg's budget (experiment.check_schedule)
    "iters4-cos5e-5": ("lr 5e-5 warm-up 10 steps then cosine, 4 updates per batch",
                       {"learning_rate": 5e-5, "eval_points": 1},
                       ["num_iterations=4", "lr_scheduler_type=cosine", "warmup_steps=10"]),
    "p16-lr1e-4": ("lr 1e-4, 16 prompts per step (128 rollouts)", {"prompts_per_step": 16, "learning_rate": 1e-4}, []),
    "p16-lr3e-4": ("lr 3e-4, 16 prompts per step (128 rollouts)", {"prompts_per_step": 16, "learning_rate": 3e-4}, []),
    "d3": ("lr 3e-5, training on difficulty 3 only (mixed outcomes in most groups)",
           {"train_data": "synthetic:train?n=4000&seed=1&difficulty=3"}, []),
    "d3-lr5e-5": ("lr 5e-5, training on difficulty 3 only", {"learning_rate": 5e-5,
                  "train_data": "synthetic:train?n=4000&seed=1&difficulty=3"}, []),
}


def step_minutes(root: Path, run_id: str) -> float:
    """A run's training time as the sum of its logged step times, leaving out any step over 10x the
    median: a run paused meanwhile (SIGSTOP, a suspended machine) has one step that holds the pause,
    and its wall time holds it too."""
    rows = [json.loads(line) for line in (root / run_id / "run" / "log.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time"] for r in rows]
    cap = 10 * sorted(times)[len(times) // 2]
    return sum(t for t in times if t <= cap) / 60


def table(results: list[dict], base: dict, root: Path) -> str:
    rows = ["| setting | what it changes | seeds | Avg@4 (plain sampling) | gain over the shipped model | "
            "curve (Avg@4 at rollout tokens) | Avg@4 (erasure at test) | steps | rollout tokens | "
            "train min (sum of step times) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| shipped | no training | - | {base['avg_at_k_off']:.3f} | - | - | {base['avg_at_k_on']:.3f} | 0 | 0 | 0 |"]
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["spec"]["name"], []).append(r)
    for name, rs in by.items():
        off = mean_ci([r["avg_at_k_off"] for r in rs])
        gain = mean_ci([r["avg_at_k_off"] - base["avg_at_k_off"] for r in rs])
        on = mean_ci([r["avg_at_k_on"] for r in rs])
        ci = (lambda m: f"{m[0]:+.3f} ± {m[1]:.3f}") if len(rs) > 1 else (lambda m: f"{m[0]:+.3f}")
        val = (lambda m: f"{m[0]:.3f} ± {m[1]:.3f}") if len(rs) > 1 else (lambda m: f"{m[0]:.3f}")
        # a run's held-out points (runs from before the curves have their final one only)
        curve = " → ".join(f"{p['avg_at_k']:.3f} @{p['rollout_tokens'] / 1000:.0f}k" for p in rs[0].get("evals") or [])
        if len(rs) > 1:
            curve = f"seed {rs[0]['spec']['seed']}: {curve}" if curve else ""
        rows.append(f"| {name} | {SETTINGS[name][0]} | {len(rs)} | {val(off)} | {ci(gain)} | {curve or '-'} | {val(on)} | "
                    f"{sum(r['steps'] for r in rs) / len(rs):.0f} | "
                    f"{sum(r['rollout_tokens'] for r in rs) / len(rs):,.0f} | "
                    f"{sum(step_minutes(root, r['run_id']) for r in rs) / len(rs):.1f} |")
    return "\n".join(rows) + "\n"


CEILING_TEMPERATURES = (1.0, 0.7, 0.5, 0.0)


def ceiling(results: Path) -> int:
    """The starting model scored like every run (Avg@4, 200 test problems, seed 0, erasure off) at
    lower sampling temperatures and greedy. A policy that only sharpens its own distribution (what
    a few hundred RL steps can do to it) moves toward these; it learns no arithmetic it lacks."""
    rows = []
    for t in CEILING_TEMPERATURES:
        cmd = eval_command(BASE.model, BASE, "off") + ["--temperature", str(t)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            print(proc.stderr[-1000:], file=sys.stderr)
            return 1
        ev = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"temperature": t, "avg_at_k": ev["avg_at_k"], "by_difficulty": ev["accuracy_by_difficulty"]})
        print(f"T = {t:g}: Avg@4 {ev['avg_at_k']:.3f}", flush=True)
    base = rows[0]["avg_at_k"]
    md = ["| decoding of the starting model | Avg@4 | above T = 1 | " + " | ".join(f"difficulty {d}" for d in range(1, 6)) + " |",
          "|---|---|---|" + "---|" * 5]
    for r in rows:
        label = "greedy" if r["temperature"] == 0 else f"T = {r['temperature']:g}"
        md.append(f"| {label} | {r['avg_at_k']:.3f} | {r['avg_at_k'] - base:+.3f} | " +
                  " | ".join(f"{r['by_difficulty'].get(f'{d}.0', 0):.3f}" for d in range(1, 6)) + " |")
    results.mkdir(parents=True, exist_ok=True)
    (results / "regime-ceiling.md").write_text("\n".join(md) + "\n")
    (results / "regime-ceiling.json").write_text(json.dumps({"model": BASE.model, "test_data": BASE.test_data,
                                                              "rows": rows}, indent=2))
    print("\n".join(md))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/sweep", help="where runs are trained (resumable)")
    p.add_argument("--results", default="docs/results")
    p.add_argument("--only", action="append", help="these settings only (see --list)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each on one thread when > 1)")
    p.add_argument("--list", action="store_true", help="list the settings and exit")
    p.add_argument("--ceiling", action="store_true",
                   help="only score the starting model at T = 1, 0.7, 0.5 and greedy (what sharpening alone can gain)")
    args = p.parse_args()
    if args.ceiling:
        return ceiling(Path(args.results))
    if args.list:
        for name, (what, fields, sets) in SETTINGS.items():
            print(f"{name:16s} {what}  {fields or ''} {' '.join('--set ' + s for s in sets)}")
        return 0
    unknown = sorted(set(args.only or []) - set(SETTINGS))
    if unknown:
        p.error(f"unknown setting(s) {', '.join(unknown)}; --list shows them")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    root = Path(args.root)
    t0 = time.time()
    base = baseline(BASE, root, threads=1)
    print(f"shipped model: Avg@4 {base['avg_at_k_off']:.3f} (erasure at test {base['avg_at_k_on']:.3f})", flush=True)
    names = [n for n in SETTINGS if not args.only or n in args.only]
    jobs = [(RunSpec(name, "grpo", seed), replace(BASE, **SETTINGS[name][1], common=list(SETTINGS[name][2])))
            for name in names for seed in seeds]

    def one(job: tuple[RunSpec, Settings]) -> dict:
        r = run_one(*job, root, threads=1 if args.jobs > 1 else (os.cpu_count() or 1))
        print(f"{r['run_id']}: {r['steps']} steps, {r['rollout_tokens']:,} tokens, {r['train_seconds'] / 60:.1f} min; "
              f"Avg@4 {r['avg_at_k_off']:.3f} ({r['avg_at_k_off'] - base['avg_at_k_off']:+.3f}), erasure at test "
              f"{r['avg_at_k_on']:.3f}", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, jobs))
    # The table holds every finished run under ROOT, those of earlier invocations too, in SETTINGS order.
    done = [json.loads(f.read_text()) for f in sorted(root.glob("*/result.json"))]
    results = sorted((r for r in done if r["spec"]["name"] in SETTINGS),
                     key=lambda r: (list(SETTINGS).index(r["spec"]["name"]), r["spec"]["seed"]))
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    md = table(results, base, root)
    (out / "regime-sweep-table.md").write_text(md)
    (out / "regime-sweep.json").write_text(json.dumps(
        {"base_settings": asdict(BASE), "settings": {r["spec"]["name"]: SETTINGS[r["spec"]["name"]] for r in results},
         "base": base,
         "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results]}, indent=2))
    print(md)
    print(f"total {(time.time() - t0) / 60:.1f} min; wrote {out}/regime-sweep-table.md and regime-sweep.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
