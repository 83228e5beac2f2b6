"""The generation flags ``e3rl generate`` and ``e3rl eval`` share, and how they become a config;
the --trust-remote-code, --device and --dtype flags of every command that loads a model."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import E3RLError
from ..generation.config import GenerationConfig
from ..devices import DTYPES, add_device_flags, resolve_device  # noqa: F401  (the commands import them from here)
from ..overrides import apply_overrides

# flag (its argparse dest) -> GenerationConfig field; each flag is a shortcut for --set FIELD=VALUE
FIELDS = {
    "max_new_tokens": "max_new_tokens", "temperature": "sampling.temperature", "top_p": "sampling.top_p",
    "top_k": "sampling.top_k", "policy": "threshold.policy", "threshold": "threshold.value",
    "signal": "score.signal", "erase_budget": "erase.budget", "segment_mode": "segment.mode",
    "segment_tokens": "segment.segment_tokens", "compile": "compile",
}


def add_compile_flag(p: argparse.ArgumentParser) -> None:
    """--compile: torch.compile the decode step (GenerationConfig.compile); unset = the config's own."""
    p.add_argument("--compile", action="store_const", const=True, default=None,
                   help="torch.compile the one-token decode step (the first run compiles, about a minute on a "
                        "CPU; needs a C++ compiler on CPU, Triton on CUDA)")


def add_trust_remote_code_flag(p: argparse.ArgumentParser) -> None:
    """--trust-remote-code, shared by the commands that load a model (the app has no such switch)."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code a model directory or hub repository ships (auto_map in its "
                        "config); it runs with your permissions, so read it first. Off: such models are refused")


def add_generation_flags(p: argparse.ArgumentParser, with_erase_switch: bool = True) -> None:
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
    add_compile_flag(g)
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any other config field, e.g. --set threshold.kappa=1.5 (repeatable)")


def config_from_args(args: argparse.Namespace, base: GenerationConfig | None = None,
                     last: Sequence[str] = ()) -> GenerationConfig:
    """The flags become ``section.field=value`` overrides, so they are validated like --set; ``last``:
    items applied after every --set (a subcommand's own switches, which win)."""
    items = [f"{field}={getattr(args, flag)}" for flag, field in FIELDS.items() if getattr(args, flag) is not None]
    if args.no_erase:
        items.append("erase.enabled=false")
    if args.threshold is not None and args.policy is None:
        items.append("threshold.policy=fixed")
    return apply_overrides(base or GenerationConfig(), items + list(args.overrides) + list(last))


def check_output_file(path: str, flag: str) -> None:
    """Fail before any model is loaded or token generated when ``path`` (the value of ``flag``)
    cannot be written as a file: it is a directory, its parent cannot be created, or the directory
    refuses a new file. Creates the missing parent directories, as the writers would."""
    p = Path(path)
    if p.is_dir():
        raise E3RLError(f"{flag} {path} is a directory; give a file path, e.g. {p / 'out.jsonl'}")
    nearest = next((a for a in p.parents if a.exists()), None)
    if nearest is not None and not nearest.is_dir():
        raise E3RLError(f"cannot write {flag} {path}: {nearest} is a file, not a directory; give another path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        # A real file in the real directory: permission bits say nothing for root or read-only mounts.
        with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name}.", suffix=".check"):
            pass
    except OSError as err:
        raise E3RLError(f"cannot write {flag} {path}: cannot create a file in {p.parent} "
                        f"({err.strerror or err}); give a path in a writable directory") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise E3RLError(f"cannot write {flag} {path}: the file is read-only; give another path")


def add_prompt_flags(p: argparse.ArgumentParser) -> None:
    """How questions become chat prompts (``tasks.datasets.render_prompt``): the user turn and the
    template's enable_thinking. Tokenizers without a chat template use 'Question: ...' unchanged."""
    p.add_argument("--prompt-template", metavar="TEXT",
                   help="the user turn of chat-template prompts; {question} is replaced by the question "
                        "(default: the question, a newline and 'Please reason step by step, and put your "
                        "final answer within \\boxed{}.')")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="pass enable_thinking=true/false to a chat template that takes it (Qwen3); "
                        "default: the template's own default")


def prompt_options(args: argparse.Namespace) -> dict:
    """``render_prompt``'s keyword arguments from ``add_prompt_flags``'s flags (unset ones left out)."""
    given = {"user_template": args.prompt_template, "enable_thinking": args.enable_thinking}
    return {k: v for k, v in given.items() if v is not None}
