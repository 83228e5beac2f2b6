"""``e3rl bench generate``: the engine's speed and memory against ``model.generate``, as one table."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .options import add_device_flags, add_trust_remote_code_flag, resolve_device


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print a table")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bg = bench_sub.add_parser("generate", help="engine speed and memory vs model.generate")
    bg.add_argument("--model", default="random:small", help="model directory or random:<preset>")
    add_device_flags(bg)
    bg.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median reported)")
    bg.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    add_trust_remote_code_flag(bg)
    bg.set_defaults(func=cmd_bench_generate)


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from ..evaluation.bench import format_table, run_generate_bench

    def progress(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    result = run_generate_bench(
        args.model, device=resolve_device(args.device), dtype=args.dtype, repeats=args.repeats, quick=args.quick,
        progress=progress, trust_remote_code=args.trust_remote_code,
    )
    print(format_table(result))
    return 0
