"""Bad input gets an error that says what to do, and loses nothing."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_config

from e3rl_core.cli import main
from e3rl_core.errors import ModelLoadError, NonFiniteLogitsError, PromptError
from e3rl_core.events import ErrorEvent, TokenEvent, read_events
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.models import load_model, random_model


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_dir_without_tokenizer(model_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for f in bare.iterdir():
        if "token" in f.name:
            f.unlink()
    with pytest.raises(ModelLoadError, match=r"no usable tokenizer.*tokenizer.save_pretrained"):
        load_model(str(bare))


def test_non_causal_model(tmp_path):
    from transformers import CLIPVisionConfig, T5Config

    CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(str(tmp_path / "vit"))
    T5Config(d_model=32, d_ff=37, num_layers=1, num_heads=2).save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelLoadError, match="encoder-decoder"):
        load_model(str(tmp_path / "t5"))


def test_empty_and_too_long_prompts(tiny_llama):
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config())
    for bad in ("", "   \n"):
        with pytest.raises(PromptError, match="empty"):
            list(gen.stream(bad))
    with pytest.raises(PromptError, match="context is 2048; shorten it to at most 2047 tokens"):
        list(gen.stream("x" * 3000))
    with pytest.raises(PromptError, match="no prompts"):
        list(gen.stream([]))


def test_context_bounds_the_completion():
    model, tok = random_model("tiny-llama", max_positions=40, init_std=0.3)
    gen = ErasableGenerator(model, tok, make_config("max_new_tokens=100", "threshold.policy=none"))
    gen.eos_ids = set()
    trace = gen.generate("x" * 30, seed=0)[0]
    assert len(trace.start.prompt_ids) + len(trace.done.token_ids) == 40
    assert trace.done.finish_reason == "length"


def _poisoned(tmp_path=None):
    """A model whose embedding of its first greedy token is NaN: logits go non-finite at step 1."""
    model, tok = random_model("tiny-llama", init_std=0.3, seed=1)
    gen = ErasableGenerator(model, tok, make_config("sampling.temperature=0", "threshold.policy=none"))
    first = gen.generate("ab", seed=0)[0].tokens[0].token_id
    with torch.no_grad():
        model.get_input_embeddings().weight[first] = float("nan")
    return model, tok, first


def test_non_finite_logits_name_the_position():
    model, tok, _ = _poisoned()
    gen = ErasableGenerator(model, tok, make_config("sampling.temperature=0", "threshold.policy=none"))
    seen = []
    with pytest.raises(NonFiniteLogitsError, match=r"at step 1 \(sequence position 4\)") as info:
        for ev in gen.stream("ab", seed=0):
            seen.append(ev)
    assert info.value.position == 4  # <bos> a b + one generated token
    assert isinstance(seen[-1], ErrorEvent) and any(isinstance(e, TokenEvent) for e in seen)


def test_cli_writes_the_trace_so_far_on_non_finite_logits(tmp_path, capsys):
    model, tok, _ = _poisoned()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "t.jsonl"
    code = main(["generate", "--model", str(tmp_path / "m"), "--prompt", "ab", "--temperature", "0",
                 "--policy", "none", "--trace-out", str(out), "--dtype", "float32"])
    assert code == 2
    assert "non-finite logits" in capsys.readouterr().err
    events = read_events(out)
    assert [type(e).__name__ for e in events] == ["StartEvent", "TokenEvent", "ErrorEvent"]


def test_cli_errors_are_one_line_with_advice(tmp_path, capsys, model_dir):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--policy", "magic"]) == 2
    assert "choose one of: e3rl, fixed, none, quantile, zscore" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--segment-mode", "words"]) == 2
    assert "choose one of: delimiter, fixed" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt-file", str(tmp_path / "none.txt")]) == 2
    assert "cannot read --prompt-file" in capsys.readouterr().err


def test_app_refuses_conflicting_engine_settings_before_starting(capsys):
    from app.main import default_engine
    from app.main import main as app_main
    from app.producer import fork_available

    assert app_main(["--engine", "process", "--threads", "2"]) == 2  # returns before binding a port
    assert "generates on one torch thread; drop threads=2 or use engine 'thread'" in capsys.readouterr().err
    assert app_main(["--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    # a forked child must stay on one torch thread: more threads keep generation in a thread
    assert default_engine(2) == "thread"
    assert default_engine(1) == ("process" if fork_available() else "thread")


def test_app_model_flag_takes_a_directory_or_a_hub_id(tmp_path, capsys, monkeypatch):
    import app.main as app_main_module

    launched = []
    monkeypatch.setattr(app_main_module, "launch", lambda host, port, model, space, **kw: launched.append(model))
    assert app_main_module.main(["--model", str(tmp_path / "missing")]) == 2  # a path: checked at once
    err = capsys.readouterr().err
    assert "model directory not found" in err and "leave --model out" in err and not launched
    (tmp_path / "empty").mkdir()
    assert app_main_module.main(["--model", str(tmp_path / "empty")]) == 2
    assert "has no config.json" in capsys.readouterr().err and not launched
    # a hub id is fetched when first used (the load error, offline, shows in the app), not refused here
    assert app_main_module.main(["--model", "Qwen/Qwen3-4B"]) == 0 and launched == ["Qwen/Qwen3-4B"]
    # a Space reaches no network: local directories only
    assert app_main_module.main(["--space", "--model", "Qwen/Qwen3-4B"]) == 2
    assert "a Space serves local directories only" in capsys.readouterr().err and len(launched) == 1
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # the first model loads in the background: a failure there is one line, not a thread's traceback
    from app.session import ModelStore
    from app.ui import _preload

    _preload(ModelStore(), str(tmp_path / "missing"))
    assert capsys.readouterr().err.strip().startswith(f"[e3rl app] could not load {tmp_path / 'missing'}: model "
                                                      f"directory not found")


def test_default_threads_respect_a_container_cpu_quota(tmp_path, monkeypatch):
    """A Space (a container) sees the host's cores but gets a quota; the app's torch threads and
    so its engine choice follow the quota."""
    import os

    from app.main import cgroup_cpu_limit, default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(16)  # as on a 16-core host
    try:
        v2 = tmp_path / "v2"
        v2.mkdir()
        (v2 / "cpu.max").write_text("200000 100000\n")
        assert cgroup_cpu_limit(str(v2)) == 2.0 and default_threads(str(v2)) == 1
        (v2 / "cpu.max").write_text("max 100000\n")
        assert cgroup_cpu_limit(str(v2)) is None and default_threads(str(v2)) == 15
        v1 = tmp_path / "v1" / "cpu"
        v1.mkdir(parents=True)
        (v1 / "cpu.cfs_quota_us").write_text("450000\n")
        (v1 / "cpu.cfs_period_us").write_text("100000\n")
        assert cgroup_cpu_limit(str(tmp_path / "v1")) == 4.5 and default_threads(str(tmp_path / "v1")) == 4
        (v1 / "cpu.cfs_quota_us").write_text("-1\n")
        assert cgroup_cpu_limit(str(tmp_path / "v1")) is None
        (v1 / "cpu.cfs_quota_us").write_text("garbage")
        assert cgroup_cpu_limit(str(tmp_path / "v1")) is None  # malformed: no limit known, no crash
        assert cgroup_cpu_limit(str(tmp_path / "none")) is None
    finally:
        torch.set_num_threads(before)
