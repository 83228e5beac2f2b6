"""Training under hostile or careless use (issue 12): a poisoned checkpoint runs no code, --resume
takes the command that started the run, overlong prompts are left out, a run directory that
becomes unwritable ends in one line, and a killed run does not read as running forever."""
from __future__ import annotations

import builtins
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.training import read_status, status_markdown
from e3rl_core.cli import main as cli_main
from e3rl_core.cli.train import train_command
from e3rl_core.models import recommended_config
from e3rl_core.overrides import apply_overrides
from e3rl_core.tasks.datasets import DataError
from e3rl_core.training import checkpoint as ckpt
from e3rl_core.training.config import TrainConfig
from e3rl_core.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "checkpoints" / "arith-demo")
DATA = "synthetic:train?n=64&seed=3&difficulty=4"
BASE = ["--data", DATA, "--algo", "grpo", "--group-size", "2", "--prompts-per-step", "2", "--quiet",
        "--set", "max_completion_length=16"]


def cheap(*extra: str) -> TrainConfig:
    return apply_overrides(TrainConfig.for_algo("grpo", recommended_config(DEMO)),
                           ["num_generations=2", "prompts_per_step=2", "max_steps=1", "max_completion_length=16",
                            "log_rollouts=1", *extra])


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """stderr's lines without progress bars and the trainer's own [e3rl] notes."""
    return [l for l in capsys.readouterr().err.splitlines() if l.startswith("error")]


class _Opens:
    """Unpickling this opens (creates) ``path``: any code at all would run the same way."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def test_poisoned_trainer_state_is_refused_and_runs_nothing(tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "MARKER"
    Trainer(cheap(), model=DEMO, data=DATA, out=out).train()  # finished: nothing left to train
    state_file = out / "checkpoint-000001" / ckpt.STATE_FILE
    state = torch.load(state_file, weights_only=True)  # what the trainer writes passes weights_only
    torch.save({**state, "note": _Opens(marker)}, state_file)
    with pytest.raises(ckpt.RunDirError, match="refused to load .*trainer_state.pt.*none was run") as err:
        Trainer(cheap(), model=DEMO, data=DATA, out=out, resume=True)
    assert "\n" not in str(err.value) and "Delete" in str(err.value)
    assert cli_main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "refused to load" in lines[0]
    assert not marker.exists()


def test_resume_accepts_the_starting_flags_and_names_the_ones_that_differ(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    assert cli_main(["train", "--model", DEMO, *BASE, "--steps", "1", "--out", str(out)]) == 0
    # the same command with --resume added (and the model named by a relative path) goes on
    monkeypatch.chdir(ROOT)
    same = ["train", "--model", "checkpoints/arith-demo", *BASE, "--out", str(out), "--resume"]
    assert cli_main([*same, "--steps", "2"]) == 0
    assert json.loads((out / ckpt.RUN_FILE).read_text())["step"] == 2
    capsys.readouterr()
    changed = [*same, "--steps", "3", "--group-size", "4", "--set", "generation.threshold.kappa=2.5",
               "--data", "synthetic:train?n=8"]
    assert cli_main(changed) == 2
    (line,) = error_lines(capsys)
    assert "only --steps and --token-budget may change" in line
    for named in ("--group-size 4 (the run has 2)", "--set generation.threshold.kappa=2.5 (the run has 1.0)",
                  "--data synthetic:train?n=8 (the run has " + DATA + ")"):
        assert named in line, named
    assert "prompts-per-step" not in line and "max_completion_length" not in line  # unchanged: not named
    assert json.loads((out / ckpt.RUN_FILE).read_text())["step"] == 2  # nothing trained


def test_prompts_longer_than_the_context_are_left_out_of_training(tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    rows = [{"q": "a = 1 + 2. What is a?", "a": "3"}, {"q": "x " * 800 + "What is 1 + 1?", "a": "2"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"jsonl:{data}?question=q&answer=a"
    out = tmp_path / "run"
    # both prompts are drawn in the one step: before, the long one stopped the run
    args = ["train", "--model", DEMO, *BASE, "--data", spec, "--steps", "1", "--out", str(out)]
    assert cli_main(args) == 0
    notes = [l for l in capsys.readouterr().err.splitlines() if "longer than the model's context" in l]
    assert notes == [("[e3rl] 1 of 2 prompts are longer than the model's context (512 tokens) and are left out "
                      "of training")]
    run = json.loads((out / ckpt.RUN_FILE).read_text())
    assert run["status"] == "finished" and run["prompts_filtered"] == 1
    # no prompt fits: one clear error, no run directory left behind
    data.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match="every prompt .* longer than the model's context \\(512 tokens\\)"):
        Trainer(cheap(), model=DEMO, data=spec, out=tmp_path / "none")
    assert not (tmp_path / "none").exists()


def _break_at_step_2(monkeypatch: pytest.MonkeyPatch, breaker) -> None:
    """Run ``breaker(out)`` just before the second step (after step 1 was logged and saved)."""
    real = Trainer.train_step

    def step(self: Trainer):
        if self.step == 1:
            breaker(self.out)
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", step)


def test_unwritable_log_mid_run_marks_the_run_failed_in_one_line(tmp_path, capsys, monkeypatch):
    # Tests run as root, where chmod does not stop writes: the log file becomes a directory instead.
    def log_becomes_a_directory(out: Path) -> None:
        (out / ckpt.LOG_FILE).unlink()
        (out / ckpt.LOG_FILE).mkdir()

    _break_at_step_2(monkeypatch, log_becomes_a_directory)
    out = tmp_path / "run"
    assert cli_main(["train", "--model", DEMO, *BASE, "--steps", "3", "--save-steps", "1", "--out", str(out)]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: cannot write log.jsonl in ") and "--resume" in line
    run = json.loads((out / ckpt.RUN_FILE).read_text())
    assert run["status"] == "failed" and "cannot write log.jsonl" in run["message"]
    assert run["last_checkpoint"] == "checkpoint-000001" and [s for s, _ in ckpt.checkpoints(out)] == [1]
    assert "cannot write log.jsonl" in status_markdown(out, read_status(out), active=False)


def test_run_directory_gone_mid_run_ends_in_one_line(tmp_path, capsys, monkeypatch):
    moved = tmp_path / "moved"

    def directory_becomes_a_file(out: Path) -> None:
        out.rename(moved)
        out.write_text("not a directory any more")

    _break_at_step_2(monkeypatch, directory_becomes_a_file)
    out = tmp_path / "run"
    assert cli_main(["train", "--model", DEMO, *BASE, "--steps", "3", "--save-steps", "1", "--out", str(out)]) == 2
    (line,) = error_lines(capsys)
    assert "cannot write log.jsonl" in line and "run.json could not be marked failed either" in line
    # run.json could not say failed; it names this (living) process, so it still reads as running
    run = json.loads((moved / ckpt.RUN_FILE).read_text())
    assert run["status"] == "running" and run["pid"] == os.getpid()
    assert read_status(moved)["status"] == "running"


def test_a_killed_run_reads_as_ended_without_a_status(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = train_command(model=DEMO, data=DATA, algo="grpo", out=out, steps=200, group_size=2, prompts_per_step=2,
                        save_steps=1, quiet=True, device="cpu", overrides=["max_completion_length=16"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not ckpt.checkpoints(out) or json.loads((out / ckpt.RUN_FILE).read_text())["last_checkpoint"] is None:
            assert proc.poll() is None and time.time() - t0 < 180, "the run did not reach its first checkpoint"
            time.sleep(0.3)
        assert read_status(out)["status"] == "running"
        proc.send_signal(signal.SIGKILL)
        time.sleep(0.5)  # not reaped yet: a zombie is not a running trainer either
        status = read_status(out)
        assert status["status"] == ckpt.STALE_STATUS == "ended without a status (killed?)"
        msg = status_markdown(out, status, active=False)
        assert "ended without a status (killed?)" in msg and "resume it" in msg and "--resume" in msg
    finally:
        proc.kill()
        proc.wait()
    assert read_status(out)["status"] == ckpt.STALE_STATUS  # reaped: gone
    # starting over in the same directory names the same state
    assert cli_main(["train", "--model", DEMO, *BASE, "--out", str(out)]) == 2
    assert "holds another run (ended without a status (killed?)" in error_lines(capsys)[0]


def test_resume_or_overwrite_of_a_live_run_is_refused_and_changes_nothing(tmp_path, capsys):
    """run.json says running and its process lives on this host: a second trainer would interleave
    checkpoints with it (--resume) or delete its directory under it (--overwrite)."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        (out / "checkpoint-000002").mkdir(parents=True)
        run = {"status": "running", "step": 2, "max_steps": 10, "pid": live.pid, "host": socket.gethostname(),
               "pid_start": ckpt._start_ticks(live.pid)}
        (out / ckpt.RUN_FILE).write_text(json.dumps(run))
        before = sorted(p.name for p in out.iterdir())
        for flag in ("--resume", "--overwrite"):
            assert cli_main(["train", "--model", DEMO, *BASE, "--out", str(out), flag]) == 2
            line = error_lines(capsys)[0]
            assert f"is still running (PID {live.pid}, step 2); stop it first" in line, line
            assert sorted(p.name for p in out.iterdir()) == before
    finally:
        live.kill()
        live.wait()
    # once that process is gone, the same directory resumes as a killed run does
    assert read_status(out)["status"] == ckpt.STALE_STATUS


def test_a_recycled_pid_is_not_the_recorded_run(tmp_path):
    """run.json names this host and a living PID, but one started at another time: not the trainer."""
    run = {"status": "running", "step": 3, "max_steps": 10, "pid": os.getpid(), "host": socket.gethostname()}
    (tmp_path / ckpt.RUN_FILE).write_text(json.dumps({**run, "pid_start": ckpt.process_record()["pid_start"]}))
    assert read_status(tmp_path)["status"] == "running"
    (tmp_path / ckpt.RUN_FILE).write_text(json.dumps({**run, "pid_start": "1"}))
    if sys.platform.startswith("linux"):
        assert read_status(tmp_path)["status"] == ckpt.STALE_STATUS
    # another machine's process cannot be checked from here: run.json is taken as it is
    (tmp_path / ckpt.RUN_FILE).write_text(json.dumps({**run, "pid": 2**22 + 7, "host": "elsewhere"}))
    assert read_status(tmp_path)["status"] == "running"


def test_non_finite_metrics_are_written_as_strict_json_and_read_back_as_numbers(tmp_path, monkeypatch):
    # Python's json writes a bare NaN, which strict parsers (browsers, jq, pandas' engine) reject.
    import e3rl_core.training.trainer as trainer_mod

    real = trainer_mod.finish_metrics
    monkeypatch.setattr(trainer_mod, "finish_metrics", lambda sums: {**real(sums), "probe": float("nan")})
    out = tmp_path / "run"
    Trainer(cheap(), model=DEMO, data=DATA, out=out).train()

    def refuse(name: str) -> None:
        raise AssertionError(f"bare {name} in a JSON file")

    (line,) = (out / ckpt.LOG_FILE).read_text().splitlines()
    assert json.loads(line, parse_constant=refuse)["probe"] == "NaN"
    json.loads((out / ckpt.RUN_FILE).read_text(), parse_constant=refuse)
    row = read_status(out)["rows"][0]
    assert isinstance(row["probe"], float) and row["probe"] != row["probe"]  # NaN again, for the charts
