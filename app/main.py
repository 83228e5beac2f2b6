"""``e3rl app``: launch the workbench (argument parsing lives here only).

    e3rl app [--host 127.0.0.1] [--port 7860] [--model PATH] [--space] [--threads N]

Binds 127.0.0.1 by default; analytics are off and nothing is fetched from the network. Space mode
(``--space`` or ``E3RL_SPACE=1``) limits models to the shipped checkpoints and trained outputs and
bounds training runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def default_threads() -> int:
    """Torch threads for generation: one core fewer than torch would take, left to the web server
    and the browser (on a 2-core machine a second torch thread does not speed up the shipped model
    but slows everything else; measured with scripts/bench_app.py)."""
    import torch

    return max(1, torch.get_num_threads() - 1)


def launch(host: str = "127.0.0.1", port: int | None = None, model: str | None = None, space: bool = False,
           block: bool = True, runs_root: str | None = None, threads: int | None = None):
    import torch

    from .render import CSS
    from .ui import build

    torch.set_num_threads(threads or default_threads())
    demo = build(space=space, default_model=model, runs_root=runs_root)
    demo.queue(default_concurrency_limit=2, max_size=32)
    _, url, _ = demo.launch(server_name=host, server_port=port, css=CSS, show_error=True,
                            prevent_thread_lock=not block, ssr_mode=False)
    return demo, url


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="e3rl app", description="the E3RL workbench in a browser")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument("--model", help="model directory to select first (default: the shipped checkpoint)")
    p.add_argument("--space", action="store_true", default=os.environ.get("E3RL_SPACE") == "1",
                   help="Hugging Face Space mode: shipped and trained models only, bounded training")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for generation (default: one fewer than the cores torch uses)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.model and not os.path.isdir(args.model):
        print(f"error: model directory not found: {args.model}; pass a directory with config.json, "
              f"or leave --model out to use the shipped checkpoint", file=sys.stderr)
        return 2
    launch(args.host, args.port, args.model, args.space, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
