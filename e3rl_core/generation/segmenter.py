"""Segmenters decide, token by token, where a segment (a local decision window) ends.

Generation is online, so a segmenter sees only the segment so far: its length in tokens, its text
and the text the newest token added. Select one by ``SegmentConfig.mode``:
- ``fixed``      windows of ``segment_tokens`` tokens (paper: 16 x 512). With ``snap_to_newline``
                 a window ends at the first ``snap_to`` (a newline, or ``\\n\\n`` for the blank line
                 between a thinking model's reasoning steps) once its length is within
                 +-``snap_window`` of ``segment_tokens`` (or at ``segment_tokens + snap_window``) --
                 the online reading of "move the boundary to the nearest newline".
- ``delimiter``  a segment ends at a reasoning-step delimiter or at ``segment_tokens`` tokens,
                 whichever comes first; for short-trace models such as the shipped demo.
End of sequence and the length limit always end a segment; the generator handles those.
"""
from __future__ import annotations

from typing import Callable, Protocol

from ..registry import Registry
from .config import SegmentConfig


class Segmenter(Protocol):
    def is_boundary(self, length: int, text: str, delta: str) -> bool:
        """True when the segment ends after its newest token.

        length: tokens in the segment so far (>= 1); text: its text so far; delta: the text the
        newest token added (the tail of ``text``)."""
        ...


SEGMENTERS: Registry[Callable[[SegmentConfig], Segmenter]] = Registry("segmenter")


def make_segmenter(config: SegmentConfig) -> Segmenter:
    return SEGMENTERS.get(config.mode)(config)


def _ends_with_delimiter(text: str, delta: str, delimiters: tuple[str, ...]) -> bool:
    # A delimiter counts if the newest token completed it: it may straddle two tokens (". " is
    # often "." then " The"), so look at the tail that the newest token could have completed.
    for d in delimiters:
        if d in text[max(0, len(text) - len(delta) - len(d) + 1):]:
            return True
    return False


@SEGMENTERS.register("fixed")
class FixedSegmenter:
    def __init__(self, config: SegmentConfig) -> None:
        self.length = config.segment_tokens
        self.snap = config.snap_to_newline
        self.window = config.snap_window
        self.snap_to = (config.snap_to,)

    def is_boundary(self, length: int, text: str, delta: str) -> bool:
        if not self.snap:
            return length >= self.length
        if length >= self.length + self.window:
            return True
        # _ends_with_delimiter: a "\n\n" may arrive as two "\n" tokens
        return length >= self.length - self.window and _ends_with_delimiter(text, delta, self.snap_to)


@SEGMENTERS.register("delimiter")
class DelimiterSegmenter:
    def __init__(self, config: SegmentConfig) -> None:
        self.length = config.segment_tokens
        self.delimiters = config.delimiters

    def is_boundary(self, length: int, text: str, delta: str) -> bool:
        return length >= self.length or _ends_with_delimiter(text, delta, self.delimiters)
