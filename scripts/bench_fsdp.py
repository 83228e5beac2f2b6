"""Sharded training (``--set parallel=fsdp``) on CPU processes: memory per process, rollouts on the
sharded module vs a gathered copy, and a training step's time FSDP vs DDP. Prints markdown tables.

1. memory: a random-init model with a Qwen3-shaped config (``--preset``, default the ``qwen3-0.6b``
   preset: Qwen3-0.6B's shapes), one training step (forward, backward, AdamW) on a random batch,
   unsharded in 1 process vs FSDP over 2 (gloo). Bytes of parameters, gradients and optimizer state
   are counted from the tensors each process holds (a shard's local part); activations are the
   bytes autograd saved for backward in that step (unique storages, parameters excluded); the
   rollout copy is the full model each FSDP process keeps for generation; peak RSS growth is the
   process's peak resident memory after the step minus before the model was built (it includes
   the transient full model each process loads before sharding).
2. rollouts (2 processes, both generating the same prompts with the same seeds, so they run in
   lockstep, which generation on the sharded module needs): the erasable engine on the sharded
   module (each forward all-gathers layer by layer) vs on a full copy gathered once
   (``RolloutCopy.refresh``); the tokens are checked to be the same.
3. step time: ``e3rl train`` on 2 processes, ``parallel=ddp`` vs ``parallel=fsdp``, same run
   (a random Qwen3-shaped ``--step-preset`` model, synthetic data); medians over the steps after
   the first, from log.jsonl.

    python scripts/bench_fsdp.py [--preset qwen3-0.6b] [--rollout-preset small-qwen3:64,qwen3-0.6b:16]
        [--step-preset small-qwen3] [--parts memory,rollouts,steps] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(world: int, args: list[str], timeout: int = 3600) -> list[dict]:
    """Run this script's worker under torchrun; returns each rank's JSON result line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if proc.returncode:
        sys.exit(f"worker failed ({' '.join(args)}):\n{proc.stderr[-12000:]}")
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return sorted(rows, key=lambda r: r["rank"])


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ------------------------------------------------------------------ workers (inside torchrun)
def _worker_memory(args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist

    from e3rl_core.models import random_model
    from e3rl_core.training import fsdp

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = args.parallel == "fsdp"
    if sharded:
        dist.init_process_group("gloo")
    rss0 = _peak_rss()
    model, _ = random_model(args.preset, seed=0)
    copy_bytes = 0
    if sharded:
        copy = fsdp.RolloutCopy(model)
        copy_bytes = sum(p.nbytes for p in copy.model.parameters())
        fsdp.shard(model, device=torch.device("cpu"))
    model.train(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(dist.get_rank() if sharded else 0)
    ids = torch.randint(4, vocab, (args.batch // world, args.seq), generator=g)
    saved: dict[int, tuple[int, bool]] = {}  # storage -> (bytes, saved inside a decoder layer)
    inside = [False]
    for layer in fsdp.decoder_layers(model):
        layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
        layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            saved.setdefault(st.data_ptr(), (st.nbytes(), inside[0]))
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    step = time.perf_counter() - t0
    held = fsdp.local_bytes(model, opt)
    layers = sum(n for n, in_layer in saved.values() if in_layer)
    return {"world": world, "parallel": args.parallel, **held, "activations": sum(n for n, _ in saved.values()),
            "layer_activations": layers, "tokens": int(ids.numel()), "n_layers": len(fsdp.decoder_layers(model)),
            "rollout_copy": copy_bytes, "rss_growth": _peak_rss() - rss0, "step_s": step,
            "n_params": sum(p.numel() for p in model.parameters())}


def _worker_rollouts(args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist

    from e3rl_core.generation.config import GenerationConfig
    from e3rl_core.generation.generator import ErasableGenerator
    from e3rl_core.models import random_model
    from e3rl_core.overrides import apply_overrides
    from e3rl_core.training import fsdp

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, tok = random_model(args.preset, seed=0)
    copy = fsdp.RolloutCopy(model)
    fsdp.shard(model, device=torch.device("cpu"))
    # a fixed threshold every segment of a random model beats: erasures and KV-cache rollbacks happen
    cfg = apply_overrides(GenerationConfig(), [
        f"max_new_tokens={args.gen_tokens}", "segment.segment_tokens=8", "threshold.policy=fixed",
        "threshold.value=1.0", "erase.budget=1", "sampling.temperature=1.0"])
    prompts = ["Question: 3 + 4 = ?\nAnswer:\n"]
    out = {}
    for name, target in (("copy", copy.model), ("sharded", model)):
        dist.barrier()
        t0 = time.perf_counter()
        if name == "copy":
            copy.refresh(model)
        sync = time.perf_counter() - t0
        gen = ErasableGenerator(target, tok, cfg)
        gen.eos_ids = set()  # the same length on both processes and both paths
        with torch.no_grad():
            traces = gen.generate(prompts, group_size=args.group, seed=0)
        total = time.perf_counter() - t0
        out[name] = {"sync_s": sync, "total_s": total,
                     "tokens": sum(t.done.tokens_generated for t in traces),
                     "erasures": sum(t.done.erasures for t in traces),
                     "ids": [list(t.done.token_ids) for t in traces]}
    same = out["copy"]["ids"] == out["sharded"]["ids"]
    for v in out.values():
        del v["ids"]
    return {"same_tokens": same, **out}


# ------------------------------------------------------------------ parent: tables
def _memory_table(args: argparse.Namespace) -> str:
    runs = [("unsharded (DDP)", 1, "ddp"), ("FSDP", 2, "fsdp")]
    lines = [(f"Per-process memory, random-init `{args.preset}` (Qwen3-shaped), one training step on "
             f"{args.batch} x {args.seq} tokens (the global batch; each of N processes takes 1/N), float32, "
             f"gloo, 1 thread per process:"), "",
             ("| world | mode | parameters | gradients | AdamW state | activations (saved for backward) | "
             "params + grads + AdamW | rollout copy | peak RSS growth | step s |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = None
    for label, world, parallel in runs:
        rows = _torchrun(world, ["--worker", "memory", "--preset", args.preset, "--parallel", parallel,
                                 "--batch", str(args.batch), "--seq", str(args.seq)])
        r = max(rows, key=lambda x: x["parameters"] + x["gradients"] + x["optimizer"])  # the largest process
        state = r["parameters"] + r["gradients"] + r["optimizer"]
        base = base or state
        lines.append(f"| {world} | {label} | {r['parameters'] / MiB:,.1f} MiB | {r['gradients'] / MiB:,.1f} MiB | "
                     f"{r['optimizer'] / MiB:,.1f} MiB | {r['activations'] / MiB:,.1f} MiB | "
                     f"{state / MiB:,.1f} MiB ({state / base:.3f}x) | "
                     f"{r['rollout_copy'] / MiB:,.1f} MiB | {r['rss_growth'] / MiB:,.0f} MiB | {r['step_s']:.2f} |")
    r = rows[0]
    per = r["layer_activations"] / (r["tokens"] * r["n_layers"])
    lines.append(f"\n({r['n_params']:,} parameters; the largest process of each run is shown. Of the activations, "
                 f"the decoder layers saved {per / 1024:,.1f} KiB per token per layer, float32; the rest is the "
                 f"embeddings, LM head and loss.)")
    return "\n".join(lines)


def _rollout_table(args: argparse.Namespace) -> str:
    lines = [(f"Rollouts on 2 FSDP processes (gloo, 1 thread each), random-init models, G = {args.group} rollouts "
             f"of one prompt per process, erasures on (segments of 8 tokens, fixed threshold), process 0:"), "",
             ("| model | new tokens per rollout | rollouts on | weight gather | generation | total | "
             "tokens generated | erasures | tok/s (total) | same tokens on both paths |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for spec in args.rollout_preset.split(","):
        preset, _, tokens = spec.partition(":")
        tokens = tokens or str(args.gen_tokens)
        rows = _torchrun(2, ["--worker", "rollouts", "--preset", preset, "--gen-tokens", tokens,
                             "--group", str(args.group)])
        r = rows[0]
        for name, label in (("sharded", "the sharded module (all-gather per layer per forward)"),
                            ("copy", "a full copy gathered once")):
            x = r[name]
            lines.append(f"| `{preset}` | {tokens} | {label} | {x['sync_s']:.3f} s | {x['total_s'] - x['sync_s']:.2f} s | "
                         f"{x['total_s']:.2f} s | {x['tokens']} | {x['erasures']} | {x['tokens'] / x['total_s']:,.1f} | "
                         f"{all(y['same_tokens'] for y in rows)} |")
    return "\n".join(lines)


def _step_table(args: argparse.Namespace) -> str:
    from e3rl_core.models import save_random_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    model_dir = save_random_model(tmp / "model", args.step_preset, seed=0)
    common = ["-m", "e3rl_core.cli", "train", "--model", str(model_dir), "--data", "synthetic:train?n=64&seed=1",
              "--algo", args.algo, "--steps", str(args.steps), "--group-size", "4", "--prompts-per-step", "4",
              "--learning-rate", "1e-4", "--quiet", "--device", "cpu", "--set",
              f"max_completion_length={args.step_tokens}", "--set", f"save_steps={args.steps}"]
    lines = [(f"`e3rl train --algo {args.algo}` on 2 CPU processes (gloo, 1 thread each), random-init "
             f"`{args.step_preset}`, G = 4 x 4 prompts per step, {args.step_tokens} max new tokens, {args.steps} "
             f"steps; medians over steps 2..{args.steps} (seconds):"), "",
             ("| parallel | step | rollouts | weight gather | rest (advantages, loss, backward, optimizer) | "
             "per-process params + grads + AdamW |"), "|---|---|---|---|---|---|"]
    for parallel in ("ddp", "fsdp"):
        out = tmp / parallel
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), *common, "--out", str(out), "--set", f"parallel={parallel}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, check=False)
        if proc.returncode:
            sys.exit(f"training run failed ({parallel}):\n{proc.stderr[-12000:]}")
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]
        med = {k: statistics.median(r.get(k, 0.0) for r in rows)
               for k in ("step_time", "generation_time", "weight_sync_time")}
        rest = statistics.median(r["step_time"] - r["generation_time"] - r.get("weight_sync_time", 0.0) for r in rows)
        held = rows[-1]["rank_parameters_bytes"] + rows[-1]["rank_gradients_bytes"] + rows[-1]["rank_optimizer_bytes"]
        lines.append(f"| {parallel} | {med['step_time']:.2f} | {med['generation_time']:.2f} | "
                     f"{med['weight_sync_time']:.3f} | {rest:.2f} | {held / MiB:,.1f} MiB |")
    shutil.rmtree(tmp, ignore_errors=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-0.6b", help="model of the memory table (a random-init preset)")
    p.add_argument("--batch", type=int, default=4, help="global batch of the memory step (rows)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row of the memory step")
    p.add_argument("--rollout-preset", default="small-qwen3:64,qwen3-0.6b:16",
                   help="models of the rollout table, PRESET[:NEW_TOKENS],...")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--step-preset", default="small-qwen3", help="model of the step-time table")
    p.add_argument("--algo", default="e3rl")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--step-tokens", type=int, default=64)
    p.add_argument("--parts", default="memory,rollouts,steps")
    p.add_argument("--quick", action="store_true", help="tiny models, to check the script runs")
    p.add_argument("--worker", choices=["memory", "rollouts"], help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import gc

        import torch.distributed as dist

        result = (_worker_memory if args.worker == "memory" else _worker_rollouts)(args)
        gc.collect()  # the sharded model goes now, not during interpreter shutdown
        rank = dist.get_rank() if dist.is_initialized() else 0
        print("RESULT " + json.dumps({"rank": rank, **result}), flush=True)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return 0
    if args.quick:
        args.preset, args.rollout_preset, args.step_preset = "tiny-qwen3", "tiny-qwen3:16", "tiny-qwen3"
        args.seq, args.gen_tokens, args.steps, args.step_tokens = 32, 16, 3, 16
    import platform

    import torch

    print(f"{platform.machine()} CPU, {os.cpu_count()} cores; torch {torch.__version__}; Python {platform.python_version()}\n")
    parts = args.parts.split(",")
    for name, table in (("memory", _memory_table), ("rollouts", _rollout_table), ("steps", _step_table)):
        if name in parts:
            t0 = time.perf_counter()
            print(table(args))
            print(f"\n({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
