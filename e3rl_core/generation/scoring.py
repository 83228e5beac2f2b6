"""Segment score U_n = a*B_n + b*M_n + c*D_n (method section 3), as pure functions on signal lists.

h_t is the decision signal x_t smoothed by a trailing moving average of width w, whose window
reaches back into the kept context before the segment (so a segment's first tokens are not judged
on one or two values alone).
- B_n (base uncertainty)  = mean of h_t over the segment
- M_n (extreme deviation) = max of x_t over the segment, unsmoothed so that one slip counts
- D_n (gradient anomaly)  = max(B_n - B_{n-1}, 0)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SegmentFeatures:
    base: float
    max: float
    delta: float

    def to_dict(self) -> dict[str, float]:
        return {"base": self.base, "max": self.max, "delta": self.delta}


def trailing_mean(signal: Sequence[float], context: Sequence[float], window: int) -> list[float]:
    """Trailing moving average of ``signal`` with width ``window``; the window may reach into the
    last ``window - 1`` values of ``context`` (the kept tokens before the segment)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    seq = list(context[-(window - 1):] if window > 1 else []) + list(signal)
    offset = len(seq) - len(signal)
    out: list[float] = []
    running = 0.0
    # Prefix sums keep this O(T); values are short lists of python floats.
    prefix = [0.0]
    for v in seq:
        running += v
        prefix.append(running)
    for i in range(offset, len(seq)):
        lo = max(0, i - window + 1)
        out.append((prefix[i + 1] - prefix[lo]) / (i + 1 - lo))
    return out


def segment_features(
    signal: Sequence[float], context: Sequence[float], prev_base: float, window: int
) -> SegmentFeatures:
    """Features of one segment. ``signal``: the decision signal of its tokens (non-empty);
    ``context``: the kept signal before it; ``prev_base``: B_{n-1} (B_0 for the first segment)."""
    if not signal:
        raise ValueError("a segment has at least one token")
    smoothed = trailing_mean(signal, context, window)
    base = sum(smoothed) / len(smoothed)
    return SegmentFeatures(base=base, max=max(signal), delta=max(base - prev_base, 0.0))


def segment_score(features: SegmentFeatures, weights: tuple[float, float, float]) -> float:
    """U_n from the features and weights (a, b, c)."""
    a, b, c = weights
    return a * features.base + b * features.max + c * features.delta
