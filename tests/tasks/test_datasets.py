"""Dataset specs: every published schema from small fixture files, filters, limits, the synthetic
task, prompt rendering, and one helpful DataError per failure."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from e3rl_core.errors import E3RLError
from e3rl_core.models import char_tokenizer
from e3rl_core.tasks.arith import PROMPT_TEMPLATE
from e3rl_core.tasks.datasets import DataError, Example, load_examples, parse_spec, render_prompt

DEEPMATH_ROWS = [
    {"question": "Compute 2+2.", "final_answer": "4", "difficulty": 1.0, "topic": "Mathematics -> Algebra -> Prealgebra",
     "r1_solution_1": "2+2=4. \\boxed{4}", "r1_solution_2": "s2", "r1_solution_3": "s3"},
    {"question": "Find the integral of x from 0 to 1.", "final_answer": "\\frac{1}{2}", "difficulty": 5.5,
     "topic": "Mathematics -> Calculus -> Integral Calculus", "r1_solution_1": "x^2/2 ... \\boxed{1/2}",
     "r1_solution_2": "t2", "r1_solution_3": "t3"},
    {"question": "How many primes are below 10?", "final_answer": "4", "difficulty": 3.0,
     "topic": "Mathematics -> Number Theory -> Prime Numbers", "r1_solution_1": "2,3,5,7",
     "r1_solution_2": "u2", "r1_solution_3": "u3"},
    {"question": "Evaluate the limit of sin(x)/x at 0.", "final_answer": "1", "difficulty": 7.0,
     "topic": "Mathematics -> Calculus -> Differential Calculus -> Limits", "r1_solution_1": "L'Hopital",
     "r1_solution_2": "v2", "r1_solution_3": "v3"},
]
AIME_ROWS = [
    {"id": "2024-I-1", "problem": "Find the remainder when 2^10 is divided by 7.", "answer": 2,
     "solution": "1024 = 7*146 + 2", "year": 2024},
    {"id": "2024-I-2", "problem": "What is 12 * 12?", "answer": 144, "solution": "144", "year": 2024},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(params=["parquet", "jsonl"])
def deepmath_file(request, tmp_path):
    path = tmp_path / f"deepmath.{request.param}"
    if request.param == "parquet":
        pd.DataFrame(DEEPMATH_ROWS).to_parquet(path)
        return path
    return write_jsonl(path, DEEPMATH_ROWS)


@pytest.fixture(params=["parquet", "jsonl"])
def aime_file(request, tmp_path):
    path = tmp_path / f"aime.{request.param}"
    if request.param == "parquet":
        pd.DataFrame(AIME_ROWS).to_parquet(path)
        return path
    return write_jsonl(path, AIME_ROWS)


# ------------------------------------------------------------------------------ published schemas

def test_deepmath_fields(deepmath_file):
    examples = load_examples(f"deepmath:{deepmath_file}")
    assert [e.question for e in examples] == [r["question"] for r in DEEPMATH_ROWS]
    first = examples[1]
    assert isinstance(first, Example)
    assert first.answer == "\\frac{1}{2}" and first.difficulty == 5.5 and isinstance(first.difficulty, float)
    assert first.topic == "Mathematics -> Calculus -> Integral Calculus"
    assert first.solution == "x^2/2 ... \\boxed{1/2}"  # r1_solution_1
    assert first.meta == {"r1_solution_2": "t2", "r1_solution_3": "t3"}
    assert len({e.id for e in examples}) == len(examples)


def test_deepmath_difficulty_range_is_inclusive(deepmath_file):
    examples = load_examples(f"deepmath:{deepmath_file}?difficulty_min=3&difficulty_max=5.5")
    assert sorted(e.difficulty for e in examples) == [3.0, 5.5]


def test_deepmath_topic_is_a_case_insensitive_substring(deepmath_file):
    examples = load_examples(f"deepmath:{deepmath_file}?topic=CALCULUS")
    assert [e.answer for e in examples] == ["\\frac{1}{2}", "1"]
    both = load_examples(f"deepmath:{deepmath_file}?topic=number+theory&difficulty_max=3")  # + is a space
    assert [e.question for e in both] == ["How many primes are below 10?"]


def test_aime_fields(aime_file):
    examples = load_examples(f"aime:{aime_file}")
    assert [e.id for e in examples] == ["2024-I-1", "2024-I-2"]
    assert examples[0].question.startswith("Find the remainder")
    assert examples[0].answer == "2" and examples[1].answer == "144"  # integer answers become strings
    assert examples[0].solution == "1024 = 7*146 + 2" and examples[0].meta == {"year": 2024}


def test_aime_without_optional_columns(tmp_path):
    path = write_jsonl(tmp_path / "aime.jsonl", [{"problem": "p1", "answer": "7"}, {"problem": "p2", "answer": "8"}])
    examples = load_examples(f"aime:{path}")
    assert [(e.id, e.answer, e.solution, e.meta) for e in examples] == [("aime-0", "7", None, {}), ("aime-1", "8", None, {})]


def test_generic_jsonl_with_custom_columns(tmp_path):
    rows = [{"uid": "a", "prompt": "What is 1+1?", "target": 2, "source": "toy"},
            {"uid": "b", "prompt": "What is 2+3?", "target": 5, "source": "toy"}]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    examples = load_examples(f"jsonl:{path}?question=prompt&answer=target&id=uid")
    assert [(e.id, e.question, e.answer) for e in examples] == [("a", "What is 1+1?", "2"), ("b", "What is 2+3?", "5")]
    assert examples[0].meta == {"source": "toy"}  # extra columns are kept


def test_generic_parquet_without_gold(tmp_path):
    path = tmp_path / "q.parquet"
    pd.DataFrame({"question": ["q1", "q2", "q3"]}).to_parquet(path)
    examples = load_examples(f"parquet:{path}?answer=")
    assert [e.question for e in examples] == ["q1", "q2", "q3"]
    assert all(e.answer is None for e in examples)
    assert len({e.id for e in examples}) == 3  # ids from the question hash when there is no id column


def test_limit_works_for_every_kind(deepmath_file, aime_file, tmp_path):
    generic = write_jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(5)])
    specs = [f"deepmath:{deepmath_file}?limit=2", f"aime:{aime_file}?limit=1", f"jsonl:{generic}?limit=3",
             "synthetic:train?n=10&limit=4"]
    assert [len(load_examples(s)) for s in specs] == [2, 1, 3, 4]
    assert [e.answer for e in load_examples(f"jsonl:{generic}?limit=3")] == ["0", "1", "2"]  # the first N


def test_local_directory_reads_the_requested_split(tmp_path):
    # the layout of a hub snapshot: data/<split>-NNNNN-of-NNNNN.parquet
    (tmp_path / "data").mkdir()
    pd.DataFrame(DEEPMATH_ROWS[:2]).to_parquet(tmp_path / "data" / "train-00000-of-00002.parquet")
    write_jsonl(tmp_path / "data" / "train-00001-of-00002.jsonl", DEEPMATH_ROWS[2:3])
    pd.DataFrame(DEEPMATH_ROWS[3:]).to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    assert len(load_examples(f"deepmath:{tmp_path}")) == 3
    assert [e.answer for e in load_examples(f"deepmath:{tmp_path}?split=test")] == ["1"]
    with pytest.raises(DataError, match=r"no \.parquet/\.jsonl files of split 'validation'.*pass split=<name>"):
        load_examples(f"deepmath:{tmp_path}?split=validation")


# ------------------------------------------------------------------------------ synthetic task

def test_synthetic_defaults_and_fields():
    examples = load_examples("synthetic:train")
    assert len(examples) == 200
    assert {e.difficulty for e in examples} == {1.0, 2.0, 3.0, 4.0, 5.0}  # mixed by default
    e = examples[0]
    assert e.answer and e.solution.endswith(f"\\boxed{{{e.answer}}}") and e.topic == "arithmetic"


def test_synthetic_train_and_test_are_disjoint():
    train = load_examples("synthetic:train?n=300")
    test = load_examples("synthetic:test?n=100")
    assert not {e.question for e in train} & {e.question for e in test}


def test_synthetic_difficulty_and_seed():
    hard = load_examples("synthetic:test?difficulty=3&n=20&seed=1")
    assert len(hard) == 20 and {e.difficulty for e in hard} == {3.0}
    assert all(e.question.count("=") == 4 for e in hard)  # difficulty 3 -> 4 steps
    assert [e.id for e in load_examples("synthetic:test?difficulty=3&n=20&seed=1")] == [e.id for e in hard]
    assert [e.id for e in load_examples("synthetic:test?difficulty=3&n=20&seed=2")] != [e.id for e in hard]


# ------------------------------------------------------------------------------ prompts

def test_render_prompt_plain_template_without_chat_template():
    tok = char_tokenizer()
    assert not getattr(tok, "chat_template", None)
    assert render_prompt("What is 1+1?", tok) == PROMPT_TEMPLATE.format(question="What is 1+1?")
    assert render_prompt("What is 1+1?") == "Question: What is 1+1?\nAnswer:\n"


def test_render_prompt_uses_the_chat_template():
    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert render_prompt("What is 1+1?", tok, user_template="{question}") == "<|user|>What is 1+1?\n<|assistant|>"
    # by default the user turn carries the step-by-step / \boxed{} instruction (tests/tasks/test_reasoning_io.py)
    assert render_prompt("What is 1+1?", tok) == (
        "<|user|>What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.\n<|assistant|>")


# ------------------------------------------------------------------------------ errors

def test_parse_spec():
    assert parse_spec("jsonl:/a/b.jsonl?question=q&answer=") == ("jsonl", "/a/b.jsonl", {"question": "q", "answer": ""})


@pytest.mark.parametrize("spec, match", [
    ("no-colon-here", r"expected KIND:LOCATION"),
    (":/x.jsonl", r"KIND and LOCATION must be non-empty"),
    ("synthetic:", r"KIND and LOCATION must be non-empty"),
    ("synthetic:train?n", r"options must be key=value joined by &"),
    ("synthetic:train?n=1&n=2", r"'n' is given twice"),
    ("synthetic:train?n=abc", r"n='abc' must be an integer >= 1"),
    ("synthetic:train?limit=0", r"limit='0' must be an integer >= 1"),
    ("synthetic:train?difficulty=9", r"choose one of \[1, 2, 3, 4, 5\]"),
    ("synthetic:valid", r"must be train or test"),
    ("synthetic:train?difficulty_min=3", r"unknown option\(s\) difficulty_min.*valid: difficulty, limit, n, seed"),
    ("deepmath:/nonexistent/x.parquet?difficulty_min=hard", r"difficulty_min='hard' must be a number"),  # before reading
])
def test_malformed_spec(spec, match):
    with pytest.raises(DataError, match=match):
        load_examples(spec)


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(DataError, match=r"unknown dataset kind 'csv'.*choose one of: aime, deepmath, jsonl, parquet, synthetic"):
        load_examples("csv:/tmp/x.csv")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"no such file: .*nope\.parquet; pass an existing \.parquet or \.jsonl file"):
        load_examples(f"deepmath:{tmp_path / 'nope.parquet'}")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_text("this is not parquet")
    with pytest.raises(DataError, match=r"is not a readable parquet file.*re-export it"):
        load_examples(f"deepmath:{path}")


def test_bad_json_line_reports_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(AIME_ROWS[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"line 3 is not valid JSON.*fix or remove that line"):
        load_examples(f"aime:{path}")
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"line 1 is not a JSON object"):
        load_examples(f"jsonl:{path}")


def test_missing_columns_lists_found_and_expected(tmp_path):
    path = write_jsonl(tmp_path / "wrong.jsonl", [{"problem": "p", "answer": "1"}])
    with pytest.raises(DataError, match=r"lacks column\(s\) \['question', 'final_answer'\]; "
                                        r"found columns \['answer', 'problem'\]; expected \['question', 'final_answer'"):
        load_examples(f"deepmath:{path}")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['target'\]; found columns \['answer', 'problem'\]"):
        load_examples(f"jsonl:{path}?question=problem&answer=target")


def test_blank_question_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"question": "q", "answer": "1"}, {"question": None, "answer": "2"}])
    with pytest.raises(DataError, match=r"row 2 has no 'question'"):
        load_examples(f"jsonl:{path}")


def test_empty_after_filtering_names_the_filters(deepmath_file):
    with pytest.raises(DataError, match=r"pass the filters difficulty_min=9&topic=geometry \(4 rows before filtering\); loosen them"):
        load_examples(f"deepmath:{deepmath_file}?difficulty_min=9&topic=geometry")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"is empty; point it at a file with rows"):
        load_examples(f"jsonl:{path}")


def test_hub_id_offline_says_to_pass_a_local_file(tmp_path, monkeypatch):
    # offline mode and an empty cache guarantee no download, whatever network this machine has
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(DataError, match=r"hub could not be reached.*pass a local file instead") as info:
        load_examples("deepmath:no-such-org/no-such-dataset")
    assert isinstance(info.value, E3RLError) and isinstance(info.value, ValueError)


def test_a_named_directory_is_searched_itself_never_walked(tmp_path, caplog):
    """``aime:/`` used to walk the whole disk and parse whatever ``*train*.jsonl`` it met first: a
    named folder is searched itself (and its hub-style data/ folder), no deeper, and the files read
    are logged."""
    deep = tmp_path / "projects" / "other"
    deep.mkdir(parents=True)
    write_jsonl(deep / "train.jsonl", DEEPMATH_ROWS[:1])
    with pytest.raises(DataError, match="no .parquet/.jsonl files of split 'train'"):
        load_examples(f"deepmath:{tmp_path}")
    write_jsonl(tmp_path / "train.jsonl", DEEPMATH_ROWS[1:3])
    with caplog.at_level("INFO", logger="e3rl_core.tasks.datasets"):
        assert len(load_examples(f"deepmath:{tmp_path}")) == 2
    assert str(tmp_path / "train.jsonl") in caplog.text and "other" not in caplog.text


def test_the_command_line_says_which_files_a_folder_spec_read(tmp_path, capsys):
    from e3rl_core.cli import main

    write_jsonl(tmp_path / "train.jsonl", DEEPMATH_ROWS[:2])
    model = str(Path(__file__).resolve().parents[2] / "checkpoints" / "arith-demo")
    main(["eval", "--model", model, "--data", f"deepmath:{tmp_path}", "--samples", "1", "--max-new-tokens", "8"])
    assert f"[e3rl] dataset {tmp_path}: reading {tmp_path / 'train.jsonl'}" in capsys.readouterr().err
