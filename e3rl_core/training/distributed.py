"""Data parallelism on torch.distributed, reduced to the few operations the trainer needs.

Launched by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the process group is
gloo on CPU and nccl on CUDA; started plainly, every function is a no-op for one process. Each
process holds a full model replica; gradients are summed across processes after backward (losses
use global normalisers, so the sum equals the one-process gradient of the whole batch).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..errors import E3RLError


class PeerFailedError(E3RLError):
    """Another training process failed; this one stops too."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str | None = None) -> Dist:
    """Join the process group torchrun set up (once); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj`` in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_floats(values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over processes (same keys everywhere)."""
    if not active():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def sum_gradients(model: torch.nn.Module) -> None:
    """All-reduce (sum) every gradient, flattened into one buffer (one collective per step)."""
    if not active():
        return
    # A process whose batch was empty (dynamic sampling) has no grads yet: it contributes zeros,
    # so every process reduces the same buffer.
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


@contextmanager
def together(what: str) -> Iterator[None]:
    """Run a block that may fail on some processes only (a save on rank 0, a generation on one
    rank) and make every process fail if any did, instead of leaving the others waiting forever at
    the next collective. The failing process re-raises its own error; the others raise one naming
    the failed rank."""
    error: BaseException | None = None
    try:
        yield
    except BaseException as err:  # noqa: BLE001 - re-raised below, after the others have been told
        error = err
    if active():
        notes = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is None:
            failed = [(r, n) for r, n in enumerate(notes) if n is not None]
            if failed:
                rank, note = failed[0]
                raise PeerFailedError(f"process {rank} failed while {what} ({note}); its own output has "
                                      f"the details, and the run stops on every process")
    if error is not None:
        raise error


def shutdown(wait_for_peers: bool = False) -> None:
    """Leave the process group. ``wait_for_peers`` (after a run that ended well on this process):
    every process arrives before any tears down, since a group destroyed while a peer is still
    finishing its last exchange can abort that peer at exit (seen with gloo under load). After a
    failure nobody waits: a peer may never arrive."""
    if dist.is_available() and dist.is_initialized():  # also the one-process group of parallel=fsdp
        try:
            if wait_for_peers and active():
                dist.barrier()
        finally:
            dist.destroy_process_group()
