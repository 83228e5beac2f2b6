"""``e3rl bench generate``: the engine's speed and memory against ``model.generate``, as one table."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import E3RLError
from .options import add_compile_flag, add_device_flags, add_trust_remote_code_flag, resolve_device


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print a table")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bg = bench_sub.add_parser("generate", help="engine speed and memory vs model.generate")
    bg.add_argument("--model", default="random:small", help="model directory or random:<preset>")
    add_device_flags(bg)
    bg.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median reported)")
    bg.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    bg.add_argument("--parts", default="abcdefghij",
                    help="which parts to run (default all): a-d on --model; e-h, the long-trace parts, on "
                         "--long-model (e also on the shipped model, at the lengths its context holds); i, the "
                         "sliding-window and hybrid families against a Llama of the same size; j, one decision's "
                         "2K branches (e3rl audit --effects) with the prefix shared vs re-prefilled, on --long-model")
    bg.add_argument("--long-model", default="random:small-qwen3",
                    help="model of the long-trace parts (default: a random-init Qwen3-shaped model a CPU can "
                         "decode 4k tokens with; random:qwen3-0.6b on a GPU)")
    add_compile_flag(bg)
    add_trust_remote_code_flag(bg)
    bg.set_defaults(func=cmd_bench_generate)
    bc = bench_sub.add_parser("compat", help="which model families erasure handles exactly (tiny random-init models)")
    bc.add_argument("--families", default="",
                    help="comma-separated family names (default: every hand-sized family; see e3rl_core/evaluation/"
                         "compat.py); a causal-LM model type of the installed transformers also works")
    bc.add_argument("--all", action="store_true",
                    help="also every other causal-LM type the installed transformers has, shrunk generically")
    bc.add_argument("--no-train", action="store_true", help="skip the one-step e3rl training check")
    bc.add_argument("--out", default="", help="also write the table (Markdown) to this file")
    bc.set_defaults(func=cmd_bench_compat)
    bt = bench_sub.add_parser("train", help="a training step's phases vs the same work done bare")
    bt.add_argument("--model", default="checkpoints/arith-demo", help="model directory or random:<preset>")
    bt.add_argument("--data", default="synthetic:train?n=2000", help="training data spec (as e3rl train)")
    bt.add_argument("--algo", default="e3rl", choices=["grpo", "dapo", "e3rl"])
    bt.add_argument("--steps", type=int, default=3, help="steps measured (median reported)")
    bt.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                    help="any TrainConfig field, e.g. --set num_generations=8 (repeatable)")
    add_device_flags(bt, dtype_default="float32")
    bt.set_defaults(func=cmd_bench_train)


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from ..evaluation.bench import format_table, run_generate_bench

    def progress(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    result = run_generate_bench(
        args.model, device=resolve_device(args.device), dtype=args.dtype, repeats=args.repeats, quick=args.quick,
        progress=progress, trust_remote_code=args.trust_remote_code, parts=args.parts, long_model=args.long_model,
        compile=bool(args.compile),
    )
    print(format_table(result))
    return 0


def cmd_bench_compat(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..evaluation.compat import format_compat, run_compat

    families = [f.strip() for f in args.families.split(",") if f.strip()] or None
    rows = run_compat(families, all_installed=args.all, train=not args.no_train,
                      progress=lambda msg: print(f"[compat] {msg}", file=sys.stderr, flush=True))
    table = format_compat(rows)
    print(table)
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
    return 0 if all(r.status in ("exact", "refused", "not built") for r in rows) else 1


def cmd_bench_train(args: argparse.Namespace) -> int:
    from ..evaluation.bench import format_table
    from ..evaluation.bench_train import run_train_bench

    if args.steps < 1:
        raise E3RLError("--steps must be >= 1")
    result = run_train_bench(
        args.model, args.data, args.algo, steps=args.steps, overrides=args.overrides,
        device=resolve_device(args.device), dtype=args.dtype,
        progress=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True),
    )
    print(format_table(result))
    return 0
