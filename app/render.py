"""Events -> what the UI shows: HTML, figures, tables. Pure functions, no gradio import, so every
view is tested without a server; the Gradio wiring (``app/ui.py``) only passes these values on.

``TraceView`` folds one trace's events incrementally (live streaming and step-by-step replay use
the same code); ``trace_html`` draws it as a heatmap of tokens with segment marks and erased
attempts; ``trace_figure`` plots segment scores against thresholds and per-token entropy.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from e3rl_core.events import DoneEvent, EraseEvent, ErrorEvent, Event, SegmentEvent, StartEvent, TokenEvent
from e3rl_core.generation.decision import NEAR_FRACTION, NEAR_MARGIN, margin, near_threshold

SCALE_MAX = {"entropy": 2.0, "surprisal": 3.0}
"""Signal value (nats) drawn at full colour; larger values saturate."""
MAX_TOKEN_CHARS = 200
"""Characters of one token's text drawn (a loaded file's token may hold megabytes; a model's
tokens are a few characters)."""
MAX_TEXT_CHARS = 2000
"""Characters of an answer or an error message shown."""

# Each segment is a block: a token appended to the last one lays out that segment only. Inline
# segments made the whole trace one paragraph that the browser laid out again at every frame
# (measured in Chromium: 2.3 ms at 1k tokens, 17.6 ms at 16k per 16-token edit; as blocks ~1 ms).
CSS = """
.e3rl-scroll{max-height:26em;overflow-y:auto;display:flex;flex-direction:column-reverse;contain:content}
.e3rl-scroll .e3rl-trace{margin-bottom:auto !important;flex:none}
#e3rl-heatmap .e3rl-scroll{max-height:20em}
.e3rl-trace{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:14px;line-height:1.9;white-space:pre-wrap;
  word-break:break-word;padding:8px;border:1px solid #ddd;border-radius:6px;background:#fff;color:#111}
.e3rl-tok,.e3rl-gone{border-radius:3px;padding:1px 0;cursor:help}
.e3rl-seg{display:block;border-left:2px solid #7a7aff;padding-left:2px;margin-left:2px}
.e3rl-segmark{font-size:10px;color:#5555cc;vertical-align:super;margin-right:1px;cursor:help}
.e3rl-erasing{text-decoration:line-through;text-decoration-color:#d00;opacity:.55;animation:e3rl-fade 1.2s ease-in forwards}
@keyframes e3rl-fade{from{opacity:.9;background:#ffd6d6}to{opacity:.35;background:transparent}}
details.e3rl-erased{display:inline;font-size:11px;color:#a33}
details.e3rl-erased summary{display:inline;cursor:pointer;list-style:none;background:#ffe1e1;border:1px solid #e99;
  border-radius:8px;padding:0 4px;margin:0 2px}
details.e3rl-erased s{color:#a33;opacity:.8}
details.e3rl-erased::details-content{display:none}
details.e3rl-erased[open]::details-content{display:inline}
.e3rl-legend{display:flex;align-items:flex-start;gap:8px;font-size:12px;color:#333;margin:4px 0}
.e3rl-legend .scale{display:inline-flex;flex-direction:column;width:180px}
.e3rl-legend .bar{height:10px;border-radius:3px;border:1px solid #ccc;
  background:linear-gradient(90deg,rgb(255,255,255),rgb(255,226,120),rgb(232,62,50))}
.e3rl-legend .ticks{display:flex;justify-content:space-between;font-size:11px;color:#555}
.e3rl-stopped{color:#a60;font-size:12px;margin-left:4px}
.e3rl-offstage{display:none !important}
details.e3rl-erased[data-near] summary{border-style:dashed;background:#fff3d6;border-color:#d9a400}
.e3rl-gone{text-decoration:line-through;text-decoration-color:#d00}
.e3rl-why{font-family:system-ui,sans-serif;font-size:11px;color:#a33;background:#fff0f0;border-radius:6px;
  padding:0 4px;margin:0 3px;white-space:nowrap}
.e3rl-nearmark{color:#8a6500;font-weight:600}
.e3rl-segsum{display:none;color:#5555cc;font-size:12px}
.e3rl-collapse .e3rl-seg.e3rl-decided{display:block;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.e3rl-collapse .e3rl-seg.e3rl-decided > :not(.e3rl-segmark):not(.e3rl-segsum){display:none}
.e3rl-collapse .e3rl-seg.e3rl-decided > .e3rl-segsum{display:inline}
.e3rl-collapse .e3rl-seg.e3rl-folded{display:none}
.e3rl-runsum{display:none}
.e3rl-collapse .e3rl-runsum{display:block;color:#5555cc;font-size:12px;cursor:pointer;white-space:nowrap;
  overflow:hidden;text-overflow:ellipsis;border-left:2px dotted #7a7aff;padding-left:4px;margin-left:2px}
#e3rl-heatmap.e3rl-busy{position:relative}
#e3rl-heatmap.e3rl-busy::before{content:"";position:absolute;top:0;left:0;height:3px;width:30%;z-index:5;
  background:#7a7aff;border-radius:2px;animation:e3rl-run 1.1s ease-in-out infinite alternate}
@keyframes e3rl-run{from{left:0}to{left:70%}}
.e3rl-stale{opacity:.45;transition:opacity .2s}
#e3rl-heatmap.e3rl-stale:not(.e3rl-busy)::after{content:"⚠ the last request failed (see its message): this is the previous run";
  display:block;color:#a33;font-size:12px}
#e3rl-heatmap.e3rl-busy.e3rl-stale::after{content:"generating… (the model loads on its first use)";display:block;
  color:#5555cc;font-size:12px}
details.e3rl-prompt pre{white-space:pre-wrap;max-height:16em;overflow:auto;font-size:12px;background:#f6f6f6;padding:6px}
"""
SHORT_SEGMENT_TOKENS = 4
"""In the collapsed view, a run of two or more decided segments of at most this many kept tokens
folds into one line ("37 one-token segments, 0 erased"): a segment's one-line summary is no shorter
than its text, so a trace of many tiny segments would otherwise collapse to no shorter a view."""


@dataclass
class Attempt:
    segment: int
    attempt: int
    tokens: list[TokenEvent] = field(default_factory=list)
    decision: SegmentEvent | None = None
    erased: EraseEvent | None = None

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


@dataclass
class TraceView:
    """One trace folded from its events, attempt by attempt."""

    start: StartEvent | None = None
    attempts: list[Attempt] = field(default_factory=list)
    done: DoneEvent | None = None
    error: ErrorEvent | None = None
    last_erased: tuple[int, int] | None = None
    """The most recently erased (segment, attempt), shown struck through until its retry is decided."""
    stopped: bool = False
    """Cut short by Stop before its done event (``stop``)."""
    n_events: int = 0

    def apply(self, ev: Event) -> None:
        self.n_events += 1
        if isinstance(ev, StartEvent):
            self.start = ev
        elif isinstance(ev, TokenEvent):
            self._attempt(ev.segment, ev.attempt).tokens.append(ev)
        elif isinstance(ev, SegmentEvent):
            self._attempt(ev.segment, ev.attempt).decision = ev
            if self.last_erased and self.last_erased[0] == ev.segment and ev.decision != "erase":
                self.last_erased = None
        elif isinstance(ev, EraseEvent):
            self._attempt(ev.segment, ev.attempt).erased = ev
            self.last_erased = (ev.segment, ev.attempt)
        elif isinstance(ev, DoneEvent):
            self.done, self.last_erased = ev, None
        elif isinstance(ev, ErrorEvent):
            self.error = ev

    def stop(self) -> None:
        """Mark the trace stopped where it stands: an erased attempt folds into its ✂ marker (it
        was erased; only its retry is cut short), and the summary says where it stopped."""
        self.stopped, self.last_erased = True, None

    def generated(self) -> int:
        """Tokens generated so far, erased ones included."""
        return sum(len(a.tokens) for a in self.attempts)

    def _attempt(self, segment: int, attempt: int) -> Attempt:
        for a in reversed(self.attempts):
            if a.segment == segment and a.attempt == attempt:
                return a
        a = Attempt(segment, attempt)
        self.attempts.append(a)
        return a

    @property
    def trace_id(self) -> str:
        return self.start.trace_id if self.start else ""

    def kept_tokens(self) -> list[TokenEvent]:
        return [t for a in self.attempts if a.erased is None for t in a.tokens]

    def erasures(self) -> list[Attempt]:
        return [a for a in self.attempts if a.erased is not None]


def fold(events: Iterable[Event]) -> dict[str, TraceView]:
    """Trace id -> TraceView, in order of appearance."""
    views: dict[str, TraceView] = {}
    for ev in events:
        views.setdefault(ev.trace_id, TraceView()).apply(ev)
    return views


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out."""
    return text if len(text) <= limit else f"{text[:limit]}… [{len(text) - limit:,} more characters]"


# ------------------------------------------------------------------------ colours
def colour(value: float, signal: str = "entropy") -> str:
    """White -> amber -> red as the signal goes from 0 to SCALE_MAX (saturating)."""
    t = max(0.0, min(1.0, value / SCALE_MAX.get(signal, 2.0)))
    stops = [(255, 255, 255), (255, 226, 120), (232, 62, 50)]
    if t <= 0.5:
        a, b, u = stops[0], stops[1], t / 0.5
    else:
        a, b, u = stops[1], stops[2], (t - 0.5) / 0.5
    r, g, bl = (round(x + (y - x) * u) for x, y in zip(a, b))
    return f"rgb({r},{g},{bl})"


def legend_html(signal: str = "entropy") -> str:
    """The colour scale (its labels under the bar, at the values the bar's left, middle and right
    edge stand for) and what the marks mean."""
    top = SCALE_MAX.get(signal, 2.0)
    name = "entropy H" if signal == "entropy" else "surprisal −log p"
    return (f'<div class="e3rl-legend"><span>{name}:</span>'
            f'<span class="scale"><span class="bar"></span><span class="ticks"><span>0</span><span>{top / 2:g}</span>'
            f"<span>≥ {top:g} nats</span></span></span>"
            "<span>│ segment start · ✂ erased attempt (click: its tokens, U vs Θ and why) · "
            "<span class='e3rl-nearmark'>≈</span> decided by a hair (|U − Θ| under "
            f"{NEAR_FRACTION:.0%} of Θ or {NEAR_MARGIN:g} nats)</span></div>")


def token_title(t: TokenEvent) -> str:
    lines = [f"entropy {t.entropy:.3f} · surprisal {t.surprisal:.3f} nats",
             f"segment {t.segment}, attempt {t.attempt}, position {t.index}"]
    if t.top:
        lines.append("top: " + ", ".join(f"{clip(str(text), 40)!r} {p:.3f}" for _, text, p in t.top))
    return "\n".join(lines)


def pieces(tokens: Sequence[TokenEvent]) -> list[list[TokenEvent]]:
    """Tokens grouped as drawn: a token whose text is empty (a byte of a character that a later
    token completes, in byte-level BPE) joins the tokens up to the one that completes it, so the
    character is one visible span; every other token is a group of its own. Trailing pieces of a
    character not completed yet form the last group."""
    groups: list[list[TokenEvent]] = []
    open_group = False  # the last group still waits for the token that completes its character
    for t in tokens:
        if open_group:
            groups[-1].append(t)
        else:
            groups.append([t])
        open_group = t.text == ""
    return groups


def group_title(group: Sequence[TokenEvent]) -> str:
    """The hover card of one drawn span: its token's, or each piece's of a multi-token character."""
    if len(group) == 1:
        return token_title(group[0])
    head = f"{len(group)} tokens, one character (byte pieces):"
    return "\n\n".join([head, *(f"piece {i + 1}: " + token_title(t) for i, t in enumerate(group))])


def tokens_html(tokens: Sequence[TokenEvent], signal: str = "entropy", erased: bool = False) -> str:
    """Tokens as coloured spans with their signals on hover (byte pieces of one character as one);
    ``erased``: an erased attempt's, of class ``e3rl-gone`` (drawn alike, struck through), so that
    ``.e3rl-tok`` still means the trace's own tokens."""
    cls = "e3rl-gone" if erased else "e3rl-tok"
    out = []
    for group in pieces(tokens):
        # a multi-token character is coloured by its most uncertain piece
        value = max(float(t.entropy if signal == "entropy" else t.surprisal) for t in group)
        text = "".join(str(t.text) for t in group) or "\ufffd"  # pieces of a character still incomplete
        out.append(f'<span class="{cls}" style="background:{colour(value, signal)}" '
                   f'title="{html.escape(group_title(group), quote=True)}">'
                   f"{html.escape(clip(text, MAX_TOKEN_CHARS))}</span>")
    return "".join(out)


REASONS = {
    "above_threshold": "U over Θ",
    "below_threshold": "U under Θ",
    "warmup": "warm-up: no threshold yet",
    "no_threshold": "no threshold (policy none)",
    "disabled": "erasure off",
    "budget": "over Θ, kept: this segment's Erase@K budget is spent",
    "trace_cap": "over Θ, kept: the trace's erasure cap is reached",
    "restored": "a restored earlier attempt",
    "fallback": "an earlier attempt scored lower: restored",
}
"""A decision's reason in words (the rule is e3rl_core.generation.decision's)."""


def _margin_text(d: SegmentEvent) -> str:
    m = margin(d.score, d.threshold)
    if m is None:
        return ""
    near = " ≈ by a hair" if near_threshold(d.score, d.threshold) else ""
    return f", margin {m:+.3f}{near}"


def _decision_text(d: SegmentEvent | None, stopped: bool = False) -> str:
    """A decision on one line: U against Θ, the margin (marked when near), the decision and why."""
    if d is None:
        return "not decided (stopped)" if stopped else "generating"
    thr = "none yet" if d.threshold is None else f"{d.threshold:.3f}"
    why = REASONS.get(str(d.reason), str(d.reason))
    return f"U={d.score:.3f}, Θ={thr}{_margin_text(d)}: {d.decision} ({why})"


def is_near(a: Attempt) -> bool:
    """The attempt's decision was taken by a hair (``near_threshold``)."""
    d = a.decision
    return d is not None and near_threshold(d.score, d.threshold)


def segments(view: TraceView) -> dict[int, list[Attempt]]:
    """Segment index -> its attempts in order, segments in order of appearance."""
    by_segment: dict[int, list[Attempt]] = {}
    for a in view.attempts:
        by_segment.setdefault(a.segment, []).append(a)
    return by_segment


def segment_title(view: TraceView, seg: int, attempts: Sequence[Attempt]) -> str:
    """The hover text of a segment's mark: its latest attempt's score, threshold and decision."""
    return f"segment {seg}: " + _decision_text(attempts[-1].decision, view.stopped)


def segment_summary(attempts: Sequence[Attempt]) -> str:
    """A decided segment on one line (what a collapsed segment shows): its score against its
    threshold, the decision, how many attempts were erased, its tokens; "" while it is open."""
    last = attempts[-1]
    d = last.decision
    if d is None or last.erased is not None:
        return ""
    thr = "none" if d.threshold is None else f"{d.threshold:.3f}"
    erased = sum(a.erased is not None for a in attempts)
    forced = f" ({REASONS[d.reason]})" if d.decision == "forced_accept" and d.reason in REASONS else ""
    near = " ≈" if is_near(last) else ""
    return (f" U={d.score:.3f} vs Θ={thr}{near}: {d.decision}{forced} · {erased} erased · "
            f"{len(last.tokens)} tokens ")


def segment_html(view: TraceView, seg: int, attempts: Sequence[Attempt], signal: str = "entropy") -> str:
    """One segment's block: its mark, then each attempt (erased ones struck through while their
    retry streams in, then folded into ✂), the streaming or kept attempt's tokens last."""
    sid = html.escape(str(seg), quote=True)  # loaded files are not type-checked: escape everything
    mark = html.escape(segment_title(view, seg, attempts), quote=True)
    summary = segment_summary(attempts)
    decided = " e3rl-decided" if summary else ""
    # a decided segment's kept and erased counts: what the collapsed view folds runs of short ones by
    counts = f' data-n="{len(attempts[-1].tokens)}" data-x="{len(attempts) - 1}"' if summary else ""
    parts = [f'<span class="e3rl-seg{decided}" data-seg="{sid}"{counts}><span class="e3rl-segmark" '
             f'title="{mark}">{sid}</span><span class="e3rl-segsum">{html.escape(summary)}</span>']
    for a in attempts:
        if a.erased is None:
            parts.append(tokens_html(a.tokens, signal))
        else:
            parts.append(erased_html(a, folded=view.last_erased != (a.segment, a.attempt), signal=signal))
    parts.append("</span>")
    return "".join(parts)


def erased_id(a: Attempt) -> str:
    """An erased attempt's ``data-erased`` value: segment.attempt."""
    return f"{a.segment}.{a.attempt}"


def erased_html(a: Attempt, folded: bool, signal: str = "entropy") -> str:
    """An erased attempt, drawn as kept tokens are (coloured by ``signal``, each token's numbers on
    hover) and struck through: so while its retry streams in, then (``folded``) inside an
    expandable ✂ marker that also says, inline, its U against Θ, the margin and why. A decision
    taken by a hair (``near_threshold``) is marked ≈ on the marker."""
    aid = html.escape(erased_id(a), quote=True)
    tokens = tokens_html(a.tokens, signal, erased=True)
    if not folded:
        return f'<span class="e3rl-erasing" data-erased="{aid}">{tokens}</span>'
    why = html.escape(_decision_text(a.decision), quote=True)
    near = is_near(a)
    return (f'<details class="e3rl-erased" data-erased="{aid}"{" data-near" if near else ""}>'
            f'<summary title="{why}">✂{"≈" if near else ""}</summary>{tokens}'
            f'<span class="e3rl-why">{html.escape(_decision_text(a.decision))}</span></details>')


def tail_html(view: TraceView) -> str:
    """What follows the last segment: the stopped mark and the error, in one element (the live
    view replaces it whole)."""
    parts = ['<span class="e3rl-tail">']
    if view.stopped:
        parts.append(f'<span class="e3rl-stopped">■ stopped at token {view.generated()}</span>')
    if view.error:
        message = html.escape(clip(str(view.error.message), MAX_TEXT_CHARS))
        parts.append(f'<div style="color:#b00">error: {message}</div>')
    parts.append("</span>")
    return "".join(parts)


def trace_html(view: TraceView, signal: str = "entropy", with_css: bool = True) -> str:
    """The trace as a token heatmap: segments marked, erased attempts struck through while their
    retry streams in, then folded into an expandable ✂ marker in front of the kept attempt. The
    head, ``segment_html`` of each segment and ``tail_html``, concatenated (``app.live`` sends
    the same pieces as edits)."""
    parts = [f"<style>{CSS}</style>"] if with_css else []
    parts.append('<div class="e3rl-scroll"><div class="e3rl-trace">')
    parts += [segment_html(view, seg, attempts, signal) for seg, attempts in segments(view).items()]
    parts.append(tail_html(view))
    parts.append("</div></div>")
    return "".join(parts)


def summary_markdown(view: TraceView, seconds: float | None = None, first_token_s: float | None = None,
                     group_tokens: int | None = None, warning: str | None = None) -> str:
    """Answer with ✓/✗ (when the gold answer is known) and the counts; the rate is over the whole
    group's tokens when ``group_tokens`` is given (all rows are generated together). ``warning``:
    a line shown first (a prompt the model cannot fully read)."""
    kept = len(view.kept_tokens())
    generated = view.generated()
    erasures = len(view.erasures())
    lines: list[str] = [f"⚠ **{_escape_md(warning)}**"] if warning else []
    if view.stopped:
        lines.append(f"**Answer:** _stopped at token {generated}_ (no answer)")
    elif view.done:
        mark = "" if view.done.correct is None else (" ✓" if view.done.correct else " ✗")
        known = view.done.answer if view.start is None or view.start.gold is None else view.start.gold
        gold = f" (gold {_answer(known)})" if view.done.correct is not None else ""
        lines.append(f"**Answer:** `{_answer(view.done.answer)}`{mark}{gold}")
    else:
        lines.append("**Answer:** _generating…_")
    stats = f"tokens generated {generated}, kept {kept}, erasures {erasures}"
    if seconds:
        rate = (group_tokens if group_tokens is not None else generated) / seconds
        stats += f", {seconds:.2f} s ({rate:.0f} tok/s{' for the group' if group_tokens is not None else ''})"
    if first_token_s is not None:
        stats += f", first token after {first_token_s:.2f} s"
    lines.append(stats)
    lines += limits_lines(view)
    return "  \n".join(lines)


def limits_lines(view: TraceView) -> list[str]:
    """What the summary says of the decisions a limit or a hair decided: the trace's erasure cap
    reached (and from which segment on it kept segments over Θ), segments kept over Θ because their
    Erase@K budget was spent, and decisions taken within the near-threshold margin."""
    decided = [a for a in view.attempts if a.decision is not None]
    capped = [a for a in decided if a.decision.reason == "trace_cap"]
    budget = [a for a in decided if a.decision.reason == "budget"]
    near = [a for a in decided if is_near(a)]
    out = []
    if capped:
        out.append(f"⚠ the trace's erasure cap ({len(view.erasures())} erasures) was reached: {len(capped)} later segment(s) over Θ kept "
                   f"unerased, from segment {capped[0].segment} on (forced_accept, trace_cap)")
    if budget:
        out.append(f"{len(budget)} segment(s) kept over Θ with their Erase@K budget spent (forced_accept, budget)")
    if near:
        erased = sum(a.erased is not None for a in near)
        out.append(f"≈ {len(near)} decision(s) by a hair (|U − Θ| < {NEAR_FRACTION:.0%} of Θ or {NEAR_MARGIN:g}), "
                   f"{erased} of them erasures")
    return out


def _escape_md(text: str) -> str:
    """Text shown literally in markdown (a warning quotes the prompt's characters)."""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|~" else c for c in text)


def _answer(text: object) -> object:
    """An answer as shown: a loaded file's may be any length."""
    return clip(text, MAX_TEXT_CHARS) if isinstance(text, str) else text


def _panel_layout(titles: Sequence[str], rows: int, cols: int, height: int) -> dict:
    """A plain layout dict for a grid of panels with titles. Built by hand rather than with
    ``make_subplots`` and a named template: the chart is redrawn while tokens stream, and a light
    figure costs a few ms to build and little to draw (measured in scripts/bench_app.py)."""
    layout: dict[str, Any] = dict(height=height, margin=dict(l=40, r=10, t=40, b=30), plot_bgcolor="#fff",
                                  paper_bgcolor="#fff", legend=dict(orientation="h", y=-0.18), annotations=[])
    gap_y, gap_x = 0.24 if rows > 1 else 0.0, 0.04 if cols > 1 else 0.0
    h, w = (1 - gap_y * (rows - 1)) / rows, (1 - gap_x * (cols - 1)) / cols
    for i, title in enumerate(titles):
        r, c = divmod(i, cols)
        n = "" if i == 0 else str(i + 1)
        y1 = 1 - r * (h + gap_y)
        x0 = c * (w + gap_x)
        # exponents as 1e-8, not SI suffixes (plotly's default reads a tiny loss as "−20n")
        axis = dict(gridcolor="#eee", zerolinecolor="#ddd", linecolor="#ccc", exponentformat="e")
        layout[f"xaxis{n}"] = dict(axis, domain=[x0, x0 + w], anchor=f"y{n}")
        layout[f"yaxis{n}"] = dict(axis, domain=[y1 - h, y1], anchor=f"x{n}")
        layout["annotations"].append(dict(text=title, x=x0 + w / 2, y=y1, xref="paper", yref="paper",
                                          xanchor="center", yanchor="bottom", showarrow=False, font=dict(size=14)))
    return layout


MAX_CHART_POINTS = 2000
"""Points per token series drawn; a longer trace's series keeps each stretch's lowest and highest
value (its envelope), so a 16k-token chart costs what a 2k one does and no spike is lost."""


def downsample(xs: Sequence[float], ys: Sequence[float], limit: int = MAX_CHART_POINTS) -> tuple[list, list]:
    """At most ``limit`` points of a series in x order: all of them when they fit, else the lowest
    and the highest point of each of ``limit // 2`` consecutive stretches."""
    n = len(xs)
    if n <= limit:
        return list(xs), list(ys)
    size = -(-n // (limit // 2))
    out_x, out_y = [], []
    for i in range(0, n, size):
        bucket = range(i, min(i + size, n))
        lo, hi = min(bucket, key=ys.__getitem__), max(bucket, key=ys.__getitem__)
        for j in sorted({lo, hi}):
            out_x.append(xs[j])
            out_y.append(ys[j])
    return out_x, out_y


def figure_spec(view: TraceView, signal: str = "entropy") -> dict:
    """The chart of one trace as a plotly JSON dict: segment score U_n vs threshold Θ_n per
    attempt (kept ● and erased ✕ as two legend entries), and the chosen signal per generated token
    (kept tokens as a line, erased ones as grey dots; each series ``downsample``d to its envelope
    past MAX_CHART_POINTS). Every kind of mark has its legend entry, and the segment axis is
    labelled in whole segments."""
    decided = [a for a in view.attempts if a.decision is not None]
    xs = [a.segment + 0.12 * a.attempt for a in decided]  # an attempt sits just right of its segment
    with_thr = [(x, a) for x, a in zip(xs, decided) if a.decision.threshold is not None]
    base = [(x, a) for x, a in zip(xs, decided) if a.decision.baseline is not None]
    kept_steps, kept_vals, er_steps, er_vals = [], [], [], []
    for a in view.attempts:
        for t in a.tokens:
            (er_steps if a.erased else kept_steps).append(t.step)
            (er_vals if a.erased else kept_vals).append(t.entropy if signal == "entropy" else t.surprisal)
    kept_steps, kept_vals = downsample(kept_steps, kept_vals)
    er_steps, er_vals = downsample(er_steps, er_vals)

    def scores(erased: bool, name: str, colour_: str, symbol: str) -> dict:
        pts = [(x, a) for x, a in zip(xs, decided) if bool(a.erased) == erased]
        return dict(type="scatter", x=[x for x, _ in pts], y=[a.decision.score for _, a in pts], mode="markers",
                    name=name, marker=dict(size=9, color=colour_, symbol=symbol),
                    text=[f"segment {a.segment} attempt {a.attempt}: {a.decision.decision} ({a.decision.reason})"
                          for _, a in pts], hoverinfo="text+y")

    data = [
        scores(False, "U_n, kept", "#1f77b4", "circle"),
        scores(True, "U_n, erased", "#d62728", "x"),
        dict(type="scatter", x=[x for x, _ in with_thr], y=[a.decision.threshold for _, a in with_thr],
             mode="lines+markers", name="Θ_n", line=dict(color="#ff7f0e", dash="dash"), marker=dict(size=5)),
        dict(type="scatter", x=[x for x, _ in base], y=[a.decision.baseline for _, a in base], mode="lines",
             name="group baseline β_n", line=dict(color="#999", width=1)),
        dict(type="scatter", x=kept_steps, y=kept_vals, mode="lines", name=f"{signal} (kept)",
             line=dict(color="#2ca02c", width=1), xaxis="x2", yaxis="y2"),
        dict(type="scatter", x=er_steps, y=er_vals, mode="markers", name=f"{signal} (erased)",
             marker=dict(color="#bbb", size=4), xaxis="x2", yaxis="y2"),
    ]
    for trace in data:
        trace["showlegend"] = True  # listed even before it has a point, so the legend never shifts
    layout = _panel_layout(("segment score U_n vs threshold Θ_n", f"per-token {signal}"), 2, 1, 480)
    n_segments = max((a.segment for a in view.attempts if isinstance(a.segment, int)), default=0) + 1
    layout["xaxis"].update(title=dict(text="segment (an erased attempt's retry sits just right of it)"),
                           tick0=0, dtick=nice_step(n_segments / 20), tickformat="d",  # ≤ 20 round ticks
                           range=[-0.5, n_segments - 0.5])
    layout["xaxis2"]["title"] = dict(text="generation step")
    layout["yaxis"]["title"] = dict(text="score")
    layout["yaxis2"]["title"] = dict(text="nats")
    layout["legend"] = dict(orientation="h", y=-0.2, yanchor="top")
    layout["margin"]["b"] = 90
    return dict(data=data, layout=layout)


def nice_step(raw: float) -> int:
    """The smallest whole 1, 2 or 5 x 10^k at least ``raw`` (at least 1): an axis's tick step."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if step * m >= raw:
                return step * m
        step *= 10


TRAINING_KEYS = (("reward_mean", "reward"), ("accuracy", "accuracy"), ("erase_rate", "erase rate"),
                 ("entropy_mean", "entropy"), ("loss", "loss"))


SMOOTHING = 10
"""Steps in the moving mean drawn over each training curve: one step's reward is the mean of a few
groups and swings widely, so the trend is in the mean."""


def moving_mean(values: Sequence[float | None], window: int = SMOOTHING) -> list[float | None]:
    """Trailing mean over the last ``window`` values (fewer at the start; missing values skipped)."""
    out: list[float | None] = []
    for i in range(len(values)):
        seen = [v for v in values[max(0, i - window + 1): i + 1] if isinstance(v, (int, float)) and math.isfinite(v)]
        out.append(sum(seen) / len(seen) if seen else None)
    return out


def training_spec(rows: Sequence[dict], window: int = SMOOTHING) -> dict:
    """Training curves (one panel per metric of ``TRAINING_KEYS``) from log.jsonl rows: each step
    as a faint dot and line, and a ``window``-step moving mean over them."""
    steps = [r["step"] for r in rows]
    data = []
    for i, (k, _) in enumerate(TRAINING_KEYS):
        axes = dict(xaxis=f"x{'' if i == 0 else i + 1}", yaxis=f"y{'' if i == 0 else i + 1}")
        ys = [r.get(k) for r in rows]
        data.append(dict(type="scatter", x=steps, y=ys, mode="lines+markers", showlegend=False, name="per step",
                         opacity=0.35, line=dict(width=1, color="#1f77b4"), marker=dict(size=4), **axes))
        data.append(dict(type="scatter", x=steps, y=moving_mean(ys, window), mode="lines", showlegend=False,
                         name=f"{window}-step mean", line=dict(width=2.5, color="#1f77b4"), **axes))
    return dict(data=data, layout=_panel_layout([t for _, t in TRAINING_KEYS], 1, len(TRAINING_KEYS), 260))


def as_figure(spec: dict) -> Any:
    """A plotly ``Figure`` of a spec (what ``gr.Plot`` takes)."""
    import plotly.graph_objects as go

    return go.Figure(spec)


def trace_figure(view: TraceView, signal: str = "entropy") -> Any:
    """``figure_spec`` as a plotly ``Figure``."""
    return as_figure(figure_spec(view, signal))


def group_markdown(views: Sequence[TraceView]) -> str:
    """One line per rollout of a group: answer, erasures, and the group baseline of the last decision."""
    rows = ["| rollout | answer | erasures | tokens kept | last β_n |", "|---|---|---|---|---|"]
    for i, v in enumerate(views):
        last = next((a.decision for a in reversed(v.attempts) if a.decision is not None), None)
        ans = f"`{_answer(v.done.answer)}`" if v.done else ("_stopped_" if v.stopped else "…")
        mark = "" if not v.done or v.done.correct is None else (" ✓" if v.done.correct else " ✗")
        beta = "–" if last is None or last.baseline is None else f"{last.baseline:.3f}"
        rows.append(f"| {i} | {ans}{mark} | {len(v.erasures())} | {len(v.kept_tokens())} | {beta} |")
    return "\n".join(rows)


MAX_PROMPT_CHARS = 1500
"""Characters shown of each end of a long prompt (the template's head and the question's tail,
where a chat template's thinking switch writes)."""


def prompt_markdown(view: TraceView) -> str:
    """The prompt as the model read it (after the chat template), folded under the summary: how a
    researcher checks what the thinking switch or the task template did."""
    if view.start is None:
        return ""
    text = str(view.start.prompt)
    if len(text) > 2 * MAX_PROMPT_CHARS:
        text = (f"{text[:MAX_PROMPT_CHARS]}\n… [{len(text) - 2 * MAX_PROMPT_CHARS:,} characters] …\n"
                f"{text[-MAX_PROMPT_CHARS:]}")
    n = len(view.start.prompt_ids or [])
    return (f"\n\n<details class='e3rl-prompt'><summary>prompt as the model read it ({n} tokens, after the "
            f"template)</summary><pre>{html.escape(text)}</pre></details>")
