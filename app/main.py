"""``e3rl app``: launch the workbench (argument parsing lives here only).

    e3rl app [--host 127.0.0.1] [--port 7860] [--model PATH|HUB_ID] [--space] [--threads N] [--engine auto]
             [--device cuda] [--dtype bfloat16]

Binds 127.0.0.1 by default; analytics are off and nothing is fetched from the network but a hub id
typed into the model box. Space mode (``--space`` or ``E3RL_SPACE=1``) limits models to the shipped
checkpoints and trained outputs, bounds training runs and sets HF_HUB_OFFLINE.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from e3rl_core.devices import add_device_flags, resolve_device
from e3rl_core.errors import E3RLError
from e3rl_core.models import resolve_model_spec

from .producer import ENGINES, fork_available, fork_safe

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs granted by a cgroup quota (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``), or None when there is none or it cannot be read. A container, such as a
    Space, sees all of the host's cores but may use only this many."""
    base = Path(root)
    try:
        if (base / "cpu.max").is_file():
            quota, period = (base / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file = base / "cpu" / "cpu.cfs_quota_us"
        if quota_file.is_file():
            quota = int(quota_file.read_text())
            return None if quota <= 0 else quota / int((base / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        pass  # unreadable or malformed: no limit known, fall back to the cores the OS reports
    return None


def default_threads(root: str = "/sys/fs/cgroup") -> int:
    """Torch threads for generation: one fewer than the CPUs this process may use (its affinity,
    capped by a cgroup quota), left to the web server and the browser. On a 2-core machine a second
    torch thread does not speed up the shipped model but slows everything else (measured with
    scripts/bench_app.py)."""
    import math

    import torch

    cpus = min(torch.get_num_threads(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus - 1)


def default_engine(threads: int, device: str = "cpu") -> str:
    """Where generations run: in a forked process when they run on one torch thread (a small
    machine, where the web server and the browser share the CPU with the model) and fork is
    available; in a thread otherwise (a forked child must stay on one torch thread, and a GPU model
    does not survive a fork). Measured with scripts/bench_app.py --compare-engines."""
    return "process" if threads == 1 and fork_available() and fork_safe(device) else "thread"


def launch(host: str = "127.0.0.1", port: int | None = None, model: str | None = None, space: bool = False,
           block: bool = True, runs_root: str | None = None, threads: int | None = None, engine: str = "auto",
           device: str | None = None, dtype: str = "auto"):
    """Start the workbench. device: where models load (None: cuda when available, else cpu)."""
    import torch

    from .audit import MAX_TRACE_FILE_BYTES
    from .render import CSS
    from .ui import build

    if engine not in ("auto", *ENGINES):
        raise E3RLError(f"unknown engine {engine!r}; use auto, {' or '.join(ENGINES)}")
    if engine == "process" and (threads or 1) > 1:
        raise E3RLError(f"engine 'process' generates on one torch thread; drop threads={threads} or use "
                        f"engine 'thread'")
    if engine == "process" and not fork_available():
        raise E3RLError("engine 'process' needs fork (Linux); use engine 'thread'")
    device = resolve_device(device)
    if engine == "process" and not fork_safe(device):
        raise E3RLError(f"engine 'process' forks workers, and a {device} model does not survive a fork; "
                        f"use --engine thread (or leave --engine out: auto picks thread on a GPU), "
                        f"or --device cpu")
    torch.set_num_threads(threads or default_threads())
    engine = default_engine(torch.get_num_threads(), device) if engine == "auto" else engine
    demo = build(space=space, default_model=model, runs_root=runs_root, engine=engine, device=device, dtype=dtype)
    demo.queue(default_concurrency_limit=2, max_size=32)
    # Uploads (trace files) larger than the Audit tab loads are refused before they reach the disk.
    _, url, _ = demo.launch(server_name=host, server_port=port, css=CSS, show_error=True,
                            prevent_thread_lock=not block, ssr_mode=False, max_file_size=MAX_TRACE_FILE_BYTES)
    return demo, url


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="e3rl app", description="the E3RL workbench in a browser")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument("--model", help="model directory or hub id to select first (default: the shipped checkpoint)")
    p.add_argument("--space", action="store_true", default=os.environ.get("E3RL_SPACE") == "1",
                   help="Hugging Face Space mode: shipped and trained models only, bounded training")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for generation (default: one fewer than the CPUs this process may use)")
    p.add_argument("--engine", choices=["auto", "thread", "process"], default="auto",
                   help="where generations run: a thread of the server, or a forked process on one torch "
                        "thread (Linux, CPU models only); auto: process when generating on one CPU thread, "
                        "else thread")
    add_device_flags(p)
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.model:
        # A directory is checked now; a hub id (Qwen/Qwen3-4B) is fetched when first used, except in a
        # Space, which reaches no network and serves local directories only.
        try:
            spec = resolve_model_spec(args.model)
        except E3RLError as err:
            print(f"error: {err}; or leave --model out to use the shipped checkpoint", file=sys.stderr)
            return 2
        if args.space and not os.path.isdir(spec):
            print(f"error: model directory not found: {args.model}; a Space serves local directories only "
                  f"(no hub ids): pass a directory with config.json, or leave --model out", file=sys.stderr)
            return 2
    if args.space:  # nothing in a Space reaches the network: set before the hub client is imported
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        launch(args.host, args.port, args.model, args.space, threads=args.threads, engine=args.engine,
               device=args.device, dtype=args.dtype)
    except E3RLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
