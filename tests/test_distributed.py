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

DEMO = str(Path(__file__).resolve().parents[1] / "checkpoints" / "arith-demo")
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
