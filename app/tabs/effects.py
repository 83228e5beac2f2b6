"""The Decision effects tab: was each decision right? It branches from decided
segments (K continuations keeping the segment, K redrawing it) in a background job, and shows the
progress, the aggregates, the calibration plot and a decision's continuations side by side as the
rows arrive; the decisions table gains the effect columns. Public endpoints: ``/start_effects``,
``/stop_effects`` and ``/effects_status``."""
from __future__ import annotations

from typing import Any

import gradio as gr

from e3rl_core.errors import E3RLError
from e3rl_core.evaluation.effect_stats import calibration_figure
from e3rl_core.evaluation.effects import EffectsConfig

from ..audit import trace_labels
from ..effects import aggregates_markdown, detail_html, job_state, progress_markdown
from ..session import resolve
from . import Shared
from .train import visitor

SCOPES = ("selected row", "filtered rows", "all decisions")
"""The decision clicked in the Audit tab's table, the rows its filters keep, every decision."""
NOTHING_PICKED = "selected row: none yet (click a decision in the Audit tab's table)"


def build(shared: Shared, table: gr.Dataframe, filters: list, find: Any, traces_of: Any, rows_of: Any) -> gr.Timer:
    """Lay out the tab's contents (inside the open tab) and wire it; ``table`` is the Audit tab's
    decisions table, whose clicked row is the "selected row". ``find(shown_id, history, loaded)``
    gives a trace, ``traces_of(history, loaded)`` every trace, ``rows_of(*filters)`` the filtered table."""
    manager = shared.effects
    bound = manager.max_rows
    gr.Markdown("### Was each decision right?\n"
                "For each picked decision: K continuations from the segment as it was written (*keep*) and K "
                "with the segment drawn afresh (*redraw*), erasure off, at the trace's sampling settings. "
                "Effect = P(correct | redraw) − P(correct | keep) with a 95% interval; a verdict (*helps* / "
                "*hurts*) only when the interval excludes 0. Needs the gold answer (the Generate tab's gold "
                "field; the synthetic task's questions carry their own)."
                + (f" This Space measures at most {bound} continuations (decisions × 2K) per job." if bound else ""))
    with gr.Row():
        scope = gr.Radio(list(SCOPES), value=SCOPES[0], label="decisions to measure")
        samples = gr.Slider(2, 32, value=EffectsConfig.samples, step=1, label="K continuations per branch")
        with gr.Column(min_width=160):
            start_btn = gr.Button("Measure effects", variant="primary")
            stop_btn = gr.Button("Stop")
    picked_line = gr.Markdown(NOTHING_PICKED, elem_id="e3rl-effects-picked", label="selected row")
    progress = gr.Markdown(elem_id="e3rl-effects-progress", label="progress")
    summary = gr.Markdown(elem_id="e3rl-effects-summary", label="aggregates")
    plot = gr.Plot(label="calibration: score margin U − Θ against measured effect", elem_id="e3rl-effects-plot")
    detail = gr.HTML(elem_id="e3rl-effects-detail", label="keep and redraw continuations")
    picked = gr.State(None)  # the selected table row's decision key
    timer = gr.Timer(2.0, active=False)
    history, loaded = filters[0], filters[1]

    def start_effects(scope: str = SCOPES[0], samples: int = EffectsConfig.samples, picked: str | None = None,
                      history: list | None = None, loaded: Any = None,
                      only_erasures: bool = False, trace_contains: str = "", sort_by: str = "",
                      only_flipped: bool = False, request: gr.Request = None) -> str:
        """Measure the effect of the picked decisions (scope: the selected row, the filtered rows or all
        decisions) with K = samples continuations per branch, as a background job; returns a line."""
        try:
            if scope not in SCOPES:
                raise E3RLError(f"scope must be one of {', '.join(SCOPES)}")
            traces = traces_of(history or [], loaded)
            if scope == SCOPES[0]:
                keys = [picked] if picked else []
                if not keys:
                    raise E3RLError("no row selected: click a decision in the Audit tab's table, or pick "
                                    "'filtered rows'")
            elif scope == SCOPES[1]:
                df = rows_of(history or [], loaded, only_erasures, trace_contains, sort_by, only_flipped)
                keys = [f"{t}/{int(s)}/{int(a)}" for t, s, a in zip(df["trace"], df["segment"], df["attempt"])]
            else:
                keys = [f"{t.trace_id}/{s.segment}/{s.attempt}" for t in traces for s in t.segments]
            wanted = {k.split("/", 1)[0] for k in keys}
            models = sorted({t.start.model for t in traces if t.trace_id in wanted and t.events})
            if len(models) != 1:
                raise E3RLError(f"the picked decisions come from {len(models)} models ({', '.join(models)}); "
                                f"pick decisions of one model" if models else "the picked decisions have no trace")
            shared.check_model(models[0], "branched")
            job = manager.start(traces, keys, int(samples), resolve(models[0]), owner=visitor(request))
        except E3RLError as err:
            return f"⚠️ {err}"
        return f"started {job.name}: {len(keys)} decisions × 2 × {int(samples)} continuations"

    def stop_effects(request: gr.Request = None) -> str:
        """Stop the running decision-effects job after the decision under way (finished rows are kept)."""
        return manager.stop(visitor(request))

    def effects_status(request: gr.Request = None) -> tuple:
        """The newest job's progress line, its aggregates so far and its calibration plot."""
        return status(shared, visitor(request))

    def pick(evt: gr.SelectData, history: list, loaded: Any, request: gr.Request = None) -> tuple:
        row = evt.row_value if getattr(evt, "row_value", None) is not None else None
        if not row:
            return None, "", NOTHING_PICKED
        tr = find(row[0], history, loaded)
        if tr is None:
            return None, "", NOTHING_PICKED
        key = f"{tr.trace_id}/{int(row[2])}/{int(row[3])}"
        line = (f"selected row: segment {int(row[2])}, attempt {int(row[3])} of "
                f"{next((lbl for lbl, v in trace_labels([tr])), tr.trace_id)}")
        return key, detail_html(measured(shared, visitor(request)).get(key)), line

    start_btn.click(start_effects, [scope, samples, picked, *filters], progress, api_name="start_effects").then(
        lambda: gr.Timer(active=True), None, timer, api_visibility="private")
    stop_btn.click(stop_effects, None, progress, api_name="stop_effects")
    timer.tick(effects_status, None, [progress, summary, plot], api_name="effects_status", show_progress="hidden")
    table.select(pick, [history, loaded], [picked, detail, picked_line], api_visibility="private")
    return timer


def measured(shared: Shared, owner: str | None) -> dict[str, dict[str, Any]]:
    """The newest job's rows by decision key (what the table's effect columns and the detail read)."""
    jobs = shared.effects.jobs(owner)
    _, rows = job_state(jobs[0] if jobs else None)
    return {r["key"]: r for r in rows}


def status(shared: Shared, owner: str | None) -> tuple:
    manager = shared.effects
    active = manager.active()
    jobs = manager.jobs(owner)
    job = jobs[0] if jobs else None
    busy = ""
    if active is not None and not manager.owns(active, owner):
        busy = "another visitor's decision-effects job is running; yours can start when it ends\n\n"
    record, rows = job_state(job)
    running = active is not None and job is not None and active.get("job") == job.name
    fig = calibration_figure(rows, f"{len(rows)} decisions") if rows else None
    return busy + progress_markdown(job, record, running), aggregates_markdown(rows), fig


def table_columns(shared: Shared, df: Any, owner: str | None) -> Any:
    """The decisions table with the newest job's effect columns (empty where not measured)."""
    from ..effects import EFFECT_COLUMNS, effect_columns

    rows = list(measured(shared, owner).values())
    if not rows or df.empty:
        return df
    by = effect_columns(rows)
    out = df.copy()
    for col in EFFECT_COLUMNS:
        out[col] = [by.get((t, int(s), int(a)), {}).get(col) for t, s, a in
                    zip(out["trace"], out["segment"], out["attempt"])]
    return out

