"""Segmenter properties and config overrides."""
from __future__ import annotations

import random

import pytest

from e3rl_core.errors import ConfigError
from e3rl_core.generation.config import GenerationConfig, SegmentConfig
from e3rl_core.generation.segmenter import make_segmenter
from e3rl_core.overrides import apply_overrides


def segment_stream(seg, pieces):
    """Cut a stream of token texts into segments the way the generator does, online."""
    out, cur = [], []
    for piece in pieces:
        cur.append(piece)
        if seg.is_boundary(len(cur), "".join(cur), piece):
            out.append(cur)
            cur = []
    return out, cur


@pytest.mark.parametrize("length", [1, 3, 8])
def test_fixed_windows_partition_the_stream(length):
    rnd = random.Random(length)
    pieces = [rnd.choice(["a", "b", "\n", " "]) for _ in range(50)]
    segs, rest = segment_stream(make_segmenter(SegmentConfig(mode="fixed", segment_tokens=length)), pieces)
    assert all(len(s) == length for s in segs)
    assert len(rest) < length
    assert [p for s in segs for p in s] + rest == pieces  # non-overlapping, in order, nothing lost


def test_fixed_snap_to_newline():
    seg = make_segmenter(SegmentConfig(mode="fixed", segment_tokens=10, snap_to_newline=True, snap_window=3))
    pieces = ["a"] * 7 + ["\n"] + ["b"] * 30
    segs, _ = segment_stream(seg, pieces)
    assert len(segs[0]) == 8  # snapped back to the newline at 8 (within 10 +- 3)
    assert all(len(s) == 13 for s in segs[1:])  # no newline: cut at 10 + 3
    early = ["\n"] + ["a"] * 20
    assert len(segment_stream(seg, early)[0][0]) == 13  # a newline before 10 - 3 does not count


def test_fixed_snap_to_blank_line_between_reasoning_steps():
    cfg = SegmentConfig(mode="fixed", segment_tokens=10, snap_to_newline=True, snap_window=3, snap_to="\n\n")
    seg = make_segmenter(cfg)
    # A single newline inside the window no longer ends the segment; the blank line after it does,
    # also when it arrives as two "\n" tokens.
    segs, _ = segment_stream(seg, ["a"] * 7 + ["\n"] + ["b"] + ["\n", "\n"] + ["c"] * 30)
    assert "".join(segs[0]) == "a" * 7 + "\nb\n\n" and len(segs[0]) == 11
    segs, _ = segment_stream(seg, ["a"] * 8 + ["\n\n"] + ["c"] * 30)  # one "\n\n" token (byte-level BPE)
    assert len(segs[0]) == 9
    segs, _ = segment_stream(seg, ["a"] * 7 + ["\n"] + ["b"] * 30)  # no blank line: cut at 10 + 3
    assert len(segs[0]) == 13
    # The default is unchanged: any newline.
    assert SegmentConfig().snap_to == "\n"
    assert apply_overrides(GenerationConfig(), ["segment.snap_to=\\n\\n"]).segment.snap_to == "\n\n"
    with pytest.raises(ConfigError, match="snap_to"):
        SegmentConfig(snap_to_newline=True, snap_to="")


def test_delimiter_segments():
    seg = make_segmenter(SegmentConfig(mode="delimiter", segment_tokens=6, delimiters=("\n", ". ")))
    pieces = list("12+3=15\n") + list("ab") + ["."] + [" The"] + list("xxxxxxxxxx")
    segs, rest = segment_stream(seg, pieces)
    texts = ["".join(s) for s in segs]
    assert texts[0] == "12+3=1"  # the length limit comes first
    assert texts[1] == "5\n"
    assert texts[2] == "ab. The"  # ". " straddles two tokens
    assert all(len(s) <= 6 for s in segs) and all(len(s) == 6 for s in segs[3:])


def test_overrides_parse_types_and_validate():
    cfg = apply_overrides(GenerationConfig(), [
        "threshold.kappa=1.5", "erase.enabled=false", "segment.delimiters=\\n,;",
        "erase.max_per_trace=none", "threshold.history_clip=0.5,2", "max_new_tokens=64",
    ])
    assert cfg.threshold.kappa == 1.5 and cfg.erase.enabled is False
    assert cfg.segment.delimiters == ("\n", ";")
    assert cfg.threshold.history_clip == (0.5, 2.0)
    assert cfg.max_new_tokens == 64 and cfg.trace_erase_cap == 2
    assert GenerationConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.smoothing_window == 32
    assert apply_overrides(cfg, ["segment.mode=delimiter"]).smoothing_window == 8


@pytest.mark.parametrize("item, message", [
    ("threshold.kapa=1", "not one of"),
    ("threshold=1", "is a section"),
    ("erase.budget=many", "expects a int"),
    ("erase.enabled=maybe", "true/false"),
    ("sampling.temperature=-1", "must be >= 0"),
    ("score.signal=loss", "choose one of: surprisal, entropy"),
    ("noequals", "section.field=value"),
])
def test_bad_overrides_explain(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(GenerationConfig(), [item])
