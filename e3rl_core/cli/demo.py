"""``e3rl train-demo-model``: train the small demo model on the synthetic task."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..overrides import apply_overrides


def add_parser(sub: Any) -> None:
    demo = sub.add_parser("train-demo-model", help="train the small demo model on the synthetic task")
    demo.add_argument("--out", required=True, help="output directory (written atomically): new, empty, or holding "
                                                   "a demo model this command wrote (then with --overwrite)")
    demo.add_argument("--overwrite", action="store_true", help="replace the demo model in --out")
    demo.add_argument("--steps", type=int, default=3200)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                      help="any DemoModelConfig field, e.g. --set hidden_size=192")
    demo.set_defaults(func=cmd_train_demo_model)


def cmd_train_demo_model(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..outdirs import check_out_dir, is_demo_model, resolve_out
    from ..training.sft import DemoModelConfig, train_demo_model

    cfg = apply_overrides(DemoModelConfig(steps=args.steps, seed=args.seed), list(args.overrides))
    out = resolve_out(args.out)
    # Before any training: a folder holding anything but this command's own model is never replaced.
    check_out_dir(out, what="a demo model folder written by e3rl train-demo-model", ours=is_demo_model,
                  overwrite=args.overwrite)
    bar = tqdm(total=cfg.steps, desc="train-demo-model", unit="step")

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    log = train_demo_model(cfg, out, on_step=on_step)
    bar.close()
    print(f"[e3rl] trained {log.params:,} parameters for {log.steps} steps on {log.tokens:,} tokens "
          f"in {log.seconds / 60:.1f} min; saved to {out}", file=sys.stderr)
    return 0
