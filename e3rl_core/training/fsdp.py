"""Sharded data parallelism for the trainer: torch FSDP2 (``fully_shard``) and its checkpoints.

``parallel=fsdp`` shards every decoder layer and the root module over the process group, so each
process keeps 1/N of the parameters, gradients and AdamW state. The trainer's math is the DDP
path's: losses carry global normalisers, so gradients are *summed* across processes (FSDP's default
reduce-scatter averages; the divide factor is set to 1), and the clipped norm is the norm of the
whole (sharded) gradient.

What FSDP asks of the caller, and where it is met:
- every process runs the same number of forwards and backwards (each all-gathers a layer's
  parameters): the trainer pads a process's micro-batches with dummy ones (``dummy_forward``);
- rollouts run on a plain full copy of the policy (``RolloutCopy``), gathered once per step,
  because processes generate different prompts and stop at different lengths, so their forward
  counts differ; the erasable engine, its KV cache and rollback see an ordinary model;
- checkpoints are ``torch.distributed.checkpoint`` directories written by every process, plus a
  consolidated ``save_pretrained`` export gathered to process 0 (``save_sharded`` / ``load_sharded``).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError

SHARDED_DIR = "sharded"  # the torch.distributed.checkpoint directory inside checkpoint-N/


def ensure_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process (``--set parallel=fsdp`` without torchrun):
    a one-member group in memory, so the same code path (and checkpoint format) runs at world 1."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers FSDP shards one by one (``model.model.layers``: Llama, Qwen2/3, ...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ConfigError(f"parallel=fsdp shards the decoder layers at model.model.layers, and this model "
                          f"({type(model).__name__}) has none; use --set parallel=ddp")
    return list(layers)


def shard(model: torch.nn.Module, *, device: torch.device, mixed_precision: str = "none",
          cpu_offload: bool = False) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2: each decoder layer, then the root (embeddings, final
    norm, LM head). ``mixed_precision="bf16"`` computes with bf16 parameters and reduces gradients
    in float32 (the sharded master weights keep their dtype); ``cpu_offload`` keeps the sharded
    parameters, gradients and optimizer state in host memory (the optimizer steps on the CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:  # pinned host memory needs CUDA
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, not average: the loss already divides by the global token/sequence count.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm of sharded (DTensor) or plain gradients; returns the norm
    before clipping. The norm of DTensor shards is a partial value until reduced across processes
    (``full_tensor``), which ``torch.nn.utils.clip_grad_norm_`` alone does not do."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return float(total)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds of the parameters, gradients and optimizer state, counted from the
    tensors themselves (a shard's local part under FSDP, the whole tensor otherwise)."""
    params = list(model.parameters())
    out = {"parameters": sum(_local(p).nbytes for p in params),
           "gradients": sum(_local(p.grad).nbytes for p in params if p.grad is not None)}
    out["optimizer"] = sum(_local(v).nbytes for state in optimizer.state.values() for v in state.values()
                           if isinstance(v, torch.Tensor))
    return out


class RolloutCopy:
    """A plain, full copy of the policy for generation, refreshed from the sharded one before each
    step's rollouts: one all-gather per parameter per step, then every process generates alone.

    Made before sharding (``copy.deepcopy``), frozen, its parameters in ``dtype`` (bf16 under mixed
    precision, as the sharded forward computes; buffers such as RoPE frequencies keep theirs)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()
        if dtype is not None:
            for p in self.model.parameters():
                p.data = p.data.to(dtype)

    @torch.no_grad()
    def refresh(self, sharded: torch.nn.Module) -> None:
        """Copy the sharded model's current weights in (a collective: every process calls it)."""
        from torch.distributed.tensor import DTensor

        for name, p in sharded.named_parameters():
            target = self.model.get_parameter(name)
            full = p.to(target.device).full_tensor() if isinstance(p, DTensor) else p
            target.copy_(full)


def dummy_forward(model: torch.nn.Module, pad_id: int, device: torch.device, backward: bool) -> None:
    """One forward (and backward) on a one-token batch that contributes nothing, so a process with
    fewer micro-batches than another joins each of FSDP's all-gathers and reduce-scatters."""
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    if backward:
        (logits.float().sum() * 0.0).backward()


# ---------------------------------------------------------------- checkpoints
def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the model and optimizer to ``path/sharded``
    (``torch.distributed.checkpoint``; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / SHARDED_DIR))


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read ``path/sharded`` into the sharded model and optimizer (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: torch.nn.Module, plain: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on process 0, in host memory (empty elsewhere; a collective):
    what ``save_pretrained`` writes for the consolidated export. Gathered shards no longer share
    storage, so a tied weight (``lm_head`` = the embeddings) would be written twice; its alias names,
    read from the unsharded ``plain`` model, are left out as ``save_pretrained`` leaves them out."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    aliases = ({n for n, _ in plain.named_parameters(remove_duplicate=False)}
               - {n for n, _ in plain.named_parameters()})
    return {k: v for k, v in full.items() if k not in aliases}


def has_sharded_state(path: Path) -> bool:
    return os.path.isdir(path / SHARDED_DIR)
