"""The order in which a batch's generator scored and decided its attempts, rebuilt from a trace.

Traces keep each rollout's events apart, but a group-relative threshold's decisions depend on the
order they were taken in (the e3rl history term reads the group's kept tokens at that moment). This
module steps ``generator._Run``'s loop over recorded attempt lengths and decisions, next to the
loop it mirrors, so that the audit's what-if can replay decisions exactly (app/audit.py).
"""
from __future__ import annotations

from typing import Sequence

from ..events import SegmentEvent
from .generator import RowStatus


def decision_order(segments: Sequence[Sequence[SegmentEvent]],
                   needs_group: bool) -> list[tuple[str, int, SegmentEvent]]:
    """A group's recorded attempts (``segments[row]``: that rollout's segment events in order) as
    ("score" | "decide", row, segment event), in the order the generator scored and decided them.

    The e3rl threshold's history term reads every rollout's kept tokens at the moment of a
    decision, so a rollout's retry is judged after or before a group-mate's acceptance depending on
    when each ended. Traces keep each rollout's events apart, so the order is rebuilt by stepping
    the generator's loop (``generator._Run``: draw, score, resolve the group's waits,
    feed) over the recorded attempt lengths and decisions. tests/app/test_audit.py holds the two
    to the same order."""
    segs = [list(ss) for ss in segments]
    n = len(segs)
    at = [0] * n  # index of each row's current attempt in segs[i]
    drawn = [0] * n  # tokens drawn of it
    status = [RowStatus.SAMPLE if ss else RowStatus.DONE for ss in segs]
    first_scored: list[set[int]] = [set() for _ in range(n)]
    # how many segments from 0 on each row has first-scored: a group's decision at segment k waits
    # until every live row has (one minimum per pass instead of a scan of the group per row)
    scored_upto = [0] * n
    order: list[tuple[str, int, SegmentEvent]] = []

    def decided(i: int) -> None:
        s = segs[i][at[i]]
        order.append(("decide", i, s))
        at[i], drawn[i] = at[i] + 1, 0
        if at[i] == len(segs[i]):
            status[i] = RowStatus.DONE
        else:  # a retry draws at once from the boundary logits; a kept segment's last token is fed
            status[i] = RowStatus.SAMPLE if s.decision == "erase" else RowStatus.FEED

    while True:
        while True:
            while ready := [i for i in range(n) if status[i] is RowStatus.SAMPLE]:
                for i in ready:
                    s = segs[i][at[i]]
                    drawn[i] += 1
                    if drawn[i] < s.end - s.start:
                        status[i] = RowStatus.FEED
                        continue
                    order.append(("score", i, s))
                    if s.attempt == 0:
                        first_scored[i].add(s.segment)
                        while scored_upto[i] in first_scored[i]:
                            scored_upto[i] += 1
                    if needs_group and s.reason != "restored":
                        status[i] = RowStatus.WAIT
                    else:
                        decided(i)
            resolved = 0
            floor = min((scored_upto[o] for o in range(n) if status[o] is not RowStatus.DONE), default=0)
            for i in range(n):
                if status[i] is RowStatus.WAIT and segs[i][at[i]].segment < floor:
                    resolved += 1
                    decided(i)
                    if status[i] is RowStatus.DONE:  # a row left: the live rows' minimum may rise
                        floor = min((scored_upto[o] for o in range(n) if status[o] is not RowStatus.DONE),
                                    default=0)
            if not resolved:
                break
        feeding = [i for i in range(n) if status[i] is RowStatus.FEED]
        if not feeding:  # every row done (or a cut-off file whose group cannot resolve)
            return order
        # Steps in which no row reaches the end of its attempt change nothing but the counts:
        # skip them, so the work follows the recorded events, not the tokens they claim.
        quiet = min(segs[i][at[i]].end - segs[i][at[i]].start - drawn[i] for i in feeding) - 1
        for i in feeding:
            status[i] = RowStatus.SAMPLE
            drawn[i] += max(quiet, 0)
