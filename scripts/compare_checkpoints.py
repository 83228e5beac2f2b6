"""Did a trained checkpoint improve on its starting point? Both are scored on the same problems with
the same sampling seeds (Avg@K, erasure off), and the per-problem differences give a paired
bootstrap interval: the noise of sampling and of the problems drawn, not of the training seed.

    python scripts/compare_checkpoints.py checkpoints/arith-demo checkpoints/arith-demo-grpo
    python scripts/compare_checkpoints.py A B --data "synthetic:test?n=1000&seed=7" --samples 4 --out runs/compare

Each model's rows are kept in --out (rows-<name>.jsonl) and reused when the command runs again.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e3rl_core.cli import e3rl_command  # noqa: E402


def rows_of(model: str, data: str, samples: int, out: Path) -> Path:
    path = out / f"rows-{Path(model).name}.jsonl"
    if not path.is_file():
        cmd = e3rl_command("eval", "--model", model, "--data", data, "--samples", str(samples), "--seed", "0",
                           "--no-erase", "--json", "--device", "cpu", "--out", str(path))
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode:
            sys.exit(f"e3rl eval of {model} failed:\n{proc.stderr[-2000:]}")
    return path


def per_problem(path: Path) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            hits.setdefault(row["problem_id"], []).append(bool(row["correct"]))
    return {k: sum(v) / len(v) for k, v in hits.items()}


def paired(a: dict[str, float], b: dict[str, float], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of b - a over the problems both scored, with a 95% bootstrap interval over problems."""
    ids = sorted(set(a) & set(b))
    if not ids:
        raise SystemExit("the two row files share no problem; score both on the same --data")
    diffs = [b[i] - a[i] for i in ids]
    rng = random.Random(seed)
    boots = sorted(sum(rng.choice(diffs) for _ in ids) / len(ids) for _ in range(n_boot))
    return {"problems": len(ids), "a": sum(a[i] for i in ids) / len(ids), "b": sum(b[i] for i in ids) / len(ids),
            "diff": sum(diffs) / len(ids), "ci_low": boots[int(0.025 * (n_boot - 1))],
            "ci_high": boots[int(0.975 * (n_boot - 1)) + 1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="the starting checkpoint")
    p.add_argument("b", help="the trained checkpoint")
    p.add_argument("--data", default="synthetic:test?n=1000&seed=7",
                   help="held-out problems (default: 1,000 test problems drawn apart from the reproduction's 200)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--out", default="runs/compare", help="where the rows are kept")
    args = p.parse_args()
    if Path(args.a).name == Path(args.b).name:
        p.error("the two checkpoints' directory names must differ (their rows are kept under those names)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = paired(per_problem(rows_of(args.a, args.data, args.samples, out)),
                 per_problem(rows_of(args.b, args.data, args.samples, out)))
    print(f"{res['problems']} problems x {args.samples} samples ({args.data}): Avg@{args.samples} "
          f"{res['a']:.4f} ({args.a}) -> {res['b']:.4f} ({args.b}); paired difference {res['diff']:+.4f}, "
          f"95% bootstrap interval over problems {res['ci_low']:+.4f} .. {res['ci_high']:+.4f}")
    (out / "comparison.json").write_text(json.dumps({"a": args.a, "b": args.b, "data": args.data,
                                                      "samples": args.samples, **res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
