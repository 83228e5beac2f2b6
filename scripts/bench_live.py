"""The live heatmap's cost per frame vs trace length: the whole trace re-rendered and re-sent every
frame (before) vs the edits of ``app/live.py`` (now), server side.

One rollout of a random-init model (4,096-token vocabulary, so it rarely ends; erasures on with a
fixed threshold, top-5 alternatives recorded) is generated to the longest length once; its events
are replayed into frames of ``--tokens-per-frame`` new tokens (the app sends a frame every 0.25 s:
at ~60 tok/s on this CPU that is ~16 tokens). Per length, over the frames near the end of the
trace: bytes per frame and server time to build it, full render vs edits; and the largest edit
frame of the whole run (a decided segment's block redrawn, O(one segment)).

    python scripts/bench_live.py [--lengths 1024,4096,16384] [--tokens-per-frame 16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import live, render  # noqa: E402
from e3rl_core.events import TokenEvent  # noqa: E402
from e3rl_core.generation.config import GenerationConfig  # noqa: E402
from e3rl_core.generation.generator import ErasableGenerator  # noqa: E402
from e3rl_core.models import random_model  # noqa: E402
from e3rl_core.overrides import apply_overrides  # noqa: E402


def events_of_one_rollout(n_tokens: int) -> list:
    model, tok = random_model("tiny-llama", init_std=0.02, seed=1, vocab_size=4096, max_positions=n_tokens + 64)
    cfg = apply_overrides(GenerationConfig(), [
        f"max_new_tokens={n_tokens}", "segment.segment_tokens=512", "threshold.policy=fixed", "threshold.value=6.77",
        "erase.budget=1", "erase.fallback=last", "record_top_k=5", "sampling.temperature=1.0"])
    gen = ErasableGenerator(model, tok, cfg)
    gen.eos_ids = set()
    return list(gen.stream("hello there", seed=0))


def measure(events: list, length: int, per_frame: int, window: int = 20) -> dict:
    """Frames up to ``length`` tokens; stats over the last ``window`` frames."""
    view, frames, seen = render.TraceView(), live.LiveFrames(), 0
    full_b, edit_b, full_t, edit_t = [], [], [], []
    for i, ev in enumerate(events):
        view.apply(ev)
        if isinstance(ev, TokenEvent):
            seen += 1
            if seen > length:
                break
            if seen % per_frame:
                continue
            t0 = time.perf_counter()
            full = render.trace_html(view, with_css=False)
            t1 = time.perf_counter()
            edits = live.encode(frames.frame(view), i)
            t2 = time.perf_counter()
            full_b.append(len(full.encode()))
            edit_b.append(len(edits.encode()))
            full_t.append(t1 - t0)
            edit_t.append(t2 - t1)
    tail = slice(-window, None)
    return dict(tokens=seen, full_bytes=statistics.median(full_b[tail]), edit_bytes=statistics.median(edit_b[tail]),
                edit_max=max(edit_b), full_ms=statistics.median(full_t[tail]) * 1e3,
                edit_ms=statistics.median(edit_t[tail]) * 1e3, erasures=len(view.erasures()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--tokens-per-frame", type=int, default=16)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    t0 = time.perf_counter()
    events = events_of_one_rollout(max(lengths))
    print(f"generated {max(lengths)} tokens in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print("| tokens so far | erasures | full render per frame | edits per frame (median of the last 20 / largest of all) | "
          "server ms per frame, full | server ms per frame, edits |")
    print("|---|---|---|---|---|---|")
    for n in lengths:
        m = measure(events, n, args.tokens_per_frame)
        print(f"| {m['tokens']:,} | {m['erasures']} | {m['full_bytes'] / 1024:,.0f} KiB | "
              f"{m['edit_bytes'] / 1024:,.1f} / {m['edit_max'] / 1024:,.1f} KiB | {m['full_ms']:.1f} | {m['edit_ms']:.2f} |")


if __name__ == "__main__":
    main()
