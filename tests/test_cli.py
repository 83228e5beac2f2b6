"""The e3rl command line, end to end on a saved tiny model."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from e3rl_core.cli import main
from e3rl_core.events import group_traces, read_events


def test_generate_prints_completions_and_summary(model_dir, tmp_path, capsys):
    out = tmp_path / "trace.jsonl"
    code = main([
        "generate", "--model", str(model_dir), "--prompt", "12 + 30 = ", "--group-size", "4", "--seed", "3",
        "--max-new-tokens", "24", "--policy", "e3rl", "--segment-mode", "fixed", "--segment-tokens", "6",
        "--set", "threshold.kappa=0", "--set", "threshold.min_group=2", "--trace-out", str(out),
    ])
    assert code == 0
    captured = capsys.readouterr()
    traces = group_traces(read_events(out))
    assert len(traces) == 4
    for i, t in enumerate(traces):
        assert f"--- rollout {i}" in captured.out
        assert t.done.text in captured.out
        assert t.start.config["threshold"]["kappa"] == 0.0
    erasures = sum(t.done.erasures for t in traces)
    assert erasures > 0  # kappa 0: every first attempt above the group mean is erased
    assert f"4 rollout(s): {sum(t.done.tokens_generated for t in traces)} tokens generated" in captured.err
    assert f"{erasures} erasures" in captured.err


def test_console_entry_point_runs(model_dir):
    res = subprocess.run(
        [sys.executable, "-m", "e3rl_core.cli", "generate", "--model", str(model_dir), "--prompt", "hi",
         "--max-new-tokens", "8", "--temperature", "0", "--stream"],
        capture_output=True, text=True, check=True,
    )
    assert "[e3rl] 1 rollout(s)" in res.stderr
    assert res.stdout.strip() != "" or "0 kept" in res.stderr


def test_bench_prints_one_table(capsys):
    assert main(["bench", "generate", "--model", "random:tiny-llama", "--quick", "--repeats", "1",
                 "--parts", "abcd"]) == 0
    table = capsys.readouterr().out
    for part in ("(a) throughput", "(b) erase+regenerate", "(c) memory", "(d) group lockstep", "Machine:"):
        assert part in table
    assert table.count("| (a) throughput |") == 2 and table.count("| (b) erase+regenerate |") == 2


def test_question_is_rendered_with_the_plain_template(model_dir, tmp_path, capsys):
    out = tmp_path / "q.jsonl"
    assert main(["generate", "--model", str(model_dir), "--question", "a = 1 + 2. What is a?",
                 "--max-new-tokens", "4", "--trace-out", str(out)]) == 0
    start = read_events(out)[0]
    assert start.prompt == "Question: a = 1 + 2. What is a?\nAnswer:\n"
    assert main(["generate", "--model", str(model_dir), "--question", "x", "--prompt", "y"]) == 2
    assert "exactly one of" in capsys.readouterr().err


def test_app_is_a_subcommand_that_hands_its_arguments_to_the_workbench(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["app", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: e3rl app" in out and "--engine" in out and "--threads" in out  # the workbench's own flags
    assert main(["app", "--threads", "0"]) == 2  # parsed and refused by app.main, before any server starts
    assert "--threads must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # every other subcommand still refuses arguments it does not know
        main(["bench", "generate", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_train_command_is_read_back_by_the_train_parser():
    from e3rl_core.cli import build_parser
    from e3rl_core.cli.train import train_command

    cmd = train_command(model="m", data="synthetic:train?n=8", algo="grpo", out="runs/x", steps=3, group_size=2,
                        learning_rate=1e-4, overrides=["beta=0.01", "generation.erase.budget=1"], device="cpu",
                        quiet=True, overwrite=True)
    assert cmd[:4] == [sys.executable, "-m", "e3rl_core.cli", "train"]
    args = build_parser().parse_args(cmd[3:])
    assert (args.model, args.data, args.algo, args.out, args.steps, args.group_size, args.learning_rate) == (
        "m", "synthetic:train?n=8", "grpo", "runs/x", 3, 2, 1e-4)
    assert args.overrides == ["beta=0.01", "generation.erase.budget=1"]
    assert args.quiet and args.overwrite and not args.resume and args.device == "cpu"
    assert args.seed is None and args.save_steps is None  # left out: the preset's defaults


@pytest.mark.parametrize("algo", ["e3rl", "dapo"])
def test_bench_train_prints_phases_against_bare_work(capsys, algo):
    assert main(["bench", "train", "--model", "random:tiny-llama", "--data", "synthetic:train?n=8", "--algo", algo,
                 "--steps", "1", "--set", "num_generations=2", "--set", "prompts_per_step=2",
                 "--set", "max_completion_length=16"]) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert re.search(r"[\d,]+ tok/s \(trainer\) \| [\d,]+ tok/s \(bare engine\) \| \d+\.\d\dx", rows["rollouts"])
    assert re.search(r"[\d,]+ ms \(_optimize\) \| [\d,]+ ms \(forward \+ backward\) \| \d+\.\d\dx", rows["optimizer phase"])
