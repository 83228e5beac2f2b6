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


def build(shared: Shared, traces_ttl_s: float = TRACES_TTL_S) -> tuple[gr.Tab, gr.Timer]:
    """The tab and its decision-effects timer (active while the tab is open; ``app.ui`` switches it).
    Its public endpoints: ``/load_traces``, ``/decisions``, ``/replay``, ``/what_if``,
    ``/export_audit`` and the decision effects' (``tabs.effects``); every other listener only keeps
    the page in step and is private."""
    history = shared.session_events
    with gr.Tab("Audit") as tab:
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
            sort_by = gr.Dropdown(["", "score", "threshold", "segment", "attempt", "baseline"], value="",
                                  label="sort by (descending)")
        # one line per decision (long text cells scroll sideways); numbers shown to 4 places, exported in full
        table = gr.Dataframe(pd.DataFrame(columns=audit.COLUMNS), interactive=False, wrap=False, max_height=480,
                             elem_id="e3rl-audit", label="decisions")
        with gr.Row():
            with gr.Column(scale=1, min_width=200):
                gz = gr.Checkbox(label="gzip the JSONL files (.jsonl.gz)")
                export_btn = gr.Button("export the table (CSV, JSONL) and its traces")
            export_files = gr.File(label="exports", file_count="multiple", scale=2)
        gr.Markdown("### Replay a trace step by step")
        with gr.Row():
            # custom values: a script may name any trace of the session (see /replay and /what_if)
            replay_trace = gr.Dropdown([], label="trace", allow_custom_value=True)
            replay_step = gr.Slider(0, 1, value=1, step=1, label="events shown")
        replay_html = gr.HTML(elem_id="e3rl-replay", label="heatmap")
        what_if_controls, wi_table, wi_msg = _what_if_panel()
        filters = [history, loaded, only_erasures, trace_filter, sort_by, only_flipped]
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

    choices = ([replay_trace, history, loaded], replay_trace)
    private: dict = dict(api_visibility="private")
    refresh.click(decisions, filters, table, api_name="decisions").then(trace_choices, *choices, **private)
    # Opening the tab shows the session's decisions as they are now (generated in the other tab),
    # and the table follows the session's generations as they finish (the state changes only then).
    tab.select(decisions, filters, table, **private).then(trace_choices, *choices, **private)
    history.change(decisions, filters, table, **private).then(trace_choices, *choices, **private)
    # The filters apply as they change: the trace filter on every keystroke (the latest one wins).
    for trigger in (only_erasures.change, trace_filter.change, sort_by.change, only_flipped.change):
        trigger(decisions, filters, table, show_progress="hidden", **private)
    # Unprocessed, so the handler sees the upload's original name (gradio still checks that the
    # file is one uploaded to this server); and gradio's filepath processing would leave an empty
    # temporary file behind per upload.
    upload.upload(load_traces, [upload, loaded, history, only_erasures, trace_filter, sort_by, only_flipped],
                  [loaded, load_msg, table, replay_trace, upload], api_name="load_traces", preprocess=False).then(
        trace_choices, *choices, **private).then(decisions, filters, table, **private)
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
    # The slider first spans the picked trace (a range set after its value would leave the thumb
    # where the old range put it), then the whole trace is drawn.
    replay_trace.change(replay_range, [replay_trace, history, loaded], replay_step, **private).then(
        replay, [replay_trace, history, loaded], replay_html, api_name="replay")
    # input, not change: the user moving the slider (range or number box) redraws up to that event;
    # replay_range setting it for a newly picked trace does not, since replay draws that trace whole.
    replay_step.input(step_to, [replay_trace, replay_step, history, loaded], replay_html,
                      trigger_mode="always_last", **private)
    # A picked trace starts the what-if at its recorded settings and shows its recorded decisions
    # at once; after that, the table follows the controls as the user moves them (input, not
    # change: setting the recorded values must not re-run it four times).
    wi_inputs = [replay_trace, *what_if_controls, history, loaded]
    replay_trace.change(recorded_settings, [replay_trace, history, loaded], what_if_controls, **private).then(
        what_if, wi_inputs, [wi_table, wi_msg], api_name="what_if")
    for ctl in what_if_controls:
        ctl.input(what_if, wi_inputs, [wi_table, wi_msg], trigger_mode="always_last", **private)
    return tab, effects_timer


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
    """The replay's trace list: every trace of the session and its files; the one shown stays
    picked while it exists (else the first)."""
    ids = [audit.shown_id(t.trace_id) for t in all_traces(history, files)]
    shown = audit.shown_id(current) if current else None
    value = shown if shown in ids else (ids[0] if ids else None)
    return gr.update(choices=ids, value=value)


def load_traces(trace_file: Any, loaded: audit.LoadedTraces | None, history: list, only_erasures: bool = False,
                trace_contains: str = "", sort_by: str = "", only_flipped: bool = False,
                request: gr.Request = None) -> tuple:
    """Load a trace file (.jsonl or .jsonl.gz, told by its content) into this session's traces:
    returns a one-line message, the decisions table with the file's rows and the id of the file's
    first trace. Then the upload is deleted: what was read is in memory, and uploads must not pile
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
    return files, msg, plain_decisions(history, files, only_erasures, trace_contains, sort_by, only_flipped), picked, None


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
    per recorded attempt with its recorded and new decision, a line counting the changed ones)."""
    if not trace_id:
        return None, "pick a trace above"
    try:
        df = audit.what_if(audit.group_of(all_traces(history, loaded), trace_id), {
            "threshold.policy": policy, "threshold.kappa": kappa, "threshold.penalty_lambda": penalty_lambda,
            "threshold.value": threshold_value})
    except E3RLError as err:
        return None, f"⚠️ {err}"
    return audit.display_frame(df.round(4)), audit.what_if_summary(df)
