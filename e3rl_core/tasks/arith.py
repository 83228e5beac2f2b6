"""The synthetic reasoning task: multi-step arithmetic chains, solved one step per line.

    Question: a = 47 + 38. b = a * 3. c = b - 95. What is c?
    Answer:
    a = 47 + 38 = 85
    b = 85 * 3 = 255
    c = 255 - 95 = 160
    \\boxed{160}

Every step needs the previous result, so one arithmetic slip ruins everything after it: the
autoregressive cascade in miniature. Difficulty d (1..5) sets the number of steps (d + 1) and the
operand size (up to 9, 9, 20, 50, 99; multipliers 2..2+d//2). Problems are procedural and seeded.

Train and test are disjoint by construction: a problem belongs to the test split exactly when the
SHA-256 of its question text falls in the first fifth of the hash range, and each split's sampler
rejects the other's problems. The same question can therefore never appear in both.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

NAMES = "abcdefgh"
LEVELS = (1, 2, 3, 4, 5)
TEST_FRACTION = 0.2
PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
    solution: str
    difficulty: int

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(question=self.question)


def split_of(question: str) -> str:
    digest = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    return "test" if digest < TEST_FRACTION * 2**64 else "train"


def _operand(rng: random.Random, difficulty: int, op: str) -> int:
    if op == "*":
        return rng.randint(2, 2 + difficulty // 2)  # small multipliers keep values readable
    hi = (9, 9, 20, 50, 99)[difficulty - 1]
    return rng.randint(1, hi)


def make_problem(rng: random.Random, difficulty: int) -> Problem:
    """One chain of ``difficulty + 1`` steps; values stay non-negative and below 10^3."""
    if difficulty not in LEVELS:
        raise ValueError(f"difficulty must be one of {LEVELS}, got {difficulty}")
    steps = difficulty + 1
    statements, lines = [], []
    value = None
    for i in range(steps):
        name = NAMES[i]
        if value is None:
            x, y = _operand(rng, difficulty, "+"), _operand(rng, difficulty, "+")
            op = rng.choice("+-")
            if op == "-" and y > x:
                x, y = y, x
            left, shown = str(x), str(x)
        else:
            op = rng.choice("+-*") if value < 100 else rng.choice("+-")
            y = _operand(rng, difficulty, op)
            if op == "-" and y > value:
                op = "+"
            x, left, shown = value, NAMES[i - 1], str(value)
        result = {"+": x + y, "-": x - y, "*": x * y}[op]
        statements.append(f"{name} = {left} {op} {y}.")
        lines.append(f"{name} = {shown} {op} {y} = {result}")
        value = result
    question = " ".join(statements) + f" What is {NAMES[steps - 1]}?"
    solution = "\n".join(lines) + f"\n\\boxed{{{value}}}"
    pid = hashlib.sha256(question.encode()).hexdigest()[:12]
    return Problem(id=pid, question=question, answer=str(value), solution=solution, difficulty=difficulty)


def problems(split: str, n: int, *, seed: int = 0, difficulty: int | None = None) -> list[Problem]:
    """``n`` distinct problems of one split; ``difficulty`` None mixes the levels evenly."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{split}-{seed}-{difficulty}")
    out: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {split} problems at difficulty {difficulty}")
        d = difficulty if difficulty is not None else LEVELS[len(out) % len(LEVELS)]
        p = make_problem(rng, d)
        if split_of(p.question) != split or p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


_STATEMENT = re.compile(r"([a-h]) = (\d+|[a-h]) ([+\-*]) (\d+)\.")
_QUESTION = re.compile(r"Question: ((?:[a-h] = (?:\d+|[a-h]) [+\-*] \d+\. )+)What is ([a-h])\?\nAnswer:\n$")


def solve(prompt: str) -> Problem | None:
    """The problem a prompt of this task asks (answer and one-step-per-line reference solution,
    worked out from the question's own statements), or None when the prompt is not one: the
    decision-effect audit reads slips off it without a dataset file."""
    m = _QUESTION.search(prompt)
    if m is None:
        return None
    values: dict[str, int] = {}
    lines = []
    for name, left, op, right in _STATEMENT.findall(m.group(1)):
        if not left.isdigit() and left not in values:
            return None
        x = int(left) if left.isdigit() else values[left]
        values[name] = {"+": x + int(right), "-": x - int(right), "*": x * int(right)}[op]
        lines.append(f"{name} = {x} {op} {right} = {values[name]}")
    target = m.group(2)
    if target not in values:
        return None
    question = m.group(1) + f"What is {target}?"
    answer = str(values[target])
    solution = "\n".join(lines) + f"\n\\boxed{{{answer}}}"
    return Problem(id=hashlib.sha256(question.encode()).hexdigest()[:12], question=question, answer=answer,
                   solution=solution, difficulty=max(1, len(lines) - 1))
