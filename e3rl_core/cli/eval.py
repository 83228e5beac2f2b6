"""``e3rl eval``: Avg@K and Pass@k of a model on a dataset, with or without erasure."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import E3RLError
from ..generation.config import GenerationConfig
from .options import add_device_flags, add_generation_flags, add_prompt_flags, add_trust_remote_code_flag
from .options import check_output_file, config_from_args, prompt_options, resolve_device


def add_parser(sub: Any) -> None:
    ev = sub.add_parser("eval", help="Avg@K and Pass@k of a model on a dataset, with or without erasure")
    ev.add_argument("--model", required=True, help="model directory, hub id (online) or random:<preset>")
    ev.add_argument("--data", required=True, help="dataset SPEC, e.g. synthetic:test?difficulty=3, "
                    "deepmath:/path/file.parquet, aime:/path/file.jsonl, jsonl:/path?question=q&answer=a")
    ev.add_argument("--samples", type=int, default=1, help="K samples per problem")
    ev.add_argument("--k", help="comma-separated k for Pass@k (default: 1, 2, 4, ... up to K)")
    ev.add_argument("--erase", dest="erase", action="store_const", const="true", default=None,
                    help="erasure on (default: the model's recommended setting)")
    ev.add_argument("--no-erase", dest="erase", action="store_const", const="false", help="erasure off")
    ev.add_argument("--limit", type=int, help="only the first N problems (N >= 1)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", help="write one JSON row per sample here (pandas.read_json(..., lines=True))")
    ev.add_argument("--traces-out", help="also write every sample's event stream (JSONL; gzip when the name ends in .gz)")
    ev.add_argument("--overlong", choices=("skip", "fail"), default="skip",
                    help="problems whose prompt does not fit the model's context: skip them (the default; "
                    "counted in the summary) or fail = score their samples as wrong answers")
    ev.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_device_flags(ev)
    add_prompt_flags(ev)
    add_trust_remote_code_flag(ev)
    add_generation_flags(ev, with_erase_switch=False)
    ev.set_defaults(func=cmd_eval, no_erase=False)


def _pass_ks(args: argparse.Namespace) -> list[int] | None:
    if not args.k:
        return None
    try:
        ks = [int(k) for k in args.k.split(",")]
    except ValueError:
        raise E3RLError(f"--k takes whole numbers separated by commas, e.g. --k 1,4,8; got {args.k!r}") from None
    if max(ks) > args.samples:
        raise E3RLError(f"pass@k needs k <= --samples ({args.samples}); got k={max(ks)}. Sample more or lower k")
    return ks


def _data_spec(args: argparse.Namespace) -> str:
    if args.limit is None:
        return args.data
    if args.limit < 1:  # 0 would otherwise read as "no limit" and evaluate everything
        raise E3RLError(f"--limit must be >= 1 (the number of problems to evaluate), got {args.limit}; "
                        f"leave it out to evaluate every problem")
    return args.data + ("&" if "?" in args.data else "?") + f"limit={args.limit}"


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..evaluation.evaluate import evaluate
    from ..events import TraceWriter
    from ..generation.generator import ErasableGenerator
    from ..models import load_model, recommended_config
    from ..tasks.datasets import load_examples, render_prompt
    from ..tasks.rewards import for_prompt

    # --erase/--no-erase win over a --set erase.enabled=...
    config = config_from_args(args, recommended_config(args.model),
                              last=[f"erase.enabled={args.erase}"] if args.erase is not None else [])
    ks = _pass_ks(args)
    device = resolve_device(args.device)  # a missing GPU is refused before any file is created
    _check_outputs(args)  # before any work: a bad --out used to fail only after the whole evaluation
    examples = load_examples(_data_spec(args))
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    # One prompt shows how the template renders (and checks the prompt flags before any generation);
    # a template that opens <think> in the prompt (R1 distills) starts every completion inside it.
    answer_fn, checker = for_prompt(render_prompt(examples[0].question, tokenizer, **prompt_options(args)))
    gen = ErasableGenerator(model, tokenizer, config, model_name=args.model, checker=checker,
                            answer_fn=answer_fn)
    writer = TraceWriter(args.traces_out) if args.traces_out else None
    bar = tqdm(total=len(examples), desc="eval", unit="problem", disable=args.json and not sys.stderr.isatty())

    def save(events: list) -> None:
        for ev in events:
            writer.write(ev)

    try:
        summary, rows = evaluate(gen, examples, samples=args.samples, ks=ks, seed=args.seed,
                                 overlong=args.overlong, on_events=save if writer else None,
                                 prompt_options=prompt_options(args),
                                 on_problem_done=bar.update)
    finally:
        bar.close()
        if writer:
            writer.close()
    if summary.overlong:
        print(_overlong_warning(summary.overlong, len(examples), gen.context, args.overlong), file=sys.stderr)
    if args.out:
        _write_rows(Path(args.out), rows)
    _print_summary(summary, config, as_json=args.json)
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    outs = [(flag, path) for flag, path in (("--out", args.out), ("--traces-out", args.traces_out)) if path]
    for flag, path in outs:
        check_output_file(path, flag)
    if len(outs) == 2 and Path(args.out).resolve() == Path(args.traces_out).resolve():
        raise E3RLError("--out and --traces-out name the same file; the rows would overwrite the traces. "
                        "Give two paths")


def _overlong_warning(n: int, total: int, context: int | None, mode: str) -> str:
    what = "counted as wrong answers" if mode == "fail" else "skipped (--overlong fail counts them as wrong)"
    return f"warning: {n} of {total} problem(s) have a prompt longer than the model's context ({context} tokens): {what}"


def _write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    from ..events import strict_dumps

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text("".join(strict_dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out)  # a killed run leaves the previous file, never half a file
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise E3RLError(f"cannot write --out {out}: {err.strerror or err}") from None


def _print_summary(summary: Any, config: GenerationConfig, as_json: bool) -> None:
    from ..events import strict_dumps

    if as_json:
        result = summary.to_dict()
        result["erase"] = config.erase.enabled
        result["temperature"] = config.sampling.temperature
        print(strict_dumps(result))
        return
    per_correct = summary.tokens_per_correct
    if summary.overlong:
        print(f"prompts longer than the model's context: {summary.overlong}")
    print(f"problems {summary.n_problems}, samples {summary.samples}, "
          f"erasure {'on' if config.erase.enabled else 'off'}, T={config.sampling.temperature}")
    print(f"Avg@{summary.samples}: {summary.avg_at_k:.4f}   " +
          "   ".join(f"Pass@{k}: {v:.4f}" for k, v in summary.pass_at_k.items()))
    print(f"erase rate {summary.erase_rate:.3f} (traces with an erasure {summary.traces_with_erasure:.3f}); "
          f"tokens/sample generated {summary.mean_tokens_generated:.1f}, kept {summary.mean_tokens_kept:.1f}; "
          f"tokens per correct answer {per_correct if per_correct is None else round(per_correct, 1)}")
    if summary.accuracy_by_difficulty:
        print("accuracy by difficulty: " +
              ", ".join(f"{d}: {a:.3f}" for d, a in summary.accuracy_by_difficulty.items()))
