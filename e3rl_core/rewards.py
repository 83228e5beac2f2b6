"""Answer extraction (pure string functions). Answer checking with math-verify builds on these."""
from __future__ import annotations

import re

# The synthetic task's fallback marker, for completions that never write \boxed{...}.
ANSWER_MARKER = re.compile(r"(?:final answer|answer)\s*[:=]\s*([^\n]+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent or
    unclosed. Linear in the text length, so adversarial input cannot make it hang."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    while start != -1:
        brace = text.find("{", start)
        if brace != -1 and text[start:brace].strip() in ("\\boxed", "\\fbox"):
            depth = 0
            for i in range(brace, len(text)):
                ch = text[i]
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        return text[brace + 1 : i].strip()
        start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: the last ``\\boxed{}``, else the last "Answer: ..." line."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    found = ANSWER_MARKER.findall(completion)
    return found[-1].strip().rstrip(".") if found else None
