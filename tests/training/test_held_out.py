"""Held-out evaluation around a training run (``eval_data``): the same figures as ``e3rl eval``,
no effect on what the run trains, and a clear refusal where it cannot run."""
from __future__ import annotations

import json

import pytest
import torch

from pathlib import Path

from safetensors.torch import load_file

from e3rl_core.cli import main as cli_main
from e3rl_core.errors import ConfigError
from e3rl_core.models import recommended_config
from e3rl_core.overrides import apply_overrides
from e3rl_core.tasks.datasets import DataError
from e3rl_core.training import held_out
from e3rl_core.training.config import TrainConfig
from e3rl_core.training.trainer import Trainer

DEMO = str(Path(__file__).resolve().parents[2] / "checkpoints" / "arith-demo")
DATA = "synthetic:train?n=64&seed=3&difficulty=4"


def small(algo: str, *extra: str) -> TrainConfig:
    base = TrainConfig.for_algo(algo, recommended_config(DEMO))
    return apply_overrides(base, ["num_generations=4", "prompts_per_step=2", "max_steps=4", "learning_rate=1e-3",
                                  "save_steps=2", "log_rollouts=1", *extra])


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoint-{step:06d}" / "model.safetensors")

HELD_OUT = "synthetic:test?n=6&seed=2"


def test_before_and_after_match_e3rl_eval_and_leave_training_unchanged(tmp_path, capsys):
    with_eval, plain = tmp_path / "with", tmp_path / "plain"
    cfg = lambda *extra: small("grpo", "max_steps=2", *extra)  # noqa: E731
    Trainer(cfg(f"eval_data={HELD_OUT}", "eval_samples=2"), model=DEMO, data=DATA, out=with_eval).train()
    Trainer(cfg(), model=DEMO, data=DATA, out=plain).train()
    # evaluation draws no random numbers of the run's: the same weights with or without it
    a, b = weights(with_eval, 2), weights(plain, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = held_out.read(with_eval)
    assert record["data"] == HELD_OUT and record["samples"] == 2 and "running" not in record
    assert record["before"]["step"] == 0 and record["after"]["step"] == 2
    # the same figures as e3rl eval of the starting model and of the last checkpoint (seed 0, erasure off)
    for label, model in (("before", DEMO), ("after", str(with_eval / "checkpoint-000002"))):
        capsys.readouterr()
        assert cli_main(["eval", "--model", model, "--data", HELD_OUT, "--samples", "2", "--seed", "0",
                         "--no-erase", "--json", "--device", "cpu"]) == 0
        ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert record[label]["avg_at_k"] == ref["avg_at_k"] and record[label]["pass_at_k"] == ref["pass_at_k"], label


def test_cli_prints_before_and_after(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["train", "--model", DEMO, "--data", DATA, "--algo", "grpo", "--out", str(out), "--steps", "1",
                     "--group-size", "2", "--prompts-per-step", "2", "--eval-data", HELD_OUT, "--eval-samples", "1",
                     "--quiet"]) == 0
    record = held_out.read(out)
    b, a = record["before"]["avg_at_k"], record["after"]["avg_at_k"]
    assert (f"[e3rl] held-out Avg@1 on {HELD_OUT}: {b:.3f} before → {a:.3f} after ({a - b:+.3f}); "
            f"{out / 'eval.json'}") in capsys.readouterr().err


def test_resume_keeps_before_and_refreshes_after(tmp_path):
    out = tmp_path / "run"
    cfg = lambda steps: small("grpo", f"max_steps={steps}", f"eval_data={HELD_OUT}", "eval_samples=1")  # noqa: E731
    Trainer(cfg(1), model=DEMO, data=DATA, out=out).train()
    first = held_out.read(out)
    Trainer(cfg(2), model=DEMO, data=DATA, out=out, resume=True).train()
    second = held_out.read(out)
    assert second["before"] == first["before"] and second["after"]["step"] == 2


def test_stop_during_before_ends_the_run_before_its_first_step(tmp_path):
    """A stop asked for while the starting model is scored trains nothing (and so scores no "after")."""
    out = tmp_path / "run"
    cfg = small("grpo", "max_steps=2", f"eval_data={HELD_OUT}", "eval_samples=1")
    result = Trainer(cfg, model=DEMO, data=DATA, out=out, should_stop=lambda: True).train()
    record = held_out.read(out)
    assert result.status == "stopped" and result.step == 0 and result.checkpoint is None
    assert "before" in record and "after" not in record
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    assert not list(out.glob("checkpoint-*"))


def test_bad_eval_settings_fail_before_training(tmp_path):
    with pytest.raises(DataError, match="yields no problems|no such|not found|does not exist"):
        Trainer(small("grpo", "eval_data=jsonl:/nonexistent/x.jsonl"), model=DEMO, data=DATA, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="eval_samples"):
        small("grpo", "eval_samples=0")
    assert not (tmp_path / "a").exists()


def test_after_scores_the_last_weights_under_fsdp(tmp_path, capsys):
    """parallel=fsdp generates on a gathered copy refreshed before each step's rollouts: the final
    evaluation refreshes it first, so it scores the weights of the last checkpoint."""
    out = tmp_path / "fsdp"
    Trainer(small("grpo", "max_steps=2", "parallel=fsdp", f"eval_data={HELD_OUT}", "eval_samples=2"),
            model=DEMO, data=DATA, out=out).train()
    capsys.readouterr()
    assert cli_main(["eval", "--model", str(out / "checkpoint-000002"), "--data", HELD_OUT, "--samples", "2",
                     "--seed", "0", "--no-erase", "--json", "--device", "cpu"]) == 0
    ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    after = held_out.read(out)["after"]
    assert after["avg_at_k"] == ref["avg_at_k"] and after["mean_tokens_generated"] == ref["mean_tokens_generated"]
