"""``e3rl generate``: erasable generation on one prompt; prints the completions and a summary."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..errors import E3RLError
from .options import add_device_flags, add_generation_flags, add_prompt_flags, add_trust_remote_code_flag
from .options import check_output_file, config_from_args, prompt_options, resolve_device


def add_parser(sub: Any) -> None:
    gen = sub.add_parser("generate", help="erasable generation on a prompt")
    gen.add_argument("--model", required=True, help="model directory, hub id (online) or random:<preset>")
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--question", help="a question, rendered with the tokenizer's chat template "
                     "(or 'Question: ...\\nAnswer:\\n' when it has none)")
    gen.add_argument("--group-size", type=int, default=1, help="rollouts of the prompt, decoded as one batch")
    gen.add_argument("--seed", type=int, default=0, help="row r uses seed + r")
    gen.add_argument("--trace-out", help="write the event stream as JSONL here (gzip when the name ends in .gz)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated (G = 1)")
    add_device_flags(gen)
    add_prompt_flags(gen)
    add_trust_remote_code_flag(gen)
    add_generation_flags(gen)
    gen.set_defaults(func=cmd_generate)


def _prompt_text(args: argparse.Namespace) -> str | None:
    """--prompt or the text of --prompt-file (None for --question, rendered once the tokenizer is loaded)."""
    if sum(x is not None for x in (args.prompt, args.prompt_file, args.question)) != 1:
        raise E3RLError("give exactly one of --prompt TEXT, --prompt-file PATH or --question TEXT")
    if args.question is None and prompt_options(args):
        raise E3RLError("--enable-thinking and --prompt-template shape --question's chat prompt; a --prompt or "
                        "--prompt-file is used as it is (write the template's text into it, or use --question)")
    if not args.prompt_file:
        return args.prompt
    try:
        return open(args.prompt_file, encoding="utf-8").read()
    except OSError as err:
        raise E3RLError(f"cannot read --prompt-file {args.prompt_file}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise E3RLError(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte 0x{err.object[err.start]:02x} "
                        f"at offset {err.start}); save it as UTF-8") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from ..events import TokenEvent, TraceWriter
    from ..generation.generator import ErasableGenerator
    from ..generation.segmenter import SEGMENTERS
    from ..generation.thresholds import POLICIES
    from ..models import load_model, recommended_config
    from ..tasks.rewards import for_prompt

    config = config_from_args(args, recommended_config(args.model))
    SEGMENTERS.get(config.segment.mode)  # fail on unknown names before loading a model
    POLICIES.get(config.threshold.policy)
    device = resolve_device(args.device)  # a missing GPU is refused before any file is created
    if args.trace_out:  # before the model loads, so a bad path costs nothing
        check_output_file(args.trace_out, "--trace-out")
    prompt = _prompt_text(args)
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    if args.question is not None:
        from ..tasks.datasets import render_prompt

        prompt = render_prompt(args.question, tokenizer, **prompt_options(args))
    answer_fn, _ = for_prompt(prompt)  # a prompt that opens <think> (R1 distills) starts the completion in it
    gen = ErasableGenerator(model, tokenizer, config, model_name=args.model, answer_fn=answer_fn)
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
    _report(events, time.perf_counter() - t0, live, args.trace_out)
    return 0


def _report(events: list, elapsed: float, live: bool, trace_out: str | None) -> None:
    """The completions on stdout (unless they were streamed) and a one-line summary on stderr."""
    from ..events import DoneEvent, group_traces

    if live:
        print()
    dones = [t.done for t in group_traces(events) if isinstance(t.done, DoneEvent)]
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
        + (f"; trace written to {trace_out}" if trace_out else ""),
        file=sys.stderr,
    )
