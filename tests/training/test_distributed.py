"""Data parallel: 2 CPU processes under torchrun (gloo) equal 1 process with the same global batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DEMO = str(Path(__file__).resolve().parents[2] / "checkpoints" / "arith-demo")
ARGS = ["--model", DEMO, "--data", "synthetic:train?n=64&seed=3&difficulty=4", "--algo", "e3rl", "--steps", "2",
        "--group-size", "4", "--prompts-per-step", "2", "--learning-rate", "1e-3", "--quiet", "--device", "cpu",
        "--set", "max_completion_length=128", "--set", "scale_rewards=batch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "e3rl_core.cli", "train", "--out", str(one), *ARGS])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), "-m", "e3rl_core.cli", "train", "--out", str(two), *ARGS])
    rows1 = [json.loads(l) for l in (one / "log.jsonl").read_text().splitlines()]
    rows2 = [json.loads(l) for l in (two / "log.jsonl").read_text().splitlines()]
    # the same rollouts (each process generated half of them) ...
    for key in ("tokens_generated", "tokens_kept", "reward_mean", "rollouts", "erase_rate"):
        assert [r[key] for r in rows1] == [r[key] for r in rows2], key
    assert any(r["advantage_abs_mean"] > 0 for r in rows1), "the test batch should carry a learning signal"
    # ... the same loss and, after gradients were summed across processes, the same weights
    for a, b in zip(rows1, rows2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    w1 = load_file(one / "checkpoint-000002" / "model.safetensors")
    w2 = load_file(two / "checkpoint-000002" / "model.safetensors")
    # Adam divides by sqrt(v): where a gradient is ~0, float-order noise in the summed gradient moves a
    # weight by up to ~lr, so the bound is a small fraction of one step (lr = 1e-3), not machine epsilon.
    for k in w1:
        assert float((w1[k] - w2[k]).abs().max()) < 0.05 * 1e-3, k
    assert json.loads((two / "run.json").read_text())["world_size"] == 2


def _worker_whose_rank0_cannot_save(rank: int, port: int, out: str, results, parallel: str = "ddp") -> None:
    """One of two training processes (``parallel``: ddp or fsdp); rank 0 cannot finish its
    checkpoint (say, a full disk)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from e3rl_core.models import recommended_config
    from e3rl_core.overrides import apply_overrides
    from e3rl_core.training import checkpoint as ckpt
    from e3rl_core.training import distributed
    from e3rl_core.training.config import TrainConfig
    from e3rl_core.training.trainer import Trainer

    if rank == 0:
        def full_disk(*a, **k):
            raise OSError(28, "No space left on device")
        ckpt.finish_checkpoint = full_disk  # the last part of every checkpoint write, sharded or not
    cfg = apply_overrides(TrainConfig.for_algo("grpo", recommended_config(DEMO)), [
        "num_generations=2", "prompts_per_step=2", "max_steps=1", "max_completion_length=48", "save_steps=1",
        f"parallel={parallel}"])
    try:
        Trainer(cfg, model=DEMO, data="synthetic:train?n=8&seed=3", out=out, device="cpu").train()
        results.put((rank, "finished"))
    except BaseException as err:  # noqa: BLE001 - reported to the test
        results.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        distributed.shutdown()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_failure_on_one_process_stops_every_process(tmp_path, parallel):
    """Rank 0 fails to save; rank 1 must stop with an error naming it, not wait forever (replicated
    or sharded)."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker_whose_rank0_cannot_save, args=(r, port, str(tmp_path / "run"), results,
                                                                      parallel)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(2):
            rank, outcome = results.get(timeout=300)
            got[rank] = outcome
    except queue.Empty:
        pytest.fail(f"a process hung after its peer failed; outcomes so far: {got}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert got[0].startswith("OSError") and "No space left" in got[0]
    assert got[1].startswith("PeerFailedError") and "process 0 failed while saving a checkpoint" in got[1]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "failed" and "No space left" in run["message"]
