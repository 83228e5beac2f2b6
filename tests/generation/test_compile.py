"""``compile=true`` (``--compile``): the decode step through torch.compile gives the same tokens,
decisions and signals as the eager model, and a platform without a compiler is told so."""
from __future__ import annotations

import pytest
from conftest import make_config, median_score

from e3rl_core.cli import main
from e3rl_core.errors import ConfigError
from e3rl_core.generation import compile as compile_mod
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.models import random_model

PROMPT = "Compute 12 + 7 = "


@pytest.fixture(scope="module")
def qwen3():
    return random_model("tiny-qwen3", init_std=0.3, seed=1)


def _traces(model, tok, *overrides):
    gen = ErasableGenerator(model, tok, make_config(*overrides))
    gen.eos_ids = set()  # run to max_new_tokens: the buffer grows past its first 256 columns
    return gen.generate([PROMPT], group_size=4, seed=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_compiled_decode_equals_eager(qwen3, temperature):
    model, tok = qwen3
    shape = ("max_new_tokens=300", "segment.segment_tokens=32", f"sampling.temperature={temperature}")
    thr = median_score(model, tok, PROMPT, *shape)
    settings = (*shape, "threshold.policy=fixed", f"threshold.value={thr}")
    eager = _traces(model, tok, *settings)
    compiled = _traces(model, tok, *settings, "compile=true")
    assert sum(len(t.erasures) for t in eager) > 0  # rollbacks happen under the compiled step too
    for a, b in zip(eager, compiled):
        assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
        assert [s.decision for s in a.segments] == [s.decision for s in b.segments]
        for x, y in zip(a.tokens, b.tokens):
            assert abs(x.surprisal - y.surprisal) <= 1e-4 and abs(x.entropy - y.entropy) <= 1e-4
    assert len(compiled[0].done.token_ids) == 300


def test_no_compiler_is_a_clear_error(qwen3, monkeypatch):
    model, tok = qwen3
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"C\+\+ compiler .* drop --compile"):
        ErasableGenerator(model, tok, make_config("compile=true"))
    ErasableGenerator(model, tok, make_config())  # without --compile nothing is needed


def test_compile_flag_reaches_the_config(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    assert main(["generate", "--model", str(model_dir), "--prompt", "1+1=", "--compile"]) == 2
    assert "C++ compiler" in capsys.readouterr().err
