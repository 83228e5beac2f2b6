"""Hostile and careless input to configs, traces and `e3rl eval` / `e3rl generate` outputs:
non-finite settings are refused naming the field, trace JSON stays strict, a prompt longer than the
model's context does not stop an evaluation, and a bad output path fails before any work."""
from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest

from e3rl_core.cli import main
from e3rl_core.cli.eval import _write_rows
from e3rl_core.errors import ConfigError, E3RLError
from e3rl_core.events import SegmentEvent, TokenEvent, read_events, write_events
from e3rl_core.generation import config as gencfg
from e3rl_core.models import save_random_model
from e3rl_core.overrides import apply_overrides
from e3rl_core.training.config import TrainConfig
from e3rl_core.training.sft import DemoModelConfig

BAD = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _float_fields(cls: type) -> list[tuple[str, bool]]:
    """(name, is_tuple) of every field of ``cls`` typed float, float | None or tuple[float, ...]."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        if hint is float or float in args and typing.get_origin(hint) is not tuple:
            out.append((name, False))
        elif typing.get_origin(hint) is tuple and args and args[0] is float:
            out.append((name, True))
    return out


def _cases() -> list[tuple[type, str, str, bool]]:
    """(config class, field, the name a message gives it, is_tuple) for every float config field."""
    cases = []
    for section, cls in typing.get_type_hints(gencfg.GenerationConfig).items():
        if dataclasses.is_dataclass(cls):
            cases += [(cls, name, f"{section}.{name}", tup) for name, tup in _float_fields(cls)]
    for cls in (TrainConfig, DemoModelConfig):
        cases += [(cls, name, name, tup) for name, tup in _float_fields(cls)]
    return cases


CASES = _cases()


def test_the_float_fields_are_found():
    names = {label for _, _, label, _ in CASES}
    assert {"sampling.temperature", "threshold.kappa", "threshold.value", "threshold.history_clip",
            "erase.compact_ratio", "learning_rate", "temperature", "grad_clip", "difficulty_weights"} <= names


@pytest.mark.parametrize("text", list(BAD))
@pytest.mark.parametrize("cls,name,label,is_tuple", CASES, ids=[c[2] + "@" + c[0].__name__ for c in CASES])
def test_every_float_field_refuses_non_finite_values_built_directly(cls, name, label, is_tuple, text):
    value = (BAD[text], 1.0) if is_tuple else BAD[text]
    with pytest.raises(ConfigError) as err:
        cls(**{name: value})
    message = str(err.value)
    assert label in message and "finite" in message and "\n" not in message


@pytest.mark.parametrize("text", list(BAD))
@pytest.mark.parametrize("cls,name,label,is_tuple", CASES, ids=[c[2] + "@" + c[0].__name__ for c in CASES])
def test_every_float_field_refuses_non_finite_values_from_set(cls, name, label, is_tuple, text):
    """Through --set, on the config the field lives in (a generation section through GenerationConfig)."""
    root, key = (cls, name) if cls in (TrainConfig, DemoModelConfig) else (gencfg.GenerationConfig, label)
    value = f"0.9,{text}" if is_tuple else text
    with pytest.raises(ConfigError, match=rf"{label} must be a finite number"):
        apply_overrides(root(), [f"{key}={value}"])


def test_nested_train_generation_field_is_refused():
    with pytest.raises(ConfigError, match="threshold.kappa must be a finite number"):
        apply_overrides(TrainConfig(), ["generation.threshold.kappa=nan"])


@pytest.mark.parametrize("flags,field", [
    (["--set", "threshold.kappa=nan"], "threshold.kappa"),
    (["--threshold", "nan"], "threshold.value"),
    (["--temperature", "inf"], "sampling.temperature"),
    (["--top-p", "nan"], "sampling.top_p"),
])
def test_generate_refuses_non_finite_flags_before_writing(model_dir, tmp_path, capsys, flags, field):
    trace = tmp_path / "t.jsonl"
    code = main(["generate", "--model", str(model_dir), "--prompt", "1 + 1 = ", "--max-new-tokens", "8",
                 "--trace-out", str(trace), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not trace.exists()
    assert err.count("\n") == 0 and f"{field} must be a finite number" in err


# ------------------------------------------------------------------ strict JSON traces
def _strict(line: str) -> dict:
    """json.loads as any RFC 8259 parser reads: bare NaN / Infinity are an error."""
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(line, parse_constant=refuse)


def test_non_finite_signals_are_written_as_strict_json_and_read_back(tmp_path):
    events = [
        TokenEvent(trace_id="t", step=0, token_id=5, text="NaN", entropy=math.nan, surprisal=math.inf,
                   segment=0, attempt=0, top=[[5, "Infinity", 0.5], [6, "x", math.nan]]),
        SegmentEvent(trace_id="t", segment=0, attempt=0, start=0, end=1, score=math.inf,
                     features={"base": -math.inf, "max": math.inf, "delta": 0.25}, baseline=math.nan,
                     penalty=1.0, history=1.0, threshold=None, decision="accept", reason="no_threshold"),
    ]
    path = tmp_path / "t.jsonl"
    write_events(events, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    raw = [_strict(line) for line in lines]  # raises on a bare NaN/Infinity
    assert raw[0]["surprisal"] == "Infinity" and raw[0]["entropy"] == "NaN"
    assert raw[1]["threshold"] is None  # null keeps meaning "no threshold"
    token, segment = read_events(path)
    assert token.text == "NaN" and token.top[0][1] == "Infinity"  # texts stay texts
    assert token.surprisal == math.inf and math.isnan(token.entropy) and math.isnan(token.top[1][2])
    assert segment.score == math.inf and segment.features == {"base": -math.inf, "max": math.inf, "delta": 0.25}
    assert math.isnan(segment.baseline) and segment.threshold is None


def test_a_trace_with_a_bare_nan_written_before_still_loads(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text('{"event": "token", "trace_id": "t", "step": 0, "token_id": 1, "text": "a", '
                    '"entropy": NaN, "surprisal": Infinity, "segment": 0, "attempt": 0}\n')
    (token,) = read_events(path)
    assert math.isnan(token.entropy) and token.surprisal == math.inf


# ------------------------------------------------------------------ e3rl eval
def _aime(tmp_path, long_chars: int):
    rows = [{"problem": "What is 2 + 3?", "answer": "5", "id": "short1"},
            {"problem": "What is 7 + 8? " + "x" * long_chars, "answer": "15", "id": "long1"},
            {"problem": "What is 4 * 2?", "answer": "8", "id": "short2"}]
    path = tmp_path / "aime.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """A tiny model whose context (96 positions) a long problem exceeds."""
    return save_random_model(tmp_path_factory.mktemp("short") / "m", "tiny-llama", init_std=0.3, seed=1,
                             max_positions=96)


def _eval(model, data, tmp_path, *extra):
    out = tmp_path / "rows.jsonl"
    return main(["eval", "--model", str(model), "--data", f"aime:{data}", "--samples", "2",
                 "--max-new-tokens", "8", "--out", str(out), "--json", *extra]), out


def test_eval_skips_prompts_longer_than_the_context(short_context_model, tmp_path, capsys):
    code, out = _eval(short_context_model, _aime(tmp_path, 200), tmp_path)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["overlong"] == 1 and summary["n_problems"] == 2
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1 of 3" in warnings[0] and "96 tokens" in warnings[0]
    rows = [_strict(line) for line in out.read_text().splitlines()]
    assert sorted({r["problem_id"] for r in rows}) == ["short1", "short2"] and len(rows) == 4


def test_eval_overlong_fail_scores_them_as_wrong(short_context_model, tmp_path, capsys):
    code, out = _eval(short_context_model, _aime(tmp_path, 200), tmp_path, "--overlong", "fail")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    rows = [_strict(line) for line in out.read_text().splitlines()]
    long_rows = [r for r in rows if r["problem_id"] == "long1"]
    assert summary["overlong"] == 1 and summary["n_problems"] == 3 and len(rows) == 6
    assert len(long_rows) == 2 and not any(r["correct"] for r in long_rows)
    assert {r["finish_reason"] for r in long_rows} == {"prompt_too_long"}
    assert summary["avg_at_k"] == pytest.approx(sum(r["correct"] for r in rows) / 6)
    ran = [r for r in rows if r["problem_id"] != "long1"]  # token figures: the rows that generated
    assert summary["mean_tokens_generated"] == pytest.approx(sum(r["tokens_generated"] for r in ran) / 4)


def test_eval_with_every_prompt_too_long_says_so(short_context_model, tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"problem": "y" * 300, "answer": "1"}) + "\n")
    code, out = _eval(short_context_model, path, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "fits the model's context (96 tokens)" in err[-1] and not out.exists()


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: what is checked here must be checked before any work."""
    import e3rl_core.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad argument was reported")
    monkeypatch.setattr(e3rl_core.models, "load_model", refuse)


def test_eval_limit_zero_is_refused(model_dir, capsys, no_model_load):
    code = main(["eval", "--model", str(model_dir), "--data", "synthetic:test?n=4", "--limit", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --limit must be >= 1") and "\n" not in err


@pytest.mark.parametrize("flag", ["--out", "--traces-out"])
def test_eval_output_that_is_a_directory_fails_before_any_work(model_dir, tmp_path, capsys, no_model_load, flag):
    target = tmp_path / "d"
    target.mkdir()
    code = main(["eval", "--model", str(model_dir), "--data", "synthetic:test?n=2", flag, str(target)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{flag} {target} is a directory" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and not any(target.iterdir())  # no stray .tmp


def test_eval_out_and_traces_out_must_differ(model_dir, tmp_path, capsys, no_model_load):
    same = str(tmp_path / "x.jsonl")
    code = main(["eval", "--model", str(model_dir), "--data", "synthetic:test?n=2", "--out", same,
                 "--traces-out", same])
    assert code == 2 and "same file" in capsys.readouterr().err


def test_eval_out_below_a_file_fails_before_any_work(model_dir, tmp_path, capsys, no_model_load):
    (tmp_path / "f").write_text("keep me")
    code = main(["eval", "--model", str(model_dir), "--data", "synthetic:test?n=2",
                 "--out", str(tmp_path / "f" / "rows.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is a file, not a directory" in err and "\n" not in err
    assert (tmp_path / "f").read_text() == "keep me"


def test_rows_that_cannot_be_written_leave_no_tmp_file(tmp_path):
    target = tmp_path / "rows.jsonl"
    target.mkdir()  # became a directory while the evaluation ran
    with pytest.raises(E3RLError, match="cannot write --out"):
        _write_rows(target, [{"problem_id": "p", "correct": True}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_eval_out_parent_is_created(model_dir, tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "rows.jsonl"
    code = main(["eval", "--model", str(model_dir), "--data", "synthetic:test?n=1", "--max-new-tokens", "4",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 1 and sorted(p.name for p in out.parent.iterdir()) == ["rows.jsonl"]


# ------------------------------------------------------------------ e3rl generate --trace-out
@pytest.mark.parametrize("where", ["directory", "below a file"])
def test_generate_unwritable_trace_out_is_one_line_before_any_work(model_dir, tmp_path, capsys, no_model_load, where):
    if where == "directory":
        target = tmp_path / "d"
        target.mkdir()
        expected = "is a directory"
    else:
        (tmp_path / "f").write_text("")
        target = tmp_path / "f" / "t.jsonl"
        expected = "is a file, not a directory"
    code = main(["generate", "--model", str(model_dir), "--prompt", "1 + 1 = ", "--trace-out", str(target)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and expected in err and "--trace-out" in err and "\n" not in err
