"""The ``e3rl`` command line. Argument parsing lives here only; the library returns values.

    e3rl generate --model PATH --prompt TEXT [options]     erasable generation, prints completions
    e3rl eval --model PATH --data SPEC [options]           Avg@K / Pass@k with or without erasure
    e3rl train --model PATH --data SPEC --algo e3rl --out DIR   RL training (see cli_train.py)
    e3rl bench generate [--model PATH]                     speed/memory table of the engine
    e3rl app [--host H] [--port N] [--model PATH]          the Gradio workbench (app/main.py)
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from ..errors import E3RLError
from ..generation.config import GenerationConfig
from ..overrides import apply_overrides


def _add_generation_flags(p: argparse.ArgumentParser, with_erase_switch: bool = True) -> None:
    g = p.add_argument_group("generation (each flag is a shortcut for a --set field)")
    g.add_argument("--max-new-tokens", type=int, help="longest final completion (max_new_tokens)")
    g.add_argument("--temperature", type=float, help="0 = greedy (sampling.temperature)")
    g.add_argument("--top-p", type=float, help="sampling.top_p")
    g.add_argument("--top-k", type=int, help="sampling.top_k")
    g.add_argument("--policy", help="threshold policy: e3rl, fixed, zscore, quantile, none")
    g.add_argument("--threshold", type=float, help="the value of the fixed policy (threshold.value)")
    g.add_argument("--signal", help="decision signal: surprisal or entropy (score.signal)")
    g.add_argument("--erase-budget", type=int, help="erasures per segment, K (erase.budget)")
    if with_erase_switch:
        g.add_argument("--no-erase", action="store_true", help="score segments but never erase")
    g.add_argument("--segment-mode", help="segmenter: fixed or delimiter (segment.mode)")
    g.add_argument("--segment-tokens", type=int, help="segment length (segment.segment_tokens)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any other config field, e.g. --set threshold.kappa=1.5 (repeatable)")


def config_from_args(args: argparse.Namespace, base: GenerationConfig | None = None) -> GenerationConfig:
    """The flags become ``section.field=value`` overrides, so they are validated like --set."""
    flags = {
        "max_new_tokens": args.max_new_tokens, "sampling.temperature": args.temperature,
        "sampling.top_p": args.top_p, "sampling.top_k": args.top_k, "threshold.policy": args.policy,
        "threshold.value": args.threshold, "score.signal": args.signal, "erase.budget": args.erase_budget,
        "segment.mode": args.segment_mode, "segment.segment_tokens": args.segment_tokens,
    }
    items = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.no_erase:
        items.append("erase.enabled=false")
    if args.threshold is not None and args.policy is None:
        items.append("threshold.policy=fixed")
    return apply_overrides(base or GenerationConfig(), items + list(args.overrides))


def cmd_generate(args: argparse.Namespace) -> int:
    from ..events import DoneEvent, TokenEvent, TraceWriter, group_traces
    from ..generation.generator import ErasableGenerator
    from ..generation.segmenter import SEGMENTERS
    from ..generation.thresholds import POLICIES
    from ..models import load_model, recommended_config

    config = config_from_args(args, recommended_config(args.model))
    SEGMENTERS.get(config.segment.mode)  # fail on unknown names before loading a model
    POLICIES.get(config.threshold.policy)
    if sum(x is not None for x in (args.prompt, args.prompt_file, args.question)) != 1:
        raise E3RLError("give exactly one of --prompt TEXT, --prompt-file PATH or --question TEXT")
    prompt = args.prompt
    if args.prompt_file:
        try:
            prompt = open(args.prompt_file, encoding="utf-8").read()
        except OSError as err:
            raise E3RLError(f"cannot read --prompt-file {args.prompt_file}: {err.strerror}") from None
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.question is not None:
        from ..tasks.datasets import render_prompt

        prompt = render_prompt(args.question, tokenizer)
    from ..tasks.rewards import extract_answer

    gen = ErasableGenerator(model, tokenizer, config, model_name=args.model, answer_fn=extract_answer)
    writer = TraceWriter(args.trace_out) if args.trace_out else None
    events = []
    t0 = time.perf_counter()
    live = args.stream and args.group_size == 1
    try:
        for ev in gen.stream(prompt, group_size=args.group_size, seed=args.seed):
            events.append(ev)
            if writer:
                writer.write(ev)
            if live and isinstance(ev, TokenEvent):
                print(ev.text, end="", flush=True)
    finally:
        if writer:
            writer.close()
    elapsed = time.perf_counter() - t0
    traces = group_traces(events)
    if live:
        print()
    dones = [t.done for t in traces if isinstance(t.done, DoneEvent)]
    for i, done in enumerate(dones):
        if not live:
            if len(dones) > 1:
                print(f"--- rollout {i} ({done.erasures} erasures, answer: {done.answer})")
            print(done.text)
    generated = sum(d.tokens_generated for d in dones)
    kept = sum(len(d.token_ids) for d in dones)
    erasures = sum(d.erasures for d in dones)
    print(
        f"[e3rl] {len(dones)} rollout(s): {generated} tokens generated, {kept} kept, {erasures} erasures, "
        f"{elapsed:.2f} s ({generated / max(elapsed, 1e-9):.1f} tok/s)"
        + (f"; trace written to {args.trace_out}" if args.trace_out else ""),
        file=sys.stderr,
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from ..evaluation.evaluate import evaluate
    from ..events import TraceWriter
    from ..generation.generator import ErasableGenerator
    from ..models import load_model, recommended_config
    from ..tasks.datasets import load_examples
    from ..tasks.rewards import extract_answer, is_correct

    config = config_from_args(args, recommended_config(args.model))
    if args.erase is not None:
        config = apply_overrides(config, [f"erase.enabled={args.erase}"])
    ks = [int(k) for k in args.k.split(",")] if args.k else None
    if ks and max(ks) > args.samples:
        raise E3RLError(f"pass@k needs k <= --samples ({args.samples}); got k={max(ks)}. Sample more or lower k")
    spec = args.data
    if args.limit:
        spec += ("&" if "?" in spec else "?") + f"limit={args.limit}"
    examples = load_examples(spec)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    gen = ErasableGenerator(model, tokenizer, config, model_name=args.model, checker=is_correct,
                            answer_fn=extract_answer)
    writer = TraceWriter(args.traces_out) if args.traces_out else None
    bar = tqdm(total=len(examples), desc="eval", unit="problem", disable=args.json and not sys.stderr.isatty())

    def save(events: list) -> None:
        for ev in events:
            writer.write(ev)

    try:
        summary, rows = evaluate(gen, examples, samples=args.samples, ks=ks, seed=args.seed,
                                 on_events=save if writer else None, on_problem_done=bar.update)
    finally:
        bar.close()
        if writer:
            writer.close()
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out)  # a killed run leaves the previous file, never half a file
    result = summary.to_dict()
    result["erase"] = config.erase.enabled
    result["temperature"] = config.sampling.temperature
    if args.json:
        print(json.dumps(result))
    else:
        print(f"problems {summary.n_problems}, samples {summary.samples}, erasure {'on' if config.erase.enabled else 'off'}, "
              f"T={config.sampling.temperature}")
        print(f"Avg@{summary.samples}: {summary.avg_at_k:.4f}   " +
              "   ".join(f"Pass@{k}: {v:.4f}" for k, v in summary.pass_at_k.items()))
        print(f"erase rate {summary.erase_rate:.3f} (traces with an erasure {summary.traces_with_erasure:.3f}); "
              f"tokens/sample generated {summary.mean_tokens_generated:.1f}, kept {summary.mean_tokens_kept:.1f}; "
              f"tokens per correct answer {summary.tokens_per_correct if summary.tokens_per_correct is None else round(summary.tokens_per_correct, 1)}")
        if summary.accuracy_by_difficulty:
            print("accuracy by difficulty: " + ", ".join(f"{d}: {a:.3f}" for d, a in summary.accuracy_by_difficulty.items()))
    return 0


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from ..evaluation.bench import format_table, run_generate_bench

    def progress(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    result = run_generate_bench(
        args.model, device=args.device, repeats=args.repeats, quick=args.quick, progress=progress
    )
    print(format_table(result))
    return 0


def cmd_train_demo_model(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..training.sft import DemoModelConfig, train_demo_model

    cfg = apply_overrides(DemoModelConfig(steps=args.steps, seed=args.seed), list(args.overrides))
    bar = tqdm(total=cfg.steps, desc="train-demo-model", unit="step")

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    log = train_demo_model(cfg, args.out, on_step=on_step)
    bar.close()
    print(f"[e3rl] trained {log.params:,} parameters for {log.steps} steps on {log.tokens:,} tokens "
          f"in {log.seconds / 60:.1f} min; saved to {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e3rl", description="E3RL workbench: erasable generation and training")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="erasable generation on a prompt")
    gen.add_argument("--model", required=True, help="model directory, hub id (online) or random:<preset>")
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--question", help="a question, rendered with the tokenizer's chat template "
                     "(or 'Question: ...\\nAnswer:\\n' when it has none)")
    gen.add_argument("--group-size", type=int, default=1, help="rollouts of the prompt, decoded as one batch")
    gen.add_argument("--seed", type=int, default=0, help="row r uses seed + r")
    gen.add_argument("--trace-out", help="write the event stream as JSONL here")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated (G = 1)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    gen.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    _add_generation_flags(gen)
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("train-demo-model", help="train the small demo model on the synthetic task")
    demo.add_argument("--out", required=True, help="output directory (written atomically)")
    demo.add_argument("--steps", type=int, default=3200)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                      help="any DemoModelConfig field, e.g. --set hidden_size=192")
    demo.set_defaults(func=cmd_train_demo_model)

    ev = sub.add_parser("eval", help="Avg@K and Pass@k of a model on a dataset, with or without erasure")
    ev.add_argument("--model", required=True, help="model directory, hub id (online) or random:<preset>")
    ev.add_argument("--data", required=True, help="dataset SPEC, e.g. synthetic:test?difficulty=3, "
                    "deepmath:/path/file.parquet, aime:/path/file.jsonl, jsonl:/path?question=q&answer=a")
    ev.add_argument("--samples", type=int, default=1, help="K samples per problem")
    ev.add_argument("--k", help="comma-separated k for Pass@k (default: 1, 2, 4, ... up to K)")
    ev.add_argument("--erase", dest="erase", action="store_const", const="true", default=None,
                    help="erasure on (default: the model's recommended setting)")
    ev.add_argument("--no-erase", dest="erase", action="store_const", const="false", help="erasure off")
    ev.add_argument("--limit", type=int, help="only the first N problems")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", help="write one JSON row per sample here (pandas.read_json(..., lines=True))")
    ev.add_argument("--traces-out", help="also write every sample's event stream (JSONL)")
    ev.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    ev.add_argument("--device")
    ev.add_argument("--dtype", default="auto")
    _add_generation_flags(ev, with_erase_switch=False)
    ev.set_defaults(func=cmd_eval, no_erase=False)

    appp = sub.add_parser("app", help="the Gradio workbench in a browser (e3rl app --help)")
    appp.set_defaults(func=lambda a: (_ for _ in ()).throw(E3RLError(
        "the workbench starts from the e3rl console script (e3rl app) or python -m app.main")))

    from .train import add_parser as add_train_parser

    add_train_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks that print a table")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bg = bench_sub.add_parser("generate", help="engine speed and memory vs model.generate")
    bg.add_argument("--model", default="random:small", help="model directory or random:<preset>")
    bg.add_argument("--device", default=None)
    bg.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median reported)")
    bg.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    bg.set_defaults(func=cmd_bench_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except E3RLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

