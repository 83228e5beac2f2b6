"""Devices and dtypes: --device/--dtype in every command and the app, float32 signals from bf16
models, and a one-line error (never a traceback) for a device this machine does not have."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_config
from safetensors.torch import load_file

from e3rl_core.cli import build_parser
from e3rl_core.cli import main as cli_main
from e3rl_core.errors import E3RLError
from e3rl_core.events import TokenEvent, read_events
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.generation.signals import token_signals
from e3rl_core.models import load_model, random_model, save_random_model

DEMO = str(Path(__file__).resolve().parents[1] / "checkpoints" / "arith-demo")

# every command that loads a model, with the arguments it needs to get as far as the device check
COMMANDS = {
    "generate": ["generate", "--model", "random:tiny-llama", "--prompt", "ab", "--max-new-tokens", "2"],
    "eval": ["eval", "--model", "random:tiny-llama", "--data", "synthetic:test?n=1", "--max-new-tokens", "2"],
    "train": ["train", "--model", DEMO, "--data", "synthetic:train?n=4", "--algo", "grpo", "--steps", "1", "--quiet"],
    "bench": ["bench", "generate", "--model", "random:tiny-llama", "--quick", "--repeats", "1"],
}


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        cli_main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.mark.parametrize("argv", [["generate"], ["eval"], ["train"], ["bench", "generate"], ["app"]])
def test_every_command_has_the_same_device_and_dtype_flags(argv, capsys):
    text = _help(argv, capsys)
    assert "--device DEVICE" in text and "default: cuda when available, else cpu" in text
    assert "--dtype {auto,float32,bfloat16,float16}" in text


def test_train_keeps_float32_by_default_the_others_the_checkpoints_dtype():
    parser = build_parser()
    assert parser.parse_args(["train", "--out", "x"]).dtype == "float32"
    assert parser.parse_args(["generate", "--model", "m"]).dtype == "auto"
    assert parser.parse_args(["bench", "generate", "--dtype", "bfloat16"]).dtype == "bfloat16"


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_device_cuda_without_cuda_is_one_line_that_says_what_to_do(name, no_cuda, tmp_path, capsys):
    out = tmp_path / "new"
    outputs = {"generate": ["--trace-out", str(out / "t.jsonl")], "eval": ["--out", str(out / "rows.jsonl")],
               "train": ["--out", str(out)]}
    assert cli_main([*COMMANDS[name], *outputs.get(name, []), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda:") and "\n" not in err
    assert "pass --device cpu (or leave it out)" in err
    assert not out.exists()  # refused before an output (or the run directory) is created


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_unknown_device_names_the_valid_ones(name, tmp_path, capsys):
    argv = COMMANDS[name] + (["--out", str(tmp_path / "run")] if name == "train" else [])
    assert cli_main([*argv, "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: unknown --device 'gpu'; use cpu, cuda, cuda:N or mps, or leave it out "
                   "(cuda when available, else cpu)")


def test_the_default_device_is_cuda_when_available_else_cpu(monkeypatch):
    from e3rl_core.cli.options import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda"


def test_app_device_cuda_without_cuda_is_one_line(no_cuda, capsys):
    from app.main import main as app_main

    assert app_main(["--device", "cuda"]) == 2  # returns before binding a port
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda:") and "pass --device cpu" in err and "\n" not in err


# ---------------------------------------------------------------- the app on a device


def test_the_app_loads_its_models_with_device_and_dtype(monkeypatch):
    """``e3rl app --device cpu --dtype bfloat16`` reaches the store, which loads with them (the store
    used to pin every model to CPU in its checkpoint dtype)."""
    import app.ui
    from app.main import main as app_main
    from app.session import ModelStore

    seen = {}

    def fake_build(**kwargs):
        seen.update(kwargs)
        raise E3RLError("stop before serving")

    monkeypatch.setattr(app.ui, "build", fake_build)
    assert app_main(["--device", "cpu", "--dtype", "bfloat16"]) == 2
    assert seen["device"] == "cpu" and seen["dtype"] == "bfloat16"
    model, _ = ModelStore(device=seen["device"], dtype=seen["dtype"]).get(DEMO)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert next(ModelStore().get(DEMO)[0].parameters()).dtype == torch.float32  # the default is unchanged


def test_a_gpu_app_generates_in_a_thread_never_a_forked_process(monkeypatch, capsys):
    """CUDA does not survive fork: auto picks the thread engine, and an explicit process engine is
    refused with advice, in the launcher and in the session alike."""
    import app.main
    from app.main import default_engine
    from app.producer import fork_available
    from app.session import GenRequest, ModelStore, stream_generation

    assert default_engine(1, "cuda") == "thread" and default_engine(1, "cuda:1") == "thread"
    assert default_engine(1, "cpu") == ("process" if fork_available() else "thread")
    if not fork_available():
        pytest.skip("the process engine needs fork")
    monkeypatch.setattr(app.main, "resolve_device", lambda device: device)  # as on a GPU machine
    assert app.main.main(["--engine", "process", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "a cuda model does not survive a fork; use --engine thread" in err and "\n" not in err
    with pytest.raises(E3RLError, match="does not survive a fork; use engine 'thread'"):
        next(stream_generation(ModelStore(device="cuda"), GenRequest(model=DEMO, prompt="1+1"), engine="process"))


# ---------------------------------------------------------------- bf16 models, float32 signals


def test_bf16_model_records_float32_signals_of_its_own_logits():
    """The signals are float32 computations from the bf16 logits the model produced at each step,
    exactly; a bf16 computation would round them to bf16 (8 bits of mantissa)."""
    model, tok = random_model("tiny-qwen3", init_std=0.3, seed=1)
    model.to(torch.bfloat16)
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda mod, args, out: seen.append(out.logits[0, -1].detach().clone()))
    try:
        gen = ErasableGenerator(model, tok, make_config("threshold.policy=none", "max_new_tokens=24"))
        tokens = [e for e in gen.stream("abc", group_size=1, seed=0) if isinstance(e, TokenEvent)]
    finally:
        hook.remove()
    assert seen[0].dtype == torch.bfloat16 and len(tokens) == 24
    ids = torch.tensor([t.token_id for t in tokens])
    ent, sur = token_signals(torch.stack(seen[: len(tokens)]).float(), ids)  # step i draws from forward i
    assert [t.entropy for t in tokens] == ent.tolist()
    assert [t.surprisal for t in tokens] == sur.tolist()
    # teeth: these values are not what a bf16 computation gives
    assert any(float(torch.tensor(t.entropy).bfloat16()) != t.entropy for t in tokens)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("dtype") / "tiny", "tiny-qwen3", init_std=0.3, seed=1)


@pytest.mark.parametrize("spec", ["saved", "random:tiny-qwen3"])
def test_load_model_honours_dtype_for_directories_and_random_presets(spec, saved_tiny):
    # random:<preset> used to ignore --dtype and stay float32
    model, _ = load_model(str(saved_tiny) if spec == "saved" else spec, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_generate_and_eval_run_in_bfloat16_on_cpu(saved_tiny, tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    assert cli_main(["generate", "--model", str(saved_tiny), "--prompt", "ab", "--max-new-tokens", "8",
                     "--group-size", "2", "--device", "cpu", "--dtype", "bfloat16", "--trace-out", str(trace)]) == 0
    tokens = [e for e in read_events(trace) if isinstance(e, TokenEvent)]
    assert len(tokens) == 16 and all(t.surprisal >= 0 for t in tokens)
    capsys.readouterr()
    assert cli_main(["eval", "--model", "random:tiny-qwen3", "--data", "synthetic:test?n=2", "--samples", "2",
                     "--max-new-tokens", "8", "--device", "cpu", "--dtype", "bfloat16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_problems"] == 2 and summary["samples"] == 2


def test_one_train_step_in_bfloat16_on_cpu(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", "--model", DEMO, "--data", "synthetic:train?n=8&seed=3&difficulty=2", "--algo", "e3rl",
                     "--out", str(out), "--steps", "1", "--group-size", "2", "--prompts-per-step", "2",
                     "--save-steps", "1", "--set", "max_completion_length=32", "--device", "cpu",
                     "--dtype", "bfloat16", "--quiet"]) == 0
    row = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and row["loss"] == row["loss"]  # finite, not NaN
    saved = load_file(out / "checkpoint-000001" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # it trained the bf16 model it was given

