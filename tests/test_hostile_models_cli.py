"""Hostile and careless inputs to model loading and the command line: a model that ships Python code,
corrupt weights, a hub id with no network, a prompt file that is not UTF-8, a malformed --k. Each
ends in a one-line error that says what to do, and runs nothing it was not asked to run."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from conftest import free_port

from e3rl_core.cli import e3rl_command, main
from e3rl_core.errors import ModelLoadError
from e3rl_core.models import load_model, save_random_model

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the hub cache names snapshots


@pytest.fixture()
def code_model(tmp_path):
    """A model directory whose config points (auto_map) at a Python file that writes a marker when
    imported. Its model_type is unknown to transformers, so only that code could load it; left to
    decide, transformers asks on stdin whether to run it."""
    path = save_random_model(tmp_path / "code-model", "tiny-llama")
    marker = tmp_path / "MARKER"
    (path / "custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('code from the model directory ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'e3rl-custom'\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "e3rl-custom"
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (path / "config.json").write_text(json.dumps(config))
    return path, marker


def _run(args: list[str], *, stdin: str = "", env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(e3rl_command(*args), input=stdin, capture_output=True, text=True, timeout=timeout,
                          check=False, env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env or {})})


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The error line of a failed command, after checking it failed with one (not a traceback)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("command", [
    "generate --prompt 1+1= --max-new-tokens 4",
    "eval --data synthetic:test?n=2 --max-new-tokens 4",
    "train --data synthetic:train?n=4 --algo grpo --steps 1 --quiet",
    "bench generate --quick --repeats 1",
])
def test_model_code_is_refused_even_when_y_is_piped(code_model, tmp_path, command):
    path, marker = code_model
    args = command.split() + ["--model", str(path)] + (["--out", str(tmp_path / "run")] if "train" in command else [])
    proc = _run(args, stdin="y\n")
    assert not marker.exists()
    line = _error_line(proc)
    assert "ships its own Python code" in line and "--trust-remote-code" in line


def test_model_code_runs_only_with_trust_remote_code(code_model):
    """The fixture's code does run when the user asks for it, so the refusals above are real ones."""
    path, marker = code_model
    proc = _run(["generate", "--model", str(path), "--prompt", "1+1=", "--max-new-tokens", "4",
                 "--trust-remote-code"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.read_text() == "code from the model directory ran"


def test_app_model_loading_never_runs_model_code(code_model, monkeypatch):
    """The workbench loads through ModelStore.get -> load_model, which trusts no code by default."""
    import io

    from app.session import ModelStore

    path, marker = code_model
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    with pytest.raises(ModelLoadError, match="ships its own Python code"):
        ModelStore().get(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_are_a_one_line_error(model_dir, tmp_path, capsys, damage):
    path = tmp_path / "damaged"
    path.mkdir()
    for f in model_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00not safetensors" * 64)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):  # the app's path (ModelStore.get)
        load_model(str(path), device="cpu")
    assert main(["generate", "--model", str(path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "save the model again" in err


def test_prompt_file_that_is_not_utf8(tmp_path, capsys):
    prompt = tmp_path / "latin1.txt"
    prompt.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert main(["generate", "--model", "random:tiny-llama", "--prompt-file", str(prompt)]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8" in err


@pytest.mark.parametrize("ks", ["a,b", "1,,2", "2.5"])
def test_eval_k_must_be_whole_numbers(ks, capsys):
    assert main(["eval", "--model", "random:tiny-llama", "--data", "synthetic:test?n=2", "--samples", "2",
                 f"--k={ks}"]) == 2
    assert f"--k takes whole numbers separated by commas, e.g. --k 1,4,8; got {ks!r}" in \
        capsys.readouterr().err


def _hub_cache_with(tmp_path, repo: str) -> str:
    """A hub cache (HF_HUB_CACHE) holding one model snapshot for ``repo``, as a download leaves it."""
    cache = tmp_path / "hub-cache"
    entry = cache / f"models--{repo.replace('/', '--')}"
    save_random_model(entry / "snapshots" / SNAPSHOT, "tiny-llama")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(SNAPSHOT)
    return str(cache)


@pytest.mark.parametrize("no_network", ["offline-mode", "unreachable"])
def test_hub_id_without_network_fails_fast_and_cached_ids_still_load(tmp_path, no_network):
    """HF_HUB_OFFLINE=1, or an endpoint nothing answers (a closed local port stands in for a network
    that is down): an uncached id fails at once (the hub client alone retries ~27 s); a cached one loads."""
    env = {"HF_HUB_CACHE": _hub_cache_with(tmp_path, "someorg/cached"), "HF_HUB_OFFLINE": "",
           "TRANSFORMERS_OFFLINE": ""}
    if no_network == "offline-mode":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    line = _error_line(_run(["generate", "--model", "someorg/not-cached", "--prompt", "x"], env=env))
    assert time.monotonic() - t0 < 20  # the retries alone sleep 23 s
    assert "is not a local directory and not in the hub cache, and the hub is unreachable" in line
    assert ("HF_HUB_OFFLINE is set" if no_network == "offline-mode" else "cannot reach http://127.0.0.1") in line
    proc = _run(["generate", "--model", "someorg/cached", "--prompt", "1+1=", "--max-new-tokens", "4"], env=env)
    assert proc.returncode == 0 and "1 rollout(s): 4 tokens generated" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("field, value, says", [
    ("num_hidden_layers", 10**5, "100,000 layers"), ("vocab_size", 10**9, "B parameters")])
def test_a_config_too_large_to_build_is_refused_before_anything_is_allocated(tmp_path, capsys, field, value, says):
    path = save_random_model(tmp_path / "m", "tiny-llama")
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    assert main(["generate", "--model", str(path), "--prompt", "1+1="]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and not any("Traceback" in line for line in err)
    assert time.monotonic() - started < 30


def test_a_deployment_limit_refuses_a_model_the_machine_could_hold(tmp_path):
    from e3rl_core.models import check_size

    path = save_random_model(tmp_path / "m", "tiny-llama")
    model, _ = load_model(str(path))
    nbytes = check_size(str(path), model.config, "float32", "cpu")
    assert 0.9 * sum(p.numel() * 4 for p in model.parameters()) <= nbytes <= 1.1 * sum(p.numel() * 4 for p in model.parameters())
    with pytest.raises(ModelLoadError, match="allowed here"):
        load_model(str(path), max_bytes=nbytes // 2)
