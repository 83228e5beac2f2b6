"""Answer extraction and math-verify answer checking, safe to call from any thread.

``is_correct`` compares a completion's final answer (``extract_answer``: last ``\\boxed{}``, else an
"Answer: ..." line) with the gold answer for mathematical equivalence. ``reward`` gives 1.0 / 0.0, or
None to abstain when the gold answer cannot be checked, as TRL's reward functions may.

Reasoning models (Qwen3, DeepSeek-R1 and its distills, QwQ) think inside ``<think>...</think>`` and
answer after it. A ``\\boxed{}`` inside the think block is a tentative answer, so when a completion
has a think block only the text after the last ``</think>`` is read, and a completion that ends
still inside a think block (an opening tag with no closing one: a trace cut mid-thought) has no
answer. ``think`` chooses the tags (``THINK_TAGS`` by default; None reads the whole text);
``opened=True`` says the prompt already opened the block (DeepSeek-R1-distill templates end the
prompt with ``<think>\\n``), so the completion starts inside it; :func:`prompt_opens_think` tells.
:func:`for_prompt` binds both for the engine's ``answer_fn``/``checker`` hooks.

Why no signals: math-verify bounds its own time with ``signal.alarm``, which raises off the main thread,
so ``parse``/``verify`` run with their timeouts disabled and time is bounded here instead:
* answers over ``MAX_ANSWER_CHARS`` are compared as normalised strings only, and answers that could make
  sympy build a gigantic integer (``9^{9^{9}}``, ``(10^9)!``) never reach it: that runs inside single C
  calls holding the GIL, which no thread timeout can interrupt;
* math-verify runs on a shared pool of daemon threads and the caller waits ``timeout`` seconds
  (``Future.result(timeout=...)``), then returns False. The stray worker is abandoned, not killed (Python
  cannot kill threads): it finishes in the background and a replacement starts, up to ``_MAX_THREADS``.
  Not ``ThreadPoolExecutor``: it joins its workers at interpreter exit, so a stuck call would block exit.
Nothing here raises on any input; failures read as "not correct".
"""
from __future__ import annotations

import logging
import os
import queue
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from decimal import Decimal, InvalidOperation
from functools import lru_cache, partial

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import Basic
from sympy.matrices import MatrixBase

# We disable math-verify's timeouts on purpose; its "Timeout is disabled" warning would only be noise.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# The synthetic task's fallback marker, for completions that never write \boxed{...}.
ANSWER_MARKER = re.compile(r"(?:final answer|answer)\s*[:=]\s*([^\n]+)", re.IGNORECASE)
MAX_ANSWER_CHARS = 400  # real answers are short; longer ones are compared as strings only

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d*)?(?:[eE][+-]?\d{1,6})?\.?")
_THOUSANDS_SPACE = re.compile(r"(?<=\d)(?:\\[,!; ]|\{,\})(?=\d{3}(?!\d))")  # 1\,000 and 1{,}000
_WORD = re.compile(r"(?:\\text\{)?([A-Za-z][A-Za-z ]+)\}?")
_PLAIN_EXPR = re.compile(r"[\d\s.+\-*/^()]+")  # what ExprExtractionConfig may parse without surprises
_LATEX = [LatexExtractionConfig()]
THINK_TAGS = ("<think>", "</think>")  # Qwen3, DeepSeek-R1 and its distills, QwQ
_EXPR = [ExprExtractionConfig()]


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent or
    unclosed. Linear in the text length (one pass matches every brace), so adversarial input such as
    thousands of unclosed ``\\boxed{`` cannot make it quadratic."""
    openings = [m.end() - 1 for m in _BOXED.finditer(text)]
    if not openings:
        return None
    close_of: dict[int, int] = {}
    stack: list[int] = []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:  # a stray "}" before any "{" closes nothing
            close_of[stack.pop()] = m.start()
    for brace in reversed(openings):  # the last box that closes wins
        if brace in close_of:
            return text[brace + 1 : close_of[brace]].strip()
    return None


def prompt_opens_think(prompt: str, think: tuple[str, str] | None = THINK_TAGS) -> bool:
    """Whether a rendered prompt leaves a think block open (its last opening tag comes after its
    last closing one), so that the completion starts inside the reasoning."""
    if think is None:
        return False
    return prompt.rfind(think[0]) > prompt.rfind(think[1])


def answer_text(completion: str, think: tuple[str, str] | None = THINK_TAGS, *, opened: bool = False) -> str | None:
    """The part of a completion that may hold its final answer: all of it without a think block, the
    text after the last closing tag with one, None while the completion is still inside one."""
    if think is None:
        return completion
    start, end = think
    close = completion.rfind(end)
    if completion.rfind(start) > close:  # an opening tag after every closing one: still thinking
        return None
    if close >= 0:
        return completion[close + len(end):]
    return None if opened else completion


def extract_answer(completion: str, *, think: tuple[str, str] | None = THINK_TAGS, opened: bool = False) -> str | None:
    """The final answer of a completion: the last ``\\boxed{}``, else the last "Answer: ..." line, of
    its text after the think block (``answer_text``); None while it is still thinking."""
    text = answer_text(completion, think, opened=opened)
    if text is None:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    found = ANSWER_MARKER.findall(text)
    return found[-1].strip().rstrip(".") if found else None


def for_prompt(prompt: str = "", think: tuple[str, str] | None = THINK_TAGS) -> tuple[
        Callable[[str], str | None], Callable[[str, str], bool]]:
    """``(answer_fn, checker)`` for completions of prompts rendered like ``prompt``: ``extract_answer``
    and ``is_correct`` with the think tags bound and ``opened`` read from the prompt."""
    opened = prompt_opens_think(prompt, think)
    return (partial(extract_answer, think=think, opened=opened),
            partial(is_correct, think=think, opened=opened))


def _normalise(answer: str) -> str:
    """Whitespace collapsed, math delimiters and a final full stop removed: ``$5$.`` -> ``5``."""
    s = " ".join(answer.split())
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
            inner = s[len(left) : -len(right)].strip("$").strip()
            if "$" not in inner:  # "$a$ or $b$" is two formulas, not one
                s = inner
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return _THOUSANDS_SPACE.sub(lambda m: "," if m.group() == "{,}" else "", s)


def _number(s: str) -> Decimal | None:
    """A plain number ("+1,000", "5.", "0.5", "1e3") as an exact Decimal, else None."""
    if len(s) > MAX_ANSWER_CHARS or not any(c.isdigit() for c in s) or not _NUMBER.fullmatch(s):
        return None
    try:
        return Decimal(s.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def _group(s: str) -> str:
    """The balanced {...} or (...) group that ``s`` starts with (all of ``s`` if unclosed)."""
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch in "{(") - (ch in "})")
        if depth <= 0:
            return s[: i + 1]
    return s


def _too_costly(s: str) -> bool:
    """True when sympy might build a gigantic integer, in C calls that hold the GIL so that no thread
    timeout could interrupt them. Conservative: such answers are compared as strings."""
    if re.search(r"!|binom|choose|Gamma|factorial", s) and re.search(r"\d{5}|\^|\*|\\cdot|\\times", s):
        return True
    product = 1  # exponents multiply under nesting like (10^{999})^{999}
    for m in re.finditer(r"\^|\*\*", s):
        rest = s[m.end() :].lstrip()
        # The exponent: {...} or (...) groups, optionally after a command (\frac{a}{b}), else a number.
        exponent = re.match(r"(?:\\[A-Za-z]+\s*)?", rest).group()
        while rest[len(exponent) : len(exponent) + 1] in ("{", "("):
            exponent += _group(rest[len(exponent) :])
        exponent = exponent or re.match(r"[+-]?\s*\d+(?:\.\d*)?|.?", rest).group()
        if "^" in exponent or "**" in exponent or rest[len(exponent) :].lstrip()[:1] == "^":
            return True  # a power tower: its size is exponential in its digits
        for digits in re.findall(r"\d+", exponent):
            product *= max(int(digits), 1)
            if product > 100_000:
                return True
    return False


@lru_cache(maxsize=4096)  # gold answers repeat across the completions of one prompt
def _parse(s: str) -> tuple:
    """math-verify's parse of one answer (no signals); a tuple so that cached results stay unchanged."""
    number = _number(s)
    if number is not None and abs(number.adjusted()) <= 50:
        s = format(number, "f")  # math-verify reads 1e3 as 1*e*3 and "+5" only inside $...$
    found = parse(f"${s}$", extraction_config=_LATEX, fallback_mode="no_fallback", parsing_timeout=None)
    if not found and _PLAIN_EXPR.fullmatch(s):  # e.g. 2**10, which is not LaTeX
        found = parse(s, extraction_config=_EXPR, fallback_mode="no_fallback", parsing_timeout=None)
    return tuple(found)


def _equivalent(gold: str, pred: str) -> bool:
    gold_parsed, pred_parsed = _parse(gold), _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))


# The shared pool: daemon workers fed from a queue, started lazily (importing starts none); see the
# module docstring for why not ThreadPoolExecutor. _started only grows: workers never exit.
_JOBS: queue.SimpleQueue = queue.SimpleQueue()
_POOL_LOCK = threading.Lock()
_POOL_SIZE, _MAX_THREADS = 4, 32  # usual workers; bound on live ones, stuck ones included
_started = 0


def _reset_pool() -> None:  # a forked child inherits the counter but none of the threads
    global _JOBS, _POOL_LOCK, _started
    _JOBS, _POOL_LOCK, _started = queue.SimpleQueue(), threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool)


def _spawn_worker() -> None:  # caller holds _POOL_LOCK
    global _started
    _started += 1
    threading.Thread(target=_work, name=f"e3rl-mathverify-{_started}", daemon=True).start()


def _work() -> None:
    while True:
        future, fn, args = _JOBS.get()
        if future.set_running_or_notify_cancel():  # False: the caller gave up while it was queued
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, who reads it as "not correct"
                future.set_exception(exc)


def _run(fn: Callable, args: tuple, timeout: float) -> object:
    """fn(*args) on the pool; concurrent.futures.TimeoutError after ``timeout`` seconds."""
    with _POOL_LOCK:
        if _started < _POOL_SIZE:
            _spawn_worker()
    future: Future = Future()
    _JOBS.put((future, fn, args))
    try:
        return future.result(timeout=max(timeout, 0.0))
    except FutureTimeout:
        if not future.cancel():  # it is running, so its worker is stuck: replace it, within the bound
            with _POOL_LOCK:
                if _started < _MAX_THREADS:
                    _spawn_worker()
        raise


def is_correct(completion: str, gold: str, *, timeout: float = 5.0, think: tuple[str, str] | None = THINK_TAGS,
               opened: bool = False) -> bool:
    """Whether the completion's final answer equals ``gold`` mathematically (math-verify). Never raises;
    callable from any thread. ``timeout`` is wall-clock seconds for the math-verify part, including any
    wait for a free worker, so many concurrent slow checks can time out (and read as False).
    ``think``/``opened``: as for ``extract_answer``."""
    try:
        pred = extract_answer(completion, think=think, opened=opened) if isinstance(completion, str) else None
        if pred is None or not isinstance(gold, str):
            return False
        p, g = _normalise(pred), _normalise(gold)
        if not p or not g:
            return False
        if p == g:  # fast path, and the only check for very long answers
            return True
        pn, gn = _number(p), _number(g)
        if pn is not None and gn is not None:
            if pn == gn:
                return True
            if pn == pn.to_integral_value() and gn == gn.to_integral_value():
                return False  # integers are exact; other numbers may differ only by rounding
        pw, gw = _WORD.fullmatch(p), _WORD.fullmatch(g)
        if pw and gw:  # words: sympy would read "yes" as y*e*s, equal to "sey"
            return pw.group(1).lower() == gw.group(1).lower()
        if max(len(p), len(g)) > MAX_ANSWER_CHARS or _too_costly(p) or _too_costly(g):
            return False
        return bool(_run(_equivalent, (g, p), timeout))
    except Exception:  # garbage in, or the timeout: not correct
        return False


def reward(completion: str, gold: str | None, *, timeout: float = 5.0, think: tuple[str, str] | None = THINK_TAGS,
           opened: bool = False) -> float | None:
    """1.0 if the completion's answer is correct, else 0.0; None (abstain, like TRL's accuracy_reward)
    when ``gold`` is None/empty or math-verify cannot parse it and it is not a plain number, because
    then a 0.0 would punish the policy for the data's fault. May take up to 2 x ``timeout``.
    ``think``/``opened``: as for ``extract_answer``; a completion still thinking gets 0.0."""
    try:
        g = _normalise(gold) if isinstance(gold, str) else ""
        if not g:
            return None
        if _number(g) is None:
            if len(g) > MAX_ANSWER_CHARS or _too_costly(g):
                return None
            if not any(isinstance(x, (Basic, MatrixBase)) for x in _run(_parse, (g,), timeout)):
                return None  # math-verify did not read it as mathematics
    except Exception:  # unparseable within the time: abstain
        return None
    return 1.0 if is_correct(completion, gold, timeout=timeout, think=think, opened=opened) else 0.0
