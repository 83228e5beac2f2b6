"""Sharded training (parallel=fsdp, torch FSDP2) on 2 CPU processes under torchrun (gloo) against one
unsharded process with the same global batch: rollouts, loss, gradient norm, weights, per-process
bytes, sharded checkpoints and resume and uneven micro-batches (a failure on one process:
test_distributed.py, for both kinds)."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from e3rl_core.errors import ConfigError
from e3rl_core.training.config import TrainConfig

DEMO = str(Path(__file__).resolve().parents[2] / "checkpoints" / "arith-demo")
LR = 1e-3
# difficulty 3, seed 5: steps 2-4 carry a learning signal on the demo model (step 1 does not)
ARGS = ["--model", DEMO, "--data", "synthetic:train?n=64&seed=5&difficulty=3", "--algo", "e3rl",
        "--group-size", "4", "--prompts-per-step", "2", "--learning-rate", str(LR), "--quiet", "--device", "cpu",
        "--set", "max_completion_length=128", "--set", "scale_rewards=batch", "--set", "save_total_limit=None"]
FSDP = ["--set", "parallel=fsdp"]
needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], world: int = 1, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable]
    if world > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
                   "--master_port", str(_free_port())]
    proc = subprocess.run([*launch, "-m", "e3rl_core.cli", "train", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    if ok:
        assert proc.returncode == 0, _failure(proc.stderr)
    return proc


def _failure(stderr: str) -> str:
    """The lines of every process that say why (torchrun's summary alone names only a signal)."""
    said = [line for line in stderr.splitlines()
            if any(w in line for w in ("rror", "terminate", "abort", "Abort", "what():", "Traceback", "[e3rl]"))]
    return "\n".join(said[-40:]) + "\n...\n" + stderr[-2000:]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / f"checkpoint-{step:06d}" / "model.safetensors")


def _assert_same_run(rows1: list[dict], rows2: list[dict], w1: dict, w2: dict) -> None:
    assert len(rows1) == len(rows2)
    for key in ("tokens_generated", "tokens_kept", "reward_mean", "rollouts", "erase_rate"):
        assert [r[key] for r in rows1] == [r[key] for r in rows2], key  # the same rollouts
    assert any(r["advantage_abs_mean"] > 0 for r in rows1), "the test batch should carry a learning signal"
    for a, b in zip(rows1, rows2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-7)
    assert sorted(w1) == sorted(w2)  # the consolidated export has the unsharded checkpoint's tensors
    # As in the DDP test: Adam divides by sqrt(v), so float-order noise moves a weight by a small
    # fraction of one step (lr), not by machine epsilon.
    for k, w in w1.items():
        assert float((w - w2[k]).abs().max()) < 0.05 * LR, k


@needs_dist
def test_two_fsdp_processes_equal_one_unsharded_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "fsdp2"
    _run(["--out", str(one), "--steps", "2", *ARGS])
    _run(["--out", str(two), "--steps", "2", *ARGS, *FSDP], world=2)
    rows1, rows2 = _rows(one), _rows(two)
    _assert_same_run(rows1, rows2, _weights(one, 2), _weights(two, 2))
    # each process holds half of the parameters, gradients and AdamW state (counted from its tensors)
    for a, b in zip(rows1, rows2):
        for key in ("rank_parameters_bytes", "rank_gradients_bytes", "rank_optimizer_bytes"):
            assert b[key] / a[key] == pytest.approx(0.5, abs=0.01), key
    assert all(r["weight_sync_time"] >= 0 for r in rows2) and "weight_sync_time" not in rows1[0]
    ckpt = two / "checkpoint-000002"
    assert (ckpt / "sharded" / ".metadata").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["parallel"] == "fsdp" and state["world_size"] == 2
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    # one process with parallel=fsdp (a one-member group) computes what the unsharded one does
    solo = tmp_path / "fsdp1"
    _run(["--out", str(solo), "--steps", "2", *ARGS, *FSDP])
    for a, b in zip(rows1, _rows(solo)):
        assert (a["loss"], a["grad_norm"], a["rank_optimizer_bytes"]) == (b["loss"], b["grad_norm"],
                                                                          b["rank_optimizer_bytes"])
    w_one, w_solo = _weights(one, 2), _weights(solo, 2)
    assert all(torch.equal(w_one[k], w_solo[k]) for k in w_one)
    # the export loads with plain transformers and holds the trained weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    trained = _weights(two, 2)
    for name, tensor in model.state_dict().items():
        if name in trained:
            assert torch.equal(tensor, trained[name]), name


@needs_dist
def test_fsdp_resume_continues_exactly_and_refuses_another_world_size(tmp_path):
    straight, resumed = tmp_path / "four", tmp_path / "two-plus-two"
    _run(["--out", str(straight), "--steps", "4", *ARGS, *FSDP], world=2)
    _run(["--out", str(resumed), "--steps", "2", *ARGS, *FSDP], world=2)
    _run(["--out", str(resumed), "--steps", "4", "--resume", *ARGS, *FSDP], world=2)
    rows_a, rows_b = _rows(straight), _rows(resumed)
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert sum(r["advantage_abs_mean"] > 0 for r in rows_a[2:]) >= 1, "the resumed steps should learn something"
    for a, b in zip(rows_a, rows_b):
        for key in ("tokens_generated", "reward_mean", "loss", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key)
    wa, wb = _weights(straight, 4), _weights(resumed, 4)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # one process cannot take two processes' shards: a clear error, nothing changed
    proc = _run(["--out", str(resumed), "--steps", "6", "--resume", *ARGS, *FSDP], ok=False)
    assert proc.returncode != 0
    assert "was written by 2 FSDP processes and this run has 1" in proc.stderr
    assert "--nproc_per_node 2" in proc.stderr and "Traceback" not in proc.stderr
    assert [r["step"] for r in _rows(resumed)] == [1, 2, 3, 4]


@needs_dist
def test_fsdp_with_uneven_micro_batches_and_an_old_policy_forward(tmp_path):
    """Erased-attempt rows make the processes' batches (and micro-batch counts) differ; with two
    passes the old policy's no-grad forward runs too. The process with fewer micro-batches joins
    the other's all-gathers with dummy forwards, and the result is still the one-process run's."""
    extra = ["--steps", "2", "--set", "erased_advantage_delta=0.1", "--set", "micro_batch_size=3",
             "--set", "num_iterations=2", "--set", "log_rollouts=8"]
    one, two = tmp_path / "one", tmp_path / "fsdp2"
    _run(["--out", str(one), *ARGS, *extra])
    _run(["--out", str(two), *ARGS, *extra, *FSDP], world=2)
    _assert_same_run(_rows(one), _rows(two), _weights(one, 2), _weights(two, 2))
    # the case is the uneven one: from the one-process run's traces (process r of 2 gets group r)
    from e3rl_core.events import group_traces, read_events
    from e3rl_core.training.rollout import erased_attempts

    traces = group_traces(list(read_events(one / "rollouts.jsonl")))
    micro = {}
    for t in traces:
        rows = 1 + len(erased_attempts(t))
        key = (t.start.train_step, t.start.group_id)
        micro[key] = micro.get(key, 0) + rows
    counts = {step: [math.ceil(micro[(step, g)] / 3) for g in (0, 1)] for step in (1, 2)}
    assert any(a != b for a, b in counts.values()), counts


@needs_dist
def test_fsdp_bf16_compute_with_cpu_offload_keeps_float32_master_weights(tmp_path):
    """Mixed precision changes the numbers (bf16 rollouts and forwards), so this run is compared
    with nothing bit-wise: it trains, its master weights and export stay float32, its gradient norm
    is the float32 run's within bf16 noise, and each process still holds half of the state."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    _run(["--out", str(fp32), "--steps", "2", *ARGS, *FSDP], world=2)
    _run(["--out", str(bf16), "--steps", "2", *ARGS, *FSDP, "--set", "fsdp_mixed_precision=bf16",
          "--set", "fsdp_cpu_offload=true"], world=2)
    rows_a, rows_b = _rows(fp32), _rows(bf16)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows_b)
    assert rows_b[1]["grad_norm"] == pytest.approx(rows_a[1]["grad_norm"], rel=0.1)
    assert rows_b[1]["rank_parameters_bytes"] == rows_a[1]["rank_parameters_bytes"]  # float32 shards
    weights = _weights(bf16, 2)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    moved = max(float((weights[k] - _weights(fp32, 2)[k]).abs().max()) for k in weights)
    assert 0 < moved < 10 * LR


def test_parallel_settings_are_validated():
    with pytest.raises(ConfigError, match="parallel must be one of ddp, fsdp, got 'zero3'"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ConfigError, match="fsdp_mixed_precision must be one of none, bf16"):
        TrainConfig(parallel="fsdp", fsdp_mixed_precision="fp16")
    with pytest.raises(ConfigError, match="add --set parallel=fsdp"):
        TrainConfig(fsdp_cpu_offload=True)
    assert TrainConfig(parallel="fsdp", fsdp_mixed_precision="bf16", fsdp_cpu_offload=True).parallel == "fsdp"
    assert TrainConfig.from_dict(TrainConfig(parallel="fsdp").to_dict()).parallel == "fsdp"
