"""Miniature reproduction of the paper's claim on the synthetic task (see docs/results/reproduction.md).

    python scripts/reproduce.py                       # 3 seeds x GRPO/DAPO/E3RL + 5 ablations, 2 at a time
    python scripts/reproduce.py --seeds 1 --no-ablations --token-budget 50000   # a quick look

Every run trains from the shipped checkpoint to the same rollout-token budget and is evaluated on
held-out test problems (Avg@K at T=1, with erasure off and on at test time). Runs are resumable:
finished ones (ROOT/<run>/result.json) are skipped. Writes results.json, reproduction.md and
reproduction.html (plotly) to --results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e3rl_core.evaluation.experiment import Settings, baseline, figure, markdown_table, plan, run_all, summarize  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/reproduce", help="where runs are trained (resumable)")
    p.add_argument("--results", default="docs/results", help="where the table and figure go")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--only", action="append", help="run only these names (e.g. --only GRPO)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each single-threaded when > 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: 1 when --jobs > 1, else all)")
    p.add_argument("--token-budget", type=int, default=Settings.token_budget)
    p.add_argument("--learning-rate", type=float, default=Settings.learning_rate)
    p.add_argument("--eval-samples", type=int, default=Settings.eval_samples)
    p.add_argument("--test-data", default=Settings.test_data)
    p.add_argument("--train-data", default=Settings.train_data)
    p.add_argument("--name", default="reproduction", help="file name stem of the outputs")
    p.add_argument("--set", dest="common", action="append", default=[], help="extra --set for every run")
    args = p.parse_args()
    st = Settings(token_budget=args.token_budget, learning_rate=args.learning_rate, eval_samples=args.eval_samples,
                  test_data=args.test_data, train_data=args.train_data, common=args.common)
    specs = [s for s in plan(args.seeds, not args.no_ablations) if not args.only or s.name in args.only]
    root = Path(args.root)
    t0 = time.time()
    base = baseline(st, root, threads=args.threads or 1)
    print(f"shipped model: Avg@{st.eval_samples} {base['avg_at_k_off']:.3f} (erasure at test {base['avg_at_k_on']:.3f})",
          flush=True)

    def report(r: dict) -> None:
        print(f"{r['run_id']}: {r['steps']} steps, {r['rollout_tokens']:,} tokens, {r['train_seconds'] / 60:.1f} min; "
              f"Avg@{st.eval_samples} {r['avg_at_k_off']:.3f} (erasure at test {r['avg_at_k_on']:.3f})", flush=True)

    results = run_all(specs, st, root, jobs=args.jobs, threads=args.threads, on_done=report)
    rows = summarize(results)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, base, st.eval_samples)
    (out / f"{args.name}.json").write_text(json.dumps(
        {"settings": asdict(st), "base": base, "rows": rows,
         "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results]}, indent=2))
    (out / f"{args.name}-table.md").write_text(table)
    figure(results, base).write_html(out / f"{args.name}.html", include_plotlyjs="cdn")
    print(table)
    print(f"total {(time.time() - t0) / 60:.1f} min; wrote {out}/{args.name}.json, {args.name}-table.md, {args.name}.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
