"""Views that explain themselves: an erased attempt drawn like kept text with its U, Θ, margin and
reason; decisions taken by a hair marked; limits stated; a collapsed view that is never longer than
the expanded one; readable trace labels; paged tables; the what-if's changed rows first."""
from __future__ import annotations

import pandas as pd
import pytest
from test_browser import CHROMIUM, chromium

from app import audit, live, render
from e3rl_core.events import EraseEvent, SegmentEvent, StartEvent, TokenEvent, Trace
from e3rl_core.generation.decision import NEAR_FRACTION, NEAR_MARGIN, near_threshold


def tok(step: int, seg: int, att: int = 0, value: float = 0.5, text: str = "x") -> TokenEvent:
    return TokenEvent(trace_id="t", step=step, token_id=step, text=text, entropy=value, surprisal=2 * value,
                      segment=seg, attempt=att, index=step)


def decision(seg: int, att: int, score: float, thr: float | None, dec: str, reason: str) -> SegmentEvent:
    return SegmentEvent(trace_id="t", segment=seg, attempt=att, start=0, end=1, score=score, features={},
                        baseline=thr, penalty=0.0, history=0.0, threshold=thr, decision=dec, reason=reason)


def start(**kw) -> StartEvent:
    base = dict(trace_id="t", model="m", prompt="Question: a = 17 - 8. What is a?\nAnswer:\n", prompt_ids=[1, 2, 3],
                config={"erase": {"enabled": True}}, seed=8, group_index=0, group_id=0, gold="9")
    return StartEvent(**{**base, **kw})


def view_of(events) -> render.TraceView:
    v = render.TraceView()
    for e in events:
        v.apply(e)
    return v


def erased_then_kept(score: float, thr: float) -> list:
    """Segment 0: an attempt erased at (score, thr), then its retry kept."""
    return [start(), tok(0, 0, 0, 1.9, "7"), decision(0, 0, score, thr, "erase", "above_threshold"),
            EraseEvent(trace_id="t", segment=0, attempt=0, start=0, end=1, text="7", cache_len_before=4,
                       cache_len_after=3),
            tok(1, 0, 1, 0.1, "9"), decision(0, 1, 0.1, thr, "accept", "below_threshold")]


def test_an_erased_attempt_is_drawn_like_kept_text_with_its_numbers_inline():
    html = render.trace_html(view_of(erased_then_kept(1.2, 0.5)))
    gone = html.split('<details class="e3rl-erased"', 1)[1].split("</details>", 1)[0]
    assert 'class="e3rl-gone"' in gone and "background:rgb(" in gone  # coloured by the signal
    assert "entropy 1.900" in gone  # each token's numbers on hover, as a kept token's
    why = gone.split('class="e3rl-why">', 1)[1]
    assert "U=1.200" in why and "Θ=0.500" in why and "margin +0.700" in why and "U over Θ" in why
    assert "data-near" not in gone and "≈" not in why
    assert html.count('class="e3rl-tok"') == 1  # the kept token alone counts as kept


@pytest.mark.parametrize("score,thr,near", [(0.003, 0.0022, True), (0.52, 0.50, True), (0.56, 0.50, False),
                                            (1.2, 0.5, False), (0.0, None, False)])
def test_decisions_by_a_hair_are_marked(score, thr, near):
    assert near_threshold(score, thr) is near
    assert (abs(score - thr) < max(NEAR_FRACTION * thr, NEAR_MARGIN)) is near if thr is not None else True
    if thr is None:
        return
    v = view_of(erased_then_kept(score, thr))
    html = render.trace_html(v, with_css=False)
    assert ("data-near" in html) is near and ("by a hair" in html) is near
    assert ("≈ 1 decision(s) by a hair" in render.summary_markdown(v)) is near
    table = audit.decisions_frame([Trace(list(erased_then_kept(score, thr)))])
    assert list(table["near_threshold"]) == [near, near_threshold(0.1, thr)]
    assert table["margin"].iloc[0] == pytest.approx(score - thr)


def test_the_summary_and_the_collapsed_line_state_the_cap_and_forced_accepts():
    events = [start(), tok(0, 0), decision(0, 0, 2.0, 1.0, "forced_accept", "budget"),
              tok(1, 1), decision(1, 0, 3.0, 1.0, "forced_accept", "trace_cap"),
              tok(2, 2), decision(2, 0, 2.5, 1.0, "forced_accept", "trace_cap")]
    v = view_of(events)
    md = render.summary_markdown(v)
    assert "erasure cap" in md and "2 later segment(s) over Θ kept unerased, from segment 1 on" in md
    assert "1 segment(s) kept over Θ with their Erase@K budget spent" in md
    lines = [render.segment_summary(a) for a in render.segments(v).values()]
    assert "Erase@K budget is spent" in lines[0] and "erasure cap is reached" in lines[1]


def test_the_rendered_prompt_is_shown_folded_and_escaped():
    v = view_of([start(prompt="<|im_start|>user\nWhat is 2+2?<|im_end|>\n<think>\n\n</think>\n")])
    md = render.prompt_markdown(v)
    assert "<details" in md and "3 tokens" in md and "&lt;think&gt;" in md and "<think>" not in md
    long = view_of([start(prompt="a" * 5000 + "THE END")])
    assert "THE END" in render.prompt_markdown(long) and "characters] …" in render.prompt_markdown(long)


def short_segments_trace(n: int = 40) -> render.TraceView:
    """n one-token segments (every 7th erased once), a long segment, then n more."""
    events, step = [start()], 0
    for seg in range(2 * n + 1):
        if seg % 7 == 3:
            events += [tok(step, seg, 0, 1.5), decision(seg, 0, 1.5, 1.0, "erase", "above_threshold"),
                       EraseEvent(trace_id="t", segment=seg, attempt=0, start=0, end=1, text="x",
                                  cache_len_before=9, cache_len_after=8)]
            step += 1
        att = 1 if seg % 7 == 3 else 0
        words = 60 if seg == n else 1
        for _ in range(words):
            events.append(tok(step, seg, att, 0.2, "word "))
            step += 1
        events.append(decision(seg, att, 0.2, 1.0, "accept", "below_threshold"))
    return view_of(events)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium")
def test_collapse_folds_runs_of_short_segments_and_is_never_longer():
    v = short_segments_trace()
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 900, "height": 800})
        page.set_content(f"<style>{render.CSS}</style><style>.e3rl-scroll{{max-height:none !important}}</style>"
                         f"<div id='h'>{live.page_html(v)}</div>")
        height = "() => document.querySelector('#h .e3rl-trace').getBoundingClientRect().height"
        expanded = page.evaluate(height)
        on = live.collapse_js("#h")
        page.evaluate(f"({on})(true)")
        collapsed = page.evaluate(height)
        runs = page.evaluate("() => [...document.querySelectorAll('#h .e3rl-runsum')].map(e => e.innerText)")
        assert runs == ["0–39: 40 one-token segments, 6 erased", "41–80: 40 one-token segments, 6 erased"]
        assert collapsed < expanded / 5  # 81 segments in 3 lines (two runs and the long one)
        # a run opens on a click, one segment per line, and stays open while the trace grows
        page.locator("#h .e3rl-runsum").first.click()
        page.wait_for_function("() => document.querySelectorAll('#h .e3rl-runsum').length === 1")
        assert expanded >= page.evaluate(height) > collapsed
        page.evaluate("""() => { const t = document.querySelector('#h .e3rl-trace');
            t.insertAdjacentHTML('beforeend', '<span class="e3rl-seg e3rl-decided" data-seg="81" data-n="1" data-x="0">'
              + '<span class="e3rl-segmark">81</span><span class="e3rl-segsum">s</span></span>'); }""")
        page.wait_for_function("() => /41 one-token/.test(document.querySelector('#h .e3rl-runsum').innerText)")
        page.evaluate(f"({on})(false)")  # off: every segment and no run line
        assert page.evaluate("() => document.querySelectorAll('#h .e3rl-runsum, #h .e3rl-folded').length") == 0


def test_trace_labels_name_prompt_rollout_seed_and_counterfactual():
    on = Trace([start(trace_id="a-0-1", group_index=1, seed=9)])
    off = Trace([start(trace_id="b-0-1", group_index=1, seed=9, config={"erase": {"enabled": False}})])
    chat = Trace([start(trace_id="c", prompt="<|im_start|>user\nHow many primes are below " + "ten " * 30
                        + "?<|im_end|>\n<|im_start|>assistant\n", train_step=12)])
    labels = dict((v, lbl) for lbl, v in audit.trace_labels([on, off, chat]))
    assert labels["a-0-1"].startswith("“a = 17 - 8. What is a?” · rollout 1 · seed 9")
    assert "counterfactual (erasure off)" in labels["b-0-1"] and "counterfactual" not in labels["a-0-1"]
    assert labels["c"].startswith("“How many primes are below ten ten") and "…” " in labels["c"]
    assert "training step 12" in labels["c"] and labels["c"].endswith(" · c")


def test_tables_are_paged_and_the_what_if_lists_changes_first():
    df = pd.DataFrame({"x": range(250)})
    part, page, pages = audit.page_of(df, 3)
    assert (page, pages, list(part["x"])[:2], len(part)) == (3, 3, [200, 201], 50)
    assert audit.page_of(df, 99)[1] == 3 and audit.page_of(df, 0)[1] == 1
    assert audit.page_line(250, 3, 3) == "rows 201–250 of 250 (page 3 of 3)"
    assert audit.page_line(0, 1, 1) == "no rows"
    wi = pd.DataFrame({"trace": ["t"] * 4, "segment": [0, 1, 2, 3], "changed": [False, True, False, True]})
    shown = audit.what_if_view(wi)
    assert list(shown.columns)[0] == "changed" and list(shown["segment"]) == [1, 3, 0, 2]
