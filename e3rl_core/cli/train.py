"""``e3rl train``: the trainer's command line (argument parsing only; the work is in ``trainer``).

    e3rl train --model checkpoints/arith-demo --data synthetic:train?n=2000 --algo e3rl --out runs/e3rl \\
        --steps 60 --group-size 8 --prompts-per-step 8 --set learning_rate=1e-4
    torchrun --nproc_per_node 2 -m e3rl_core.cli train ...      (data parallel; gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 8 -m e3rl_core.cli train ... --set parallel=fsdp   (sharded: torch FSDP2)
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import E3RLError
from ..overrides import apply_overrides
from ..commands import train_command  # noqa: F401  (its flags are this parser's; tests import it from here)
from .options import add_compile_flag, add_device_flags, add_trust_remote_code_flag, resolve_device

# flag -> TrainConfig field; each flag is a shortcut for --set FIELD=VALUE
FLAGS = {"steps": "max_steps", "group_size": "num_generations", "prompts_per_step": "prompts_per_step",
         "learning_rate": "learning_rate", "seed": "seed", "token_budget": "rollout_token_budget",
         "erase_budget": "generation.erase.budget", "save_steps": "save_steps", "compile": "generation.compile",
         "eval_data": "eval_data", "eval_samples": "eval_samples"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="RL on erasable rollouts: GRPO, DAPO or E3RL",
                       description="Train a causal LM with GRPO, DAPO or E3RL. Writes checkpoints, log.jsonl "
                                   "and rollouts.jsonl to --out; --resume continues a run exactly.")
    p.add_argument("--model", help="model directory or hub id (not needed with --resume)")
    p.add_argument("--data", help="dataset SPEC, e.g. synthetic:train?n=2000 or deepmath:/path.parquet")
    p.add_argument("--algo", choices=["grpo", "dapo", "e3rl"], help="preset of the defaults (see docs/training.md)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--steps", type=int, help="optimizer steps (max_steps)")
    p.add_argument("--group-size", type=int, help="rollouts per prompt, G (num_generations)")
    p.add_argument("--prompts-per-step", type=int, help="prompts per step over all processes")
    p.add_argument("--learning-rate", type=float, help="AdamW learning rate")
    p.add_argument("--seed", type=int, help="data order and sampling seed")
    p.add_argument("--token-budget", type=int, help="stop after this many generated tokens (rollout_token_budget)")
    p.add_argument("--erase-budget", type=int, help="erasures per segment, K (Erase@K)")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps")
    p.add_argument("--eval-data", help="held-out dataset SPEC scored before the first step and after the last "
                                       "(Avg@K, erasure off) into OUT/eval.json, e.g. synthetic:test?n=100")
    p.add_argument("--eval-samples", type=int, help="K samples per held-out problem (default 4)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="any TrainConfig field, e.g. --set beta=0.01 or --set generation.threshold.kappa=1.5")
    add_device_flags(p, dtype_default="float32", dtype_note="; the optimizer then updates float32 weights")
    add_compile_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_trust_remote_code_flag(p)
    p.set_defaults(func=cmd_train)


def _config(args: argparse.Namespace) -> tuple[Any, str, str]:
    from ..models import recommended_config
    from ..outdirs import resolve_out
    from ..training.checkpoint import RunDirError, read_run, refuse_live_run
    from ..training.config import TrainConfig

    items = [f"{field}={getattr(args, flag)}" for flag, field in FLAGS.items() if getattr(args, flag) is not None]
    if args.resume:
        run = read_run(resolve_out(args.out))
        if run is None:
            raise RunDirError(f"nothing to resume in {args.out}: it holds no run; drop --resume to start one")
        refuse_live_run(resolve_out(args.out), run, "resume")
        if not (isinstance(run.get("config"), dict) and isinstance(run.get("model"), str)
                and isinstance(run.get("data"), str)):
            raise RunDirError(f"the run record in {args.out} lacks its model, data or config; start the run again "
                              f"with --overwrite")
        return _resume_config(args, run, items), run["model"], run["data"]
    missing = [f"--{f}" for f in ("model", "data", "algo") if getattr(args, f) is None]
    if missing:
        raise E3RLError(f"e3rl train needs {', '.join(missing)} (or --resume to continue a run)")
    config = TrainConfig.for_algo(args.algo, recommended_config(args.model))
    return apply_overrides(config, items + list(args.overrides)), args.model, args.data


# what --resume may change: how far the run goes, and whether the decode step is compiled (the
# same tokens either way)
RESUMABLE = ("max_steps", "rollout_token_budget", "generation.compile", "eval_data", "eval_samples")


def _resume_config(args: argparse.Namespace, run: dict[str, Any], items: list[str]) -> Any:
    """The run's config with this command's settings applied. Users re-run the command that started
    the run with --resume added, so a flag whose value is the run's own is accepted; a value that
    differs (other than --steps / --token-budget) is refused, naming each."""
    from ..training.config import TrainConfig

    stored = TrainConfig.from_dict(run["config"])
    config = apply_overrides(stored, items + list(args.overrides))
    differ = [f"--{name} {getattr(args, name)} (the run has {run.get(name)})" for name in ("model", "data", "algo")
              if getattr(args, name) is not None and not _same_setting(name, getattr(args, name), run.get(name))]
    old, new = _flat(stored.to_dict()), _flat(config.to_dict())
    flags = {field: flag for flag, field in FLAGS.items()}
    for field in sorted(k for k in new if new[k] != old.get(k) and k not in RESUMABLE):
        flag = f"--{flags[field].replace('_', '-')} " if field in flags else f"--set {field}="
        differ.append(f"{flag}{new[field]} (the run has {old.get(field)})")
    if differ:
        raise E3RLError(
            f"--resume continues the run as it was configured; only --steps and --token-budget may change "
            f"(these differ: {'; '.join(differ)}). Start a new run with another --out to change settings"
        )
    return config


def _same_setting(name: str, given: str, recorded: Any) -> bool:
    """--model may name the run's model directory by another path (relative vs absolute)."""
    if given == recorded:
        return True
    return name == "model" and recorded is not None and Path(given).exists() and \
        Path(given).resolve() == Path(str(recorded)).resolve()


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"generation": {"erase": {"budget": 3}}} -> {"generation.erase.budget": 3} (--set names)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cmd_train(args: argparse.Namespace) -> int:
    config, model, data = _config(args)
    device = resolve_device(args.device)  # before the run directory is touched
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C: stop now (the last checkpoint stays)
            raise KeyboardInterrupt
        stop.set()
        print("\n[e3rl] stopping after this step (a checkpoint will be written); press Ctrl-C again to abort",
              file=sys.stderr, flush=True)

    # Restored on the way out, so that ``main(["train", ...])`` called from Python (tests, notebooks)
    # leaves the caller's handlers as they were.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _train(args, config, model, data, device, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _train(args: argparse.Namespace, config: Any, model: str, data: str, device: str, stop: threading.Event) -> int:
    from tqdm import tqdm

    from ..training.checkpoint import describe
    from ..training.held_out import read as read_held_out
    from ..training.trainer import Trainer

    trainer = Trainer(config, model=model, data=data, out=args.out, resume=args.resume, overwrite=args.overwrite,
                      device=device, dtype=args.dtype, should_stop=stop.is_set,
                      trust_remote_code=args.trust_remote_code)
    if trainer.prompts_filtered and trainer.dist.main:  # once per run (and once per resume)
        print(f"[e3rl] {trainer.prompts_filtered} of {trainer.prompts_filtered + len(trainer.examples)} prompts "
              f"are longer than the model's context ({trainer.generator.context} tokens) and are left out of "
              f"training", file=sys.stderr, flush=True)
    bar = tqdm(total=config.max_steps, initial=trainer.step, desc=f"train {config.algo}", unit="step",
               disable=args.quiet or not trainer.dist.main)

    def on_step(row: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", erase=f"{row['erase_rate']:.2f}",
                        tok=int(row["rollout_tokens_total"]), loss=f"{row['loss']:.4f}")

    trainer.callbacks.append(on_step)
    ended_well = False
    try:
        result = trainer.train()
        ended_well = True
    except OSError as err:  # the run directory became unwritable: run.json says failed where it could
        raise E3RLError(describe(err)) from None
    finally:
        bar.close()
        from ..training import distributed

        trainer.close()  # before the process group goes: nothing of the model is left to collect at exit
        distributed.shutdown(wait_for_peers=ended_well)
    if trainer.dist.main:
        if result.status == "already_finished":
            print(f"[e3rl] the run in {args.out} already finished at step {result.step} "
                  f"({trainer.tokens_total:,} rollout tokens); nothing to do. Pass a larger --steps "
                  f"(or --token-budget) with --resume to train further", file=sys.stderr)
        else:
            print(f"[e3rl] {result.status} at step {result.step} ({trainer.tokens_total:,} rollout tokens); "
                  f"checkpoint {result.checkpoint}; log {Path(args.out) / 'log.jsonl'}", file=sys.stderr)
            held = read_held_out(Path(args.out))
            if config.eval_data and held.get("after"):
                before, after = held.get("before"), held["after"]["avg_at_k"]
                figures = (f"{before['avg_at_k']:.3f} before → {after:.3f} after ({after - before['avg_at_k']:+.3f})"
                           if before else f"{after:.3f} after training")
                print(f"[e3rl] held-out Avg@{held['samples']} on {held['data']}: {figures}; "
                      f"{Path(args.out) / 'eval.json'}", file=sys.stderr)
    return 0
