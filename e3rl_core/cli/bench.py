"""``e3rl bench generate``: the engine's speed and memory against ``model.generate``, as one table."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .options import add_compile_flag, add_device_flags, add_trust_remote_code_flag, resolve_device


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print a table")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bg = bench_sub.add_parser("generate", help="engine speed and memory vs model.generate")
    bg.add_argument("--model", default="random:small", help="model directory or random:<preset>")
    add_device_flags(bg)
    bg.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median reported)")
    bg.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    bg.add_argument("--parts", default="abcdefgh",
                    help="which parts to run (default all): a-d on --model; e-h, the long-trace parts, on "
                         "--long-model (e also on the shipped model, at the lengths its context holds)")
    bg.add_argument("--long-model", default="random:small-qwen3",
                    help="model of the long-trace parts (default: a random-init Qwen3-shaped model a CPU can "
                         "decode 4k tokens with; random:qwen3-0.6b on a GPU)")
    add_compile_flag(bg)
    add_trust_remote_code_flag(bg)
    bg.set_defaults(func=cmd_bench_generate)


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
