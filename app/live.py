"""The live heatmap's frames as edits, so a frame costs what changed, not the whole trace.

``render.trace_html`` draws a trace as a head, one block per segment (``render.segment_html``) and
a tail (stopped mark, error). ``LiveFrames.frame`` compares a growing ``TraceView`` with what the
page already shows and returns the edits that bring the page up to date:

- ``{"op": "reset", "html": ...}``: the whole trace (the first frame, a replay, another row);
- ``{"op": "append", "seg": n, "html": ...}``: tokens added to segment n's streaming attempt,
  drawn exactly as the full render draws them (the common case: O(new tokens));
- ``{"op": "repiece", "seg": n, "html": ...}``: the last span of segment n's streaming attempt (the
  byte pieces of a character not complete yet) replaced by the tokens from that character on, now
  that more have come (byte-level BPE: O(new tokens) too);
- ``{"op": "block", "seg": n, "html": ...}``: segment n's block redrawn or added (an erasure, a
  retry decided, a restore: O(one segment), once per event of that kind);
- ``{"op": "fold", "seg": n, "erased": "n.a", "html": ...}``: the struck-through attempt a of
  segment n folded into its ✂ marker once its retry is decided (O(that attempt's text));
- ``{"op": "mark", "seg": n, "title": ..., "summary": ...}``: segment n decided: its mark's hover
  text and its one-line summary (what a collapsed segment shows);
- ``{"op": "tail", "html": ...}``: the marks after the last segment.

Applied in order by the page's script (``LIVE_JS``), the edits leave the same HTML as
``trace_html`` of the same events (tested against the full render, and in Chromium).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from . import render
from .render import Attempt, TraceView


@dataclass
class _Shown:
    """What the page shows of one segment: its block's identity, and how far the streaming
    attempt's tokens have been drawn."""

    key: tuple
    tokens: int


@dataclass
class LiveFrames:
    """Edits for one trace view shown in one page element (``signal`` colours the tokens)."""

    signal: str = "entropy"
    shown: dict[int, _Shown] = field(default_factory=dict)
    tail: str | None = None

    def reset(self, view: TraceView) -> list[dict[str, Any]]:
        """The whole trace, and remember it as shown."""
        self.shown, self.tail = {}, None
        for seg, attempts in render.segments(view).items():
            self.shown[seg] = _Shown(_key(view, attempts), len(attempts[-1].tokens))
        self.tail = render.tail_html(view)
        return [{"op": "reset", "html": render.trace_html(view, self.signal, with_css=False)}]

    def frame(self, view: TraceView) -> list[dict[str, Any]]:
        """The edits since the last frame (a reset the first time)."""
        if not self.shown and self.tail is None:
            return self.reset(view)
        ops: list[dict[str, Any]] = []
        for seg, attempts in render.segments(view).items():
            key, last = _key(view, attempts), attempts[-1]
            before = self.shown.get(seg)
            folded = _folded(before.key[0], key[0]) if before is not None else None
            if folded is not None:  # only the erased attempt's look changes: no need to redraw the block
                a = next(a for a in attempts if (a.segment, a.attempt) == folded)
                ops.append({"op": "fold", "seg": seg, "erased": render.erased_id(a),
                            "html": render.erased_html(a, folded=True, signal=self.signal)})
                before.key = (key[0], before.key[1])
            if before is not None and before.key[0] == key[0] and len(last.tokens) >= before.tokens:
                if len(last.tokens) > before.tokens:
                    start = _open_piece(last.tokens, before.tokens)
                    html = render.tokens_html(last.tokens[start:], self.signal)
                    # the drawn tokens end in pieces of a character: their span is drawn again
                    ops.append({"op": "repiece" if start < before.tokens else "append", "seg": seg, "html": html})
                    before.tokens = len(last.tokens)
                if before.key[1] != key[1]:  # decided (kept): only the mark's hover text changes
                    ops.append({"op": "mark", "seg": seg, "title": render.segment_title(view, seg, attempts),
                                "summary": render.segment_summary(attempts), "n": len(last.tokens),
                                "x": len(attempts) - 1})
                    before.key = key
                continue
            ops.append({"op": "block", "seg": seg, "html": render.segment_html(view, seg, attempts, self.signal)})
            self.shown[seg] = _Shown(key, len(last.tokens))
        tail = render.tail_html(view)
        if tail != self.tail:
            ops.append({"op": "tail", "html": tail})
            self.tail = tail
        return ops


def _open_piece(tokens: list, drawn: int) -> int:
    """Where the last drawn span starts when the first ``drawn`` tokens end in byte pieces of a
    character not complete yet (tokens with empty text, drawn as one span; ``render.pieces``); else
    ``drawn``. Grouping restarts after a complete character, so the tokens from there on are drawn
    exactly as the full render draws them."""
    start = drawn
    while start > 0 and tokens[start - 1].text == "":
        start -= 1
    return start


def _folded(before: tuple, now: tuple) -> tuple[int, int] | None:
    """The (segment, attempt) whose struck-through text folds into ✂ between two structure keys
    of a segment, when that is all that changed; else None."""
    if before[0] == now[0] and before[2] == now[2] and before[1] is not None and now[1] is None:
        return before[1]
    return None


def _key(view: TraceView, attempts: list[Attempt]) -> tuple[tuple, tuple]:
    """(what a segment's block is built from besides the streaming attempt's appended tokens and
    its decision, that decision). A decision that keeps the attempt changes only the mark's hover
    text; anything else in the first part redraws the block."""
    last = attempts[-1]
    structure = (
        tuple((a.attempt, None if a is last else a.decision is not None, a.erased is not None,
               None if a is last else len(a.tokens)) for a in attempts),
        view.last_erased if view.last_erased and view.last_erased[0] == attempts[0].segment else None,
        view.stopped,
    )
    decision = (last.decision.decision, last.decision.score, last.decision.threshold) if last.decision else None
    return structure, (decision,)


def encode(ops: list[dict[str, Any]], seq: int = 0) -> str:
    """Edits as the text the page's script reads; ``seq`` numbers the frames of a run, so two
    frames never carry the same text (the page acts on a change of the text)."""
    return json.dumps({"n": seq, "ops": ops}, ensure_ascii=False)


def page_html(view: TraceView, signal: str = "entropy") -> str:
    """The whole trace as the live element holds it (what a reset edit puts in it): the full
    render inside the body element the edits address."""
    return f'<div class="e3rl-body">{render.trace_html(view, signal, with_css=False)}</div>'


def live_js(root: str) -> str:
    """The page's script for the element ``root`` (a CSS selector) holding ``page_html``."""
    return LIVE_JS.replace("#e3rl-live", root)


# The page side: apply edits to the heatmap element. Each segment block is found by its
# data-seg attribute; an appended token goes at the end of its block, as the full render puts it.
LIVE_JS = """
(text) => {
  if (!text) return;
  // the server answered: the views are this run's, no longer the last run's
  for (const el of document.querySelectorAll('.e3rl-stale')) el.classList.remove('e3rl-stale');
  for (const op of JSON.parse(text).ops) {
    if (op.op === 'reset') {
      const box = document.querySelector('#e3rl-live');
      if (!box) return;
      let body = box.querySelector('.e3rl-body');
      if (!body) {  // the element was emptied: give the edits their body back
        body = document.createElement('div');
        body.className = 'e3rl-body';
        box.appendChild(body);
      }
      body.innerHTML = op.html;
      continue;
    }
    const trace = document.querySelector('#e3rl-live .e3rl-trace');
    if (!trace) return;  // edits without the reset they follow (a reloaded page): the last frame redraws
    const block = trace.querySelector(`:scope > .e3rl-seg[data-seg="${op.seg}"]`);
    if (op.op === 'append') {
      block.insertAdjacentHTML('beforeend', op.html);
    } else if (op.op === 'repiece') {
      const open = block.lastElementChild;  // the span of a character's pieces so far
      if (open && open.classList.contains('e3rl-tok')) open.remove();
      block.insertAdjacentHTML('beforeend', op.html);
    } else if (op.op === 'block') {
      const tpl = document.createElement('template');
      tpl.innerHTML = op.html;
      if (block) block.replaceWith(tpl.content);
      else {
        const tail = trace.querySelector(':scope > .e3rl-tail');
        trace.insertBefore(tpl.content, tail);
      }
    } else if (op.op === 'fold') {
      const erased = block.querySelector(`:scope > [data-erased="${op.erased}"]`);
      if (erased) erased.outerHTML = op.html;
    } else if (op.op === 'mark') {
      block.querySelector(':scope > .e3rl-segmark').setAttribute('title', op.title);
      block.querySelector(':scope > .e3rl-segsum').textContent = op.summary;
      if (op.summary) {
        block.classList.add('e3rl-decided');
        block.dataset.n = op.n;
        block.dataset.x = op.x;
      }
    } else if (op.op === 'tail') {
      trace.querySelector(':scope > .e3rl-tail').outerHTML = op.html;
    }
  }
}
"""


def collapse_js(root: str) -> str:
    """The collapse checkbox's script for the heatmap element ``root``: decided segments fold to
    their one-line summary (CSS), and runs of short ones to one line for the run (``FOLD_JS``,
    kept up to date as edits and redraws change the element)."""
    return ("(on) => {" + FOLD_JS.replace("SHORT", str(render.SHORT_SEGMENT_TOKENS)) +
            f"const root = document.querySelector('{root}'); if (!root) return;"
            "root.classList.toggle('e3rl-collapse', on); window.e3rlWatchFold(root, on); }")


# Runs of two or more decided segments of at most SHORT kept tokens each become one line for the
# run ("12–48: 37 one-token segments, 0 erased"); clicking it shows them one per line again. Done in
# the page, not by the render, because a run grows as segments stream in while every live edit
# addresses one segment's block. Recomputed once per animation frame after the element changes.
FOLD_JS = """
window.e3rlFold = (root) => {
  const trace = root.querySelector('.e3rl-trace');
  if (!trace) return;
  for (const el of trace.querySelectorAll(':scope > .e3rl-runsum')) el.remove();
  for (const el of trace.querySelectorAll(':scope > .e3rl-folded')) el.classList.remove('e3rl-folded');
  if (!root.classList.contains('e3rl-collapse')) return;
  const open = root.e3rlOpen || (root.e3rlOpen = new Set());
  let run = [];
  const flush = () => {
    if (run.length >= 2) {
      const ns = run.map((s) => +s.dataset.n), lo = Math.min(...ns), hi = Math.max(...ns);
      const erased = run.reduce((k, s) => k + (+s.dataset.x || 0), 0);
      const size = lo === hi ? (lo === 1 ? 'one-token' : lo + '-token') : 'short (' + lo + '–' + hi + ' tokens)';
      const line = document.createElement('span');
      const first = run[0].dataset.seg;
      line.className = 'e3rl-runsum';
      line.textContent = first + '–' + run[run.length - 1].dataset.seg + ': ' + run.length + ' ' + size +
        ' segments, ' + erased + ' erased';
      line.title = 'click to show these segments one per line';
      line.onclick = () => { open.add(first); window.e3rlFold(root); };
      run[0].before(line);
      for (const s of run) s.classList.add('e3rl-folded');
    }
    run = [];
  };
  let opened = false;  // within a run its user unfolded
  for (const seg of trace.querySelectorAll(':scope > .e3rl-seg')) {
    if (!(seg.classList.contains('e3rl-decided') && +seg.dataset.n <= SHORT)) {
      flush();
      opened = false;
      continue;
    }
    if (run.length === 0 && !opened && open.has(seg.dataset.seg)) opened = true;
    if (!opened) run.push(seg);
  }
  flush();
};
window.e3rlWatchFold = (root, on) => {
  if (root.e3rlObserver) { root.e3rlObserver.disconnect(); root.e3rlObserver = null; }
  window.e3rlFold(root);
  if (!on) return;
  let queued = false;
  const watch = { childList: true, subtree: true };
  const observer = new MutationObserver(() => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      observer.disconnect();
      window.e3rlFold(root);
      observer.observe(root, watch);
    });
  });
  observer.observe(root, watch);
  root.e3rlObserver = observer;
};
"""


# The Generate click, in the page before the server answers: the heatmap scrolls into view, a
# moving bar shows the run is under way (until IDLE_JS), and the last run's views dim until the
# first frame replaces them. A request that fails leaves them dimmed, labelled as the previous run's.
VIEWS = ("#e3rl-heatmap", "#e3rl-summary", "#e3rl-chart")
BUSY_JS = """() => {
  const heat = document.querySelector('#e3rl-heatmap');
  if (!heat) return;
  // the run's views from their top (the rollout picker and legend), unless they are in view already
  const top = heat.getBoundingClientRect().top;
  if (top < 0 || top > window.innerHeight * 0.5) {
    const head = document.querySelector('#e3rl-legend') || heat;
    // the page may end too soon to bring them to the top (its run's views still empty): room first
    const need = head.getBoundingClientRect().top + window.scrollY + window.innerHeight;
    if (document.body.scrollHeight < need) document.body.style.minHeight = need + 'px';
    head.scrollIntoView({block: 'start'});
  }
  heat.classList.add('e3rl-busy');
  for (const sel of %s) document.querySelector(sel)?.classList.add('e3rl-stale');
}""" % json.dumps(list(VIEWS))
IDLE_JS = """() => { document.querySelector('#e3rl-heatmap')?.classList.remove('e3rl-busy'); }"""
FRESH_JS = """() => { for (const el of document.querySelectorAll('.e3rl-stale')) el.classList.remove('e3rl-stale'); }"""
