"""The live heatmap's edits: after any number of frames, the page holds exactly what the full
render of the same events draws (in Chromium), and a frame costs what changed."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_config, median_score
from test_browser import CHROMIUM, chromium

from app import live, render
from e3rl_core.events import TokenEvent
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.models import random_model

PROMPT = "Compute 12 + 7 = "


@pytest.fixture(scope="module")
def events():
    """One rollout of a G=2 group with erasures; some tokens turned into byte pieces of one
    character (an empty text completed by the next token), as byte-level BPE streams them."""
    model, tok = random_model("tiny-llama", init_std=0.3, seed=1)
    thr = median_score(model, tok, PROMPT)
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=fixed", f"threshold.value={thr}",
                                                    "max_new_tokens=64", "erase.budget=2"))
    evs = list(gen.stream(PROMPT, group_size=2, seed=0))
    first = evs[0].trace_id
    out = [e for e in evs if e.trace_id == first]
    tokens = [i for i, e in enumerate(out) if isinstance(e, TokenEvent)]
    for i in tokens[3:40:7]:  # a piece whose character the next token completes
        out[i] = replace(out[i], text="")
    assert sum(1 for e in out if type(e).__name__ == "EraseEvent") >= 1
    return out


def frames(events, every: int):
    """(ops of each frame, the view after it), a frame every ``every`` events."""
    view, lf, out = render.TraceView(), live.LiveFrames(), []
    for i, ev in enumerate(events, 1):
        view.apply(ev)
        if i % every == 0 or i == len(events):
            out.append(lf.frame(view))
    return out, view


def test_frames_are_edits_after_the_first(events):
    ops, view = frames(events, 1)
    assert [o["op"] for o in ops[0]] == ["reset"]
    kinds = [o["op"] for frame in ops[1:] for o in frame]
    assert "reset" not in kinds and {"append", "repiece", "block", "fold", "mark"} <= set(kinds)
    assert kinds.count("append") > kinds.count("block")  # most frames only add a token
    full = len(render.trace_html(view, with_css=False))
    # a token's edit is a small part of the whole trace, a completed character's too (its pieces'
    # span drawn again, not its segment)
    appends = [len(live.encode([o], 1)) for frame in ops for o in frame if o["op"] in ("append", "repiece")]
    assert max(appends) < full / 10
    # (one per piece completed within its segment: a piece that ends a segment, or whose attempt
    # is erased, is drawn again with its block)
    assert 0 < kinds.count("repiece") <= sum(1 for e in events if isinstance(e, TokenEvent) and e.text == "")


@pytest.mark.skipif(not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM), reason="no Chromium")
@pytest.mark.parametrize("every", [1, 3, 10])
def test_edits_leave_the_page_equal_to_the_full_render(events, every):
    ops, _ = frames(events, every)
    with chromium() as browser:
        page = browser.new_page()
        page.set_content('<div id="e3rl-live"><div class="e3rl-body"></div></div><div id="full"></div>')
        view = render.TraceView()
        n = 0
        for i, ev in enumerate(events, 1):
            view.apply(ev)
            if i % every == 0 or i == len(events):
                page.evaluate(live.LIVE_JS, live.encode(ops[n], n))
                n += 1
                if n % 5 == 0 or i == len(events):
                    got = page.evaluate("() => document.querySelector('#e3rl-live .e3rl-body').innerHTML")
                    want = page.evaluate("(h) => { const d = document.querySelector('#full'); d.innerHTML = h; "
                                         "return d.innerHTML; }", render.trace_html(view, with_css=False))
                    assert got == want, f"after event {i}"


@pytest.mark.skipif(not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM), reason="no Chromium")
def test_collapsed_segments_show_one_line_each(events):
    view = render.TraceView()
    for ev in events:
        view.apply(ev)
    decided = [s for s, att in render.segments(view).items() if render.segment_summary(att)]
    assert decided
    with chromium() as browser:
        page = browser.new_page()
        page.set_content(f"<style>{render.CSS}</style><div id='h'>{live.page_html(view)}</div>")
        visible = "() => [...document.querySelectorAll('#h .e3rl-seg.e3rl-decided .e3rl-tok')].filter(e => e.offsetParent).length"
        assert page.evaluate(visible) > 0
        page.evaluate("() => document.querySelector('#h').classList.add('e3rl-collapse')")
        assert page.evaluate(visible) == 0  # a decided segment's tokens fold away
        lines = page.evaluate("() => [...document.querySelectorAll('#h .e3rl-seg.e3rl-decided')]"
                              ".map(e => [e.getBoundingClientRect().height, e.querySelector('.e3rl-segsum').innerText])")
        assert len(lines) == len(decided)
        for height, text in lines:
            assert height < 40 and " vs Θ=" in text and "erased" in text  # one line: score, threshold, erasures
