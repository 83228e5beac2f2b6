"""Answer extraction and math-verify answer checking (e3rl_core.tasks.rewards)."""
from __future__ import annotations

import multiprocessing
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from e3rl_core.tasks import rewards
from e3rl_core.tasks.rewards import extract_answer, is_correct, last_boxed, reward

# (gold, the completion's final answer): equivalent.
CORRECT = [
    ("42", "42"),
    ("1000", "1,000"),  # thousands separators
    ("1,000", "1000"),
    ("1234567", "1,234,567"),
    ("1000", "1\\,000"),  # LaTeX thin space
    ("1000", "1{,}000"),
    ("5", "+5"),  # leading "+"
    ("5", "5."),  # trailing full stop
    ("1000", "1e3"),
    ("0.5", "\\frac{1}{2}"),  # decimals vs fractions
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "1/2"),
    ("\\frac{3}{4}", "\\dfrac{3}{4}"),  # LaTeX variants
    ("\\frac{3}{4}", "\\tfrac{6}{8}"),
    ("(1,2)", "\\left(1,2\\right)"),
    ("(1, 2)", "(1,2)"),
    ("3", "$3$"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("\\{1,2,3\\}", "\\{3,1,2\\}"),  # sets in either order
    ("1,2", "2,1"),  # a bare list is read as a set
    ("x^2+2x+1", "(x+1)^2"),  # symbolic equivalence
    ("(x+1)^2", "x^2+2x+1"),
    ("2x+3", "3+2x"),
    ("\\frac{1}{x}", "x^{-1}"),
    ("1", "\\sin^2 x+\\cos^2 x"),
    ("2\\pi", "6.283185"),  # numeric, to math-verify's 6 decimal places
    ("1024", "2^{10}"),
    ("1024", "2**10"),  # not LaTeX: math-verify's expression parser
    ("-3", "- 3"),
    ("3", "x=3"),  # math-verify takes the right-hand side of a final equation
    ("\\text{(B)}", "B"),
    ("yes", "\\text{Yes}"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
]

# (gold, the completion's final answer): not equivalent.
INCORRECT = [
    ("42", "24"),
    ("\\frac{1}{3}", "0.33"),
    ("1,000", "1"),
    ("1000", "10000"),
    ("2", "-2"),
    ("0.5", "\\frac{1}{3}"),
    ("(1,2)", "(2,1)"),  # tuples are ordered
    ("[1,2]", "[1,2)"),
    ("\\{1,2\\}", "\\{1,2,3\\}"),
    ("x^2+2x+1", "(x-1)^2"),
    ("2x+3", "3x+2"),
    ("yes", "sey"),  # words, not products of symbols
    ("5", "five apples and }{"),
]


def _completions(answer: str) -> list[str]:
    """The same final answer written the ways a model writes it."""
    return [
        f"Adding them up, the total is \\boxed{{{answer}}}.",
        f"Working...\nAnswer: {answer}",
        f"First I guessed \\boxed{{0}}, but then: $\\boxed{{{answer}}}$",
    ]


@pytest.mark.parametrize(("gold", "answer"), CORRECT)
def test_equivalent_answers_are_correct(gold: str, answer: str) -> None:
    for completion in _completions(answer):
        assert is_correct(completion, gold) is True, completion


@pytest.mark.parametrize(("gold", "answer"), INCORRECT)
def test_different_answers_are_incorrect(gold: str, answer: str) -> None:
    for completion in _completions(answer):
        assert is_correct(completion, gold) is False, completion


def test_no_answer_or_no_gold_is_incorrect() -> None:
    assert is_correct("I could not solve it.", "5") is False
    assert is_correct("\\boxed{}", "5") is False
    assert is_correct("\\boxed{5}", "") is False
    assert is_correct(None, "5") is False  # type: ignore[arg-type]
    assert is_correct("\\boxed{5}", None) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\left\\{ \\frac{a}{b}, {c} \\right\\}}", "\\left\\{ \\frac{a}{b}, {c} \\right\\}"),
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last one
        ("\\fbox{7}", "7"),
        ("\\boxed {  8 }", "8"),  # space before the brace, content stripped
        ("\\boxed{3} and finally \\boxed{4", "3"),  # an unclosed last box is skipped
        ("Answer: 12.", "12"),  # "Answer:" fallback, full stop dropped
        ("answer = 5\nmore text\nFinal answer: 6", "6"),  # the last marker line
        ("Answer: 1\n\\boxed{2}", "2"),  # a box wins over the marker
        ("no answer here", None),
        ("\\boxed{", None),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


def _last_boxed_reference(text: str) -> str | None:
    """The original (quadratic in the worst case) last_boxed, to check the linear one against."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    while start != -1:
        brace = text.find("{", start)
        if brace != -1 and text[start:brace].strip() in ("\\boxed", "\\fbox"):
            depth = 0
            for i in range(brace, len(text)):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[brace + 1 : i].strip()
        start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
    return None


def test_last_boxed_matches_the_original_algorithm() -> None:
    pieces = ["\\boxed", "\\fbox", "\\boxedx", "{", "}", "{", "}", " ", "\n", "x", "1", "\\frac"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert last_boxed(text) == _last_boxed_reference(text), repr(text)


def _check_in_thread(results: list, gold: str, answer: str) -> None:
    results.append(is_correct(f"\\boxed{{{answer}}}", gold))


def test_works_from_a_plain_thread() -> None:
    from math_verify import parse

    # Sanity: math-verify's own signal-based timeout does fail off the main thread.
    errors: list[BaseException] = []

    def use_signals() -> None:
        try:
            parse("$1$")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=use_signals)
    t.start()
    t.join()
    assert errors and isinstance(errors[0], ValueError)

    results: list[bool] = []
    threads = [
        threading.Thread(target=_check_in_thread, args=(results, gold, answer))
        for gold, answer in [("0.5", "\\frac{1}{2}"), ("(x+1)^2", "x^2+2x+1"), ("42", "24")]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [False, True, True]


def test_works_from_a_thread_pool() -> None:
    cases = [(gold, answer, True) for gold, answer in CORRECT] + [(g, a, False) for g, a in INCORRECT]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda c: is_correct(f"\\boxed{{{c[1]}}}", c[0]), cases * 2))
    assert got == [expected for _, _, expected in cases * 2]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda g: reward("\\boxed{1/2}", g), ["0.5", None, "}{", "3"]))
    assert got == [1.0, None, None, 0.0]


def test_a_stuck_check_times_out_as_false(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def stuck(gold: str, pred: str) -> bool:
        release.wait(60)
        return True

    monkeypatch.setattr(rewards, "_equivalent", stuck)
    try:
        start = time.monotonic()
        assert is_correct("\\boxed{x+1}", "1+x", timeout=0.3) is False
        assert time.monotonic() - start < 10
    finally:
        release.set()  # let the abandoned worker finish
    monkeypatch.undo()
    assert is_correct("\\boxed{x+1}", "1+x") is True  # the pool still works


def _check_in_child(results: multiprocessing.Queue) -> None:
    results.put(is_correct("\\boxed{x^{-1}}", "\\frac{1}{x}"))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_works_in_a_forked_child_after_the_parent_used_the_pool() -> None:
    for _ in range(rewards._POOL_SIZE):  # each check through the pool starts a worker, up to the size
        assert is_correct("\\boxed{(x+1)^2}", "x^2+2x+1") is True
    assert rewards._started >= rewards._POOL_SIZE  # so a child that kept the count would start none
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_check_in_child, args=(results,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert results.get(timeout=5) is True  # the child started its own workers


ADVERSARIAL = [
    "",
    "x" * 1_000_000,
    "\\boxed{" * 150_000,  # quadratic for a naive last-box search
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_001,  # 10k levels of nesting, closed
    "\\boxed{" + "{" * 10_000,  # unclosed
    "{" * 10_000 + "}" * 10_000,
    "\\boxed{" + "\\frac{" * 60 + "1" + "}" * 61,
    "\\boxed{" + "\\sqrt{" * 60 + "2" + "}" * 61,
    "\\boxed{" + "9" * 5000 + "}",
    "Answer: " + "7" * 100_000,
    "answer:" + " " * 1_000_000,
    "\x00" * 1000,
    "\\boxed{\x00\x01}",
    "日本語 \\boxed{日本} ∑∫√",
    "\ud800\\boxed{\ud800}",  # a lone surrogate
    "\\boxed{}",
    "\\boxed{\\frac{",
    "\\boxed{\\left(}",
    "\\boxed{$}",
    "Answer: }{",
    "\\boxed{\\begin{pmatrix}}",
    "\\boxed{^^^__}",
    # Gigantic integers: sympy would compute these inside C calls that hold the GIL (no timeout helps).
    "\\boxed{9^{9^{9}}}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{(10^{999})^{999}}",
    "\\boxed{2^{100000000}}",
    "\\boxed{10^-99999999}",
    "\\boxed{(10^{9})!}",
    "\\boxed{\\binom{10^9}{10^8}}",
]
GOLDS = ["5", "\\frac{1}{2}", "x^2+1", "}{", "", "9^{9^{9}}", "1" * 5000, "\\left(", "\x00", "{" * 10_000]


def test_adversarial_input_returns_a_bool_without_hanging() -> None:
    start = time.monotonic()
    for text in ADVERSARIAL:
        for gold in GOLDS:
            assert isinstance(is_correct(text, gold, timeout=2.0), bool), (text[:40], gold[:40])
            assert reward(text, gold, timeout=2.0) in (None, 0.0, 1.0), (text[:40], gold[:40])
            assert isinstance(is_correct(gold, text, timeout=2.0), bool), (gold[:40], text[:40])
    assert time.monotonic() - start < 30  # a hang guard, not a speed test


def test_adversarial_answers_compare_as_strings() -> None:
    assert is_correct("\\boxed{10^{10^{10}}}", "10^{10^{10}}") is True  # identical: no maths needed
    assert is_correct("\\boxed{9^{9^{9}}}", "5") is False
    long_number = "9" * 5000
    assert is_correct(f"\\boxed{{{long_number}}}", long_number) is True
    assert is_correct(f"\\boxed{{{long_number}8}}", long_number) is False


@pytest.mark.parametrize("gold", [None, "", "   ", "$$", "}{", "\\left(", "日本", "\x00", "{" * 10_000])
def test_reward_abstains_when_gold_cannot_be_checked(gold: str | None) -> None:
    assert reward("\\boxed{5}", gold) is None


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("\\boxed{5}", "5", 1.0),
        ("\\boxed{1000}", "1,000", 1.0),  # a plain number never abstains
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{6}", "5", 0.0),
        ("no final answer", "5", 0.0),
        ("no final answer", "\\frac{1}{2}", 0.0),
        ("\\boxed{" * 150_000, "5", 0.0),
    ],
)
def test_reward_scores(completion: str, gold: str, expected: float) -> None:
    assert reward(completion, gold) == expected
