"""The Audit tab: every recorded decision of this session (and of loaded trace files) as a table to
filter, sort and export; a step-by-step replay of one trace; and the what-if, which re-judges its
group's recorded decisions under other thresholds."""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from e3rl_core.errors import E3RLError
from e3rl_core.events import Trace, group_traces
from e3rl_core.generation.config import ThresholdConfig
from e3rl_core.generation.thresholds import POLICIES

from .. import audit, render
from ..session import replay_view
from . import Shared
from . import effects as effects_section
from .train import visitor

# What-if controls the recorded settings are read into; a trace that lacks one starts at the default.
WHAT_IF = ("policy", "kappa", "penalty_lambda", "value")
TRACES_TTL_S = 3 * 3600
"""How long a session's loaded traces are kept after its last load, however long its page stays
open (a closed page frees them at once: ``end_session``)."""


def build(shared: Shared, traces_ttl_s: float = TRACES_TTL_S) -> tuple[gr.Tab, gr.Tab, gr.Timer]:
    """The Audit tab, the Decision effects tab (``tabs.effects``, which reads the Audit table's
    picked row) and the effects' timer (active while that tab is open; ``app.ui`` switches it).
    Public endpoints: ``/load_traces``, ``/decisions``, ``/replay``, ``/what_if``,
    ``/export_audit`` and the decision effects'; every other listener only keeps the page in step
    and is private.

    What is not on screen costs nothing: the table, the trace list, the replay and the what-if are
    computed when the tab opens or the user acts, never as generations finish in another tab, and
    the page holds one page of a table at a time (``audit.PAGE_ROWS`` rows; ``/decisions`` and
    ``/what_if`` give every row)."""
    history = shared.session_events
    with gr.Tab("Audit", id="audit", elem_id="e3rl-audit-tab") as tab:
        # traces loaded from files, in this browser session (an audit.LoadedTraces, None until a load)
        loaded = gr.State(None, time_to_live=traces_ttl_s, delete_callback=audit.release)
        with gr.Row():
            upload = gr.File(label="load a trace file (.jsonl or .jsonl.gz)", file_types=[".jsonl", ".gz"],
                             type="filepath")
            refresh = gr.Button("refresh from this session")
        load_msg = gr.Markdown(label="message")
        with gr.Row():
            only_erasures = gr.Checkbox(label="only erasures")
            only_flipped = gr.Checkbox(label="only erasures that flipped the answer (needs a counterfactual)")
            trace_filter = gr.Textbox("", label="trace id contains")
            sort_by = gr.Dropdown(["", *SORTABLE], value="", label="sort by (descending)")
        # one line per decision (long text cells scroll sideways); numbers shown to 4 places, exported in full
        table = gr.Dataframe(pd.DataFrame(columns=audit.COLUMNS), interactive=False, wrap=False, max_height=480,
                             elem_id="e3rl-audit", label="decisions (click a row: replay its trace below)")
        page, page_msg, pager = _pager("e3rl-audit-page")
        with gr.Row():
            with gr.Column(scale=1, min_width=200):
                gz = gr.Checkbox(label="gzip the JSONL files (.jsonl.gz)")
                export_btn = gr.Button("export the table (CSV, JSONL) and its traces")
            export_files = gr.File(label="exports", file_count="multiple", scale=2)
        gr.Markdown("### Replay a trace step by step")
        with gr.Row():
            # custom values: a script may name any trace of the session (see /replay and /what_if)
            replay_trace = gr.Dropdown([], value=None, label="trace (or click a row of the table)",
                                       allow_custom_value=True, elem_id="e3rl-replay-trace")
            replay_step = gr.Slider(0, 1, value=1, step=1, label="events shown")
        replay_html = gr.HTML(elem_id="e3rl-replay", label="heatmap")
        what_if_controls, wi_table, wi_msg = _what_if_panel()
        wi_page, wi_page_msg, wi_pager = _pager("e3rl-whatif-page")
        # Endpoints for scripts, on buttons nobody sees: every row, where the page shows one page.
        api_btn = gr.Button("decisions (API)", elem_classes=["e3rl-offstage"])
        api_wi_btn = gr.Button("what-if (API)", elem_classes=["e3rl-offstage"])
        api_table = gr.Dataframe(visible=False, label="decisions")
        api_wi_table = gr.Dataframe(visible=False, label="recorded and re-judged decisions")
        filters = [history, loaded, only_erasures, trace_filter, sort_by, only_flipped]
    with gr.Tab("Decision effects", id="effects", elem_id="e3rl-effects-tab") as effects_tab:
        effects_timer = effects_section.build(shared, table, filters, find_trace, all_traces, table_for)

    def decisions(history: list, loaded: audit.LoadedTraces | None, only_erasures: bool = False,
                  trace_contains: str = "", sort_by: str = "", only_flipped: bool = False,
                  request: gr.Request = None) -> pd.DataFrame:
        """Every recorded decision of this session's generations and loaded trace files, one row each:
        only_erasures / only_flipped keep erasures (that flipped the answer against the recorded
        counterfactual); trace_contains keeps traces whose id contains it; sort_by names a column
        (sorted descending). With a decision-effects job, its effect columns (effect, its interval,
        verdict, P(correct) of each branch). Numbers shown to 4 places, long texts cut (the export
        keeps both whole)."""
        df = table_for(history, loaded, only_erasures, trace_contains, sort_by, only_flipped)
        return audit.display_frame(effects_section.table_columns(shared, df, visitor(request)).round(4))

    def show_page(history: list, loaded: audit.LoadedTraces | None, only_erasures: bool, trace_contains: str,
                  sort_by: str, only_flipped: bool, page: int, request: gr.Request = None) -> tuple:
        """The page's table: one page of ``decisions``, the line saying which, and the page shown."""
        df = table_for(history, loaded, only_erasures, trace_contains, sort_by, only_flipped)
        part, page, pages = audit.page_of(df, page)
        shown = audit.display_frame(effects_section.table_columns(shared, part, visitor(request)).round(4))
        return shown, audit.page_line(len(df), page, pages), gr.update(value=page, maximum=pages)

    choices = ([replay_trace, history, loaded], replay_trace)
    private: dict = dict(api_visibility="private")
    paged = dict(fn=show_page, inputs=[*filters, page], outputs=[table, page_msg, page], **private)
    first_page = dict(fn=lambda *a, **k: show_page(*a[:-1], 1, **k), inputs=[*filters, page],
                      outputs=[table, page_msg, page], **private)
    api_btn.click(decisions, filters, api_table, api_name="decisions")
    refresh.click(**paged).then(trace_choices, *choices, **private)
    # Opening the tab shows the session's decisions as they are now (generated in the other tab).
    tab.select(**paged).then(trace_choices, *choices, **private)
    # The filters apply as they change, from the first page: the trace filter on every keystroke
    # (the latest one wins).
    for trigger in (only_erasures.change, trace_filter.change, sort_by.change, only_flipped.change):
        trigger(**first_page, show_progress="hidden", trigger_mode="always_last")
    _wire_pager(pager, page, paged)
    # Unprocessed, so the handler sees the upload's original name (gradio still checks that the
    # file is one uploaded to this server); and gradio's filepath processing would leave an empty
    # temporary file behind per upload.
    upload.upload(load_traces, [upload, loaded, history, only_erasures, trace_filter, sort_by, only_flipped],
                  [loaded, load_msg, table, replay_trace, upload], api_name="load_traces", preprocess=False).then(
        trace_choices, *choices, **private).then(**first_page)
    table.select(select_row, None, replay_trace, **private)

    def export_audit(history: list, loaded: audit.LoadedTraces | None, only_erasures: bool = False,
                     trace_contains: str = "", sort_by: str = "", only_flipped: bool = False,
                     gzip_jsonl: bool = False, request: gr.Request = None) -> list[str]:
        """Export the decisions table as filtered (CSV and JSONL; with the effect columns of a
        decision-effects job) and the traces of its rows (a trace file the Audit tab loads again);
        gzip_jsonl writes the JSONL files as .jsonl.gz."""
        df = effects_section.table_columns(
            shared, table_for(history, loaded, only_erasures, trace_contains, sort_by, only_flipped), visitor(request))
        ids = set(df["trace"])
        traces = [t for t in all_traces(history, loaded) if t.trace_id in ids]
        return [str(p) for p in audit.export(df, audit.export_dir(shared.audit_dir), compress=gzip_jsonl, traces=traces)]

    export_btn.click(export_audit, [*filters, gz], export_files, api_name="export_audit")
    _wire_replay(replay_trace, replay_step, replay_html, [history, loaded])
    _wire_what_if(replay_trace, what_if_controls, [history, loaded], [wi_table, wi_msg, wi_page_msg, wi_page],
                  wi_pager, (api_wi_btn, api_wi_table))
    return tab, effects_tab, effects_timer


def _wire_what_if(trace: gr.Dropdown, controls: list, sources: list, outputs: list, pager: tuple,
                  api: tuple[gr.Button, gr.Dataframe]) -> None:
    """The what-if: ``outputs`` = its table page, summary line, page line and page number."""
    inputs = [trace, *controls, *sources]
    paged = dict(fn=what_if_page, inputs=[*inputs, outputs[3]], outputs=outputs, api_visibility="private")
    # A picked trace starts the what-if at its recorded settings and shows its recorded decisions
    # at once; after that, the table follows the controls as the user moves them (input, not
    # change: setting the recorded values must not re-run it four times).
    trace.change(recorded_settings, [trace, *sources], controls, api_visibility="private").then(**paged)
    for ctl in controls:
        ctl.input(**paged, trigger_mode="always_last")
    _wire_pager(pager, outputs[3], paged)
    api[0].click(what_if, inputs, [api[1], outputs[1]], api_name="what_if")


def _wire_replay(replay_trace: gr.Dropdown, replay_step: gr.Slider, replay_html: gr.HTML,
                             sources: list) -> None:
    """The replay: a picked trace drawn whole (``/replay``), then step by step with the slider."""
    # The slider first spans the picked trace (a range set after its value would leave the thumb
    # where the old range put it), then the whole trace is drawn.
    replay_trace.change(replay_range, [replay_trace, *sources], replay_step, api_visibility="private").then(
        replay, [replay_trace, *sources], replay_html, api_name="replay")
    # input, not change: the user moving the slider (range or number box) redraws up to that event;
    # replay_range setting it for a newly picked trace does not, since replay draws that trace whole.
    replay_step.input(step_to, [replay_trace, replay_step, *sources], replay_html,
                      trigger_mode="always_last", api_visibility="private")


SORTABLE = ("score", "threshold", "margin", "segment", "attempt", "baseline")
"""The columns the table sorts by (descending), on the server: the page shows one page of the
sorted rows, where a header click would sort only the rows on screen."""


def _pager(elem_id: str) -> tuple[gr.Number, gr.Markdown, tuple[gr.Button, gr.Button]]:
    """A table's page controls: previous, the page number, next, and the line saying which rows."""
    with gr.Row(elem_classes=["e3rl-pager"], equal_height=True):
        prev = gr.Button("◀", size="sm", min_width=40, scale=0, elem_id=f"{elem_id}-prev")
        page = gr.Number(1, precision=0, minimum=1, label="page", elem_id=elem_id, min_width=90, scale=0,
                         show_label=False, container=False)
        nxt = gr.Button("▶", size="sm", min_width=40, scale=0, elem_id=f"{elem_id}-next")
        msg = gr.Markdown(elem_id=f"{elem_id}-line")
    return page, msg, (prev, nxt)


def _wire_pager(pager: tuple[gr.Button, gr.Button], page: gr.Number, listener: dict) -> None:
    """Previous and next step the page number (clamped by the listener); typing one shows that page."""
    prev, nxt = pager
    for button, step in ((prev, -1), (nxt, 1)):
        button.click(lambda p, s=step: max(1, int(p or 1) + s), page, page, api_visibility="private",
                     queue=False).then(**listener)
    page.submit(**listener)


def _what_if_panel() -> tuple[list, gr.Dataframe, gr.Markdown]:
    """The what-if's threshold controls (starting at ThresholdConfig's defaults), its table and message."""
    gr.Markdown("### What-if: re-judge the recorded decisions under other thresholds")
    d = ThresholdConfig()
    with gr.Row():
        controls = [gr.Dropdown(POLICIES.names(), value=d.policy, label="policy"),
                    gr.Slider(0, 3, value=d.kappa, step=0.1, label="κ"),
                    gr.Slider(0, 1, value=d.penalty_lambda, step=0.05, label="penalty λ"),
                    gr.Slider(0, 5, value=d.value, step=0.05, label="fixed threshold")]
    table = gr.Dataframe(pd.DataFrame(columns=audit.WHAT_IF_COLUMNS), interactive=False, max_height=300,
                         elem_id="e3rl-whatif-table", label="recorded and re-judged decisions")
    return controls, table, gr.Markdown(elem_id="e3rl-whatif", label="what-if summary")


def end_session(request: gr.Request) -> None:
    """The page was closed: free the traces its session loaded (gradio would keep them an hour)."""
    audit.SESSIONS.end(request.session_hash if request else None)


def _loaded(files: audit.LoadedTraces | None) -> list[Trace]:
    return files.traces if files is not None else []


def all_traces(history: list, files: audit.LoadedTraces | None) -> list[Trace]:
    """This session's traces, then the loaded files'."""
    return group_traces(history) + _loaded(files)


def find_trace(trace_id: str | None, history: list, files: audit.LoadedTraces | None) -> Trace | None:
    """The trace with this id, or whose id is shown as this (a long id, cut in the tables and list)."""
    traces = all_traces(history, files)
    return (next((t for t in traces if t.trace_id == trace_id), None)
            or next((t for t in traces if audit.shown_id(t.trace_id) == trace_id), None))


def table_for(history: list, files: audit.LoadedTraces | None, only: bool, contains: str, sort: str,
              flipped: bool) -> pd.DataFrame:
    frames = [audit.decisions_frame(group_traces(history), "session")]
    if _loaded(files):
        frames.append(audit.decisions_frame(_loaded(files), "file"))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=audit.COLUMNS)
    return audit.filter_frame(df, only, contains or "", sort or "", only_flipped=flipped)


def plain_decisions(history: list, loaded: audit.LoadedTraces | None, only_erasures: bool = False,
                    trace_contains: str = "", sort_by: str = "", only_flipped: bool = False) -> pd.DataFrame:
    """The decisions table without effect columns (a load shows it at once; ``decisions`` adds them next)."""
    df = table_for(history, loaded, only_erasures, trace_contains, sort_by, only_flipped)
    return audit.display_frame(df.round(4))


def trace_choices(current: str | None, history: list, files: audit.LoadedTraces | None):
    """The replay's trace list, labelled (prompt, rollout, seed, counterfactual: ``audit.trace_labels``):
    every trace of the session and its files. The one shown stays picked while it exists, else the
    newest run's first rollout (what a user opening the tab after a run wants to see)."""
    traces = all_traces(history, files)
    labels = audit.trace_labels(traces)
    shown = audit.shown_id(current) if current else None
    if shown not in {v for _, v in labels}:
        firsts = [t for t in group_traces(history) if t.events and t.start.group_index == 0]
        newest = firsts[-1] if firsts else (traces[0] if traces else None)
        shown = audit.shown_id(newest.trace_id) if newest is not None else None
    return gr.update(choices=labels, value=shown)


def load_traces(trace_file: Any, loaded: audit.LoadedTraces | None, history: list, only_erasures: bool = False,
                trace_contains: str = "", sort_by: str = "", only_flipped: bool = False,
                request: gr.Request = None) -> tuple:
    """Load a trace file (.jsonl or .jsonl.gz, told by its content) into this session's traces:
    returns a one-line message, the first page of the decisions table (``/decisions`` gives every
    row) and the id of the file's first trace. Then the upload is deleted: what was read is in memory, and uploads must not pile
    up on the server."""
    path, name = _upload(trace_file)
    if not path:
        return loaded, "", gr.update(), gr.update(), gr.update()
    files = audit.SESSIONS.of(request.session_hash if request else None)
    before = len(files.traces)
    try:
        if not (name.lower().endswith((".jsonl", ".gz")) or audit.is_gzip(path)):
            raise E3RLError(f"{name} is not a .jsonl or .jsonl.gz file; load a trace written by "
                            f"e3rl generate --trace-out")
        room = audit.MAX_SERVER_TRACE_BYTES - audit.SESSIONS.total_bytes()
        msg = files.add(path, name, known=[t.trace_id for t in group_traces(history)], server_room=room)
    except E3RLError as err:
        return files, f"⚠️ {err}", gr.update(), gr.update(), None
    finally:
        _discard(path)
    # The replay shows the file's first trace (a plain id: what a script passes on to /replay; the
    # list of traces follows in the next step); a file that added nothing leaves the pick as it is.
    picked = audit.shown_id(files.traces[before].trace_id) if len(files.traces) > before else gr.update()
    df = plain_decisions(history, files, only_erasures, trace_contains, sort_by, only_flipped)
    return files, msg, audit.page_of(df, 1)[0], picked, None


def _upload(upload: Any) -> tuple[str | None, str]:
    """(server path, the name its user gave it) of an unprocessed gr.File value."""
    if upload is None:
        return None, ""
    value = upload if isinstance(upload, dict) else upload.model_dump()
    path = value.get("path")
    return path, value.get("orig_name") or (Path(path).name if path else "")


def _discard(path: str) -> None:
    """Delete an upload and the folder gradio made for it, once it is empty."""
    try:
        os.remove(path)
        os.rmdir(Path(path).parent)
    except OSError:
        pass  # gone already, or the folder holds another upload of the same content


def select_row(evt: gr.SelectData):  # selecting a table row replays its trace below
    row = evt.row_value if getattr(evt, "row_value", None) is not None else None
    return gr.update(value=row[0]) if row else gr.update()


def replay(trace_id: str | None, history: list, loaded: audit.LoadedTraces | None) -> str:
    """A recorded trace drawn whole as the live view drew it (heatmap HTML)."""
    tr = find_trace(trace_id, history, loaded)
    if tr is None:
        return (f"<p>no trace '{html.escape(trace_id, quote=False)}' in this session or its loaded files</p>"
                if trace_id else "")
    return render.trace_html(replay_view(tr, len(tr.events)), with_css=False)


def replay_range(trace_id: str | None, history: list, loaded: audit.LoadedTraces | None):
    """The replay slider spans the picked trace's events, all of them shown."""
    tr = find_trace(trace_id, history, loaded)
    n = len(tr.events) if tr is not None else 1
    return gr.update(maximum=n, value=n)


def step_to(trace_id: str | None, upto: int, history: list, files: audit.LoadedTraces | None) -> str:
    tr = find_trace(trace_id, history, files)
    return render.trace_html(replay_view(tr, int(upto)), with_css=False) if tr else ""


def recorded_settings(trace_id: str | None, history: list, files: audit.LoadedTraces | None) -> tuple:
    """Start the what-if controls at the picked trace's own settings, so 'changed' means changed."""
    tr = find_trace(trace_id, history, files)
    if tr is None:
        return tuple(gr.update() for _ in WHAT_IF)
    return tuple(gr.update(value=v) for v in audit.recorded_thresholds(tr, WHAT_IF))


def what_if(trace_id: str | None, policy: str, kappa: float, penalty_lambda: float, threshold_value: float,
            history: list, loaded: audit.LoadedTraces | None) -> tuple:
    """Re-judge the recorded decisions of trace_id's group under other threshold settings: (one row
    per recorded attempt with its recorded and new decision, the changed ones first; a line
    counting the changed ones)."""
    if not trace_id:
        return None, "pick a trace above"
    try:
        df = audit.what_if(audit.group_of(all_traces(history, loaded), trace_id), {
            "threshold.policy": policy, "threshold.kappa": kappa, "threshold.penalty_lambda": penalty_lambda,
            "threshold.value": threshold_value})
    except E3RLError as err:
        return None, f"⚠️ {err}"
    return audit.display_frame(audit.what_if_view(df).round(4)), audit.what_if_summary(df)


CHANGED_STYLE = "background-color: #fff1c2; font-weight: 600"


def what_if_page(trace_id: str | None, policy: str, kappa: float, penalty_lambda: float, threshold_value: float,
                 history: list, loaded: audit.LoadedTraces | None, page: int = 1) -> tuple:
    """The page's what-if: one page of ``what_if``'s rows (the changed ones first, highlighted),
    its summary line, the line saying which rows, and the page shown."""
    df, line = what_if(trace_id, policy, kappa, penalty_lambda, threshold_value, history, loaded)
    if df is None:
        return None, line, "", gr.update(value=1)
    part, page, pages = audit.page_of(df, page)
    styled = part.style.apply(lambda row: [CHANGED_STYLE if row["changed"] else ""] * len(row), axis=1).format(
        precision=4)
    return styled, line, audit.page_line(len(df), page, pages), gr.update(value=page, maximum=pages)
