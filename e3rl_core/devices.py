"""Where models run: the --device and --dtype flags every entry point shares (the ``e3rl``
commands and the app's launcher), and the check of a device against this machine."""
from __future__ import annotations

import argparse

from .errors import E3RLError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_device_flags(p: argparse.ArgumentParser, dtype_default: str = "auto", dtype_note: str = "") -> None:
    """--device and --dtype, the same in generate, eval, train, bench and the app."""
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=dtype_default,
                   help=f"weights' dtype: auto = the checkpoint's own (float32 for random:<preset>); "
                        f"signals are float32 whatever it is (default: {dtype_default}{dtype_note})")


def resolve_device(device: str | None, flag: str = "--device") -> str:
    """The device to load models on: ``device`` checked against this machine (a one-line error
    that says what to do, before any file is written or model loaded), or cuda when available,
    else cpu."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise E3RLError(f"unknown {flag} {device!r}; use cpu, cuda, cuda:N or mps, or leave it out "
                        f"(cuda when available, else cpu)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch here was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise E3RLError(f"{flag} {device}: {why}; pass {flag} cpu (or leave it out), or run on a machine "
                            f"with a GPU and a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise E3RLError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered from cuda:0; pick one of them")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise E3RLError(f"{flag} {device}: MPS (Apple GPU) is not available here; pass {flag} cpu or leave it out")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise E3RLError(f"{flag} {device}: E3RL runs on cpu, cuda or mps; pick one of them")
    return str(dev)
