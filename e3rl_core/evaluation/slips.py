"""How often a policy slips on its own: the first step at which a sampled solution leaves the
reference solution, as a rate per 100 steps.

A solution is read line by line (one reasoning step per line, the final ``\\boxed{}`` line counted as
a step). The first line that differs from the reference's line at the same place is the slip; the
lines after it are not counted, since they follow from it (the cascade) rather than being new
slips. The rate is slips per 100 steps attempted, a step being attempted when every step before it
was right, so it estimates the per-step chance of a first slip. This needs a task with one right
solution per problem, written one step per line (the synthetic arith task); datasets whose solutions
are free text have no per-step reference and are refused.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..errors import E3RLError


def first_departure(reference: str, completion: str) -> tuple[int | None, int]:
    """(index of the first line of ``completion`` that differs from ``reference``'s, or None; how
    many steps were attempted: the lines up to and including that one, else all the reference's).
    A completion that stops early slips at the first missing line; extra lines after a complete,
    right solution are not steps of it."""
    ref = [line.strip() for line in reference.strip().split("\n")]
    got = [line.strip() for line in completion.strip().split("\n")]
    for i, line in enumerate(ref):
        if i >= len(got) or got[i] != line:
            return i, i + 1
    return None, len(ref)


def slip_rate(rows: Iterable[Mapping[str, Any]], references: Mapping[str, str]) -> dict[str, Any]:
    """Slips per 100 steps attempted over evaluation rows (``problem_id``, ``text``: ``e3rl eval
    --out``), with each problem's reference solution; also the share of samples that slip at all."""
    slips = steps = samples = 0
    for row in rows:
        ref = references.get(row["problem_id"])
        if ref is None:
            raise E3RLError(f"no reference solution for problem {row['problem_id']!r}: slip rates need a dataset "
                            f"whose solutions are written one step per line (synthetic:...)")
        where, attempted = first_departure(ref, row.get("text") or "")
        slips += where is not None
        steps += attempted
        samples += 1
    if not samples:
        raise E3RLError("no evaluation rows to measure slips on")
    return {"slips_per_100_steps": 100.0 * slips / steps, "samples_with_slip": slips / samples,
            "steps_attempted": steps, "samples": samples}


def _deviates(reference: list[str], text: str) -> bool:
    """Whether a partial solution already differs from the reference: a complete line that is not
    the reference's line at its place, or a last, unfinished line that does not begin it."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        ref = reference[i] if i < len(reference) else None
        last = i == len(lines) - 1
        if last:
            return bool(line.strip()) and (ref is None or not ref.startswith(line.strip()))
        if ref is None or line.strip() != ref:
            return True
    return False


def slipped_before(reference: str, before: str) -> bool:
    """Whether the text ``before`` a segment already left the reference solution (a segment written
    there follows an earlier slip: redrawing it cannot repair that one)."""
    return _deviates([line.strip() for line in reference.strip().split("\n")], before)


def holds_slip(reference: str, before: str, segment: str) -> bool:
    """Whether ``segment``, written after the text ``before``, holds the solution's first wrong
    step: ``before`` still agrees with the reference solution (line by line, an unfinished last
    line a prefix of the reference's) and ``before + segment`` no longer does."""
    ref = [line.strip() for line in reference.strip().split("\n")]
    return not _deviates(ref, before) and _deviates(ref, before + segment)
