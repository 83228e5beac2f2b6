"""No command deletes what it did not write: every command that writes a folder takes an absent or
empty one, or one holding this project's own output of that kind (told by its fields, not by a
file name) and only with --overwrite. Everything else is a one-line error, nothing changed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from e3rl_core.cli import main
from e3rl_core.outdirs import is_run_record, resolve_out

DEMO = str(Path(__file__).resolve().parents[1] / "checkpoints" / "arith-demo")
TINY = [f"--set={kv}" for kv in ("hidden_size=32", "intermediate_size=64", "num_hidden_layers=1",
                                  "num_attention_heads=2", "num_key_value_heads=1", "batch_size=2")]
TRAIN = ["train", "--model", DEMO, "--data", "synthetic:train?n=8", "--algo", "grpo", "--steps", "1"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and not any("Traceback" in line for line in err)
    return err[-1]


@pytest.mark.parametrize("overwrite", [False, True])
def test_train_demo_model_never_replaces_a_users_folder(tmp_path, capsys, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    argv = ["train-demo-model", "--out", str(out), "--steps", "1"] + (["--overwrite"] if overwrite else [])
    assert main(argv) == 2
    assert "is not a demo model folder" in one_line_error(capsys)
    assert (out / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_train_demo_model_replaces_its_own_model_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["train-demo-model", "--out", str(out), "--steps", "2", *TINY]) == 0
    assert main(["train-demo-model", "--out", str(out), "--steps", "2"]) == 2
    assert "pass --overwrite" in one_line_error(capsys)
    (tmp_path / "demo.tmp").mkdir()  # a user's folder with the name a temporary copy once had
    assert main(["train-demo-model", "--out", str(out), "--steps", "2", *TINY, "--overwrite"]) == 0
    assert (tmp_path / "demo.tmp").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["demo", "demo.tmp"]


@pytest.mark.parametrize("content", [{"note": "my experiment notes"}, [], "status"])
def test_a_json_named_run_json_is_not_a_run(tmp_path, capsys, content):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "run.json").write_text(json.dumps(content))
    assert main([*TRAIN, "--out", str(out), "--overwrite"]) == 2
    assert "holds no e3rl run" in one_line_error(capsys)
    assert json.loads((out / "run.json").read_text()) == content
    assert main([*TRAIN[:-2], "--out", str(out), "--resume"]) == 2
    assert "nothing to resume" in one_line_error(capsys)


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "results.csv"
    f.write_text("a,b\n")
    assert main([*TRAIN, "--out", str(f)]) == 2
    assert "is a file" in one_line_error(capsys)
    assert main(["train-demo-model", "--out", str(f), "--steps", "1"]) == 2
    assert "is a file" in one_line_error(capsys) and f.read_text() == "a,b\n"


def test_tilde_is_expanded_never_a_folder_named_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert resolve_out("~/runs/x") == tmp_path / "home" / "runs" / "x"
    assert not (tmp_path / "~").exists()


def test_a_run_record_is_told_by_its_fields():
    run = {"status": "finished", "config": {}, "step": 3, "max_steps": 3, "model": "m", "data": "d"}
    assert is_run_record(run)
    assert not is_run_record({**run, "status": "whatever"}) and not is_run_record({**run, "step": "3"})
    assert not is_run_record({**run, "max_steps": True}) and not is_run_record({"status": "running"})
    assert not is_run_record([run]) and not is_run_record(None)
