"""The Audit tab: every recorded decision of this session (and of loaded trace files) as a table to
filter, sort and export; a step-by-step replay of one trace; and the what-if, which re-judges its
group's recorded decisions under other thresholds."""
from __future__ import annotations

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

# What-if controls the recorded settings are read into; a trace that lacks one starts at the default.
WHAT_IF = ("policy", "kappa", "penalty_lambda", "value")
TRACES_TTL_S = 3 * 3600
"""How long a session's loaded traces are kept after its last load, however long its page stays
open (a closed page frees them at once: ``end_session``)."""


def build(shared: Shared, traces_ttl_s: float = TRACES_TTL_S) -> gr.Tab:
    history = shared.session_events
    with gr.Tab("Audit") as tab:
        # traces loaded from files, in this browser session (an audit.LoadedTraces, None until a load)
        loaded = gr.State(None, time_to_live=traces_ttl_s, delete_callback=audit.release)
        with gr.Row():
            upload = gr.File(label="load a JSONL trace file", file_types=[".jsonl"], type="filepath")
            refresh = gr.Button("refresh from this session")
        load_msg = gr.Markdown()
        with gr.Row():
            only_erasures = gr.Checkbox(label="only erasures")
            only_flipped = gr.Checkbox(label="only erasures that flipped the answer (needs a counterfactual)")
            trace_filter = gr.Textbox(label="trace id contains")
            sort_by = gr.Dropdown(["", "score", "threshold", "segment", "attempt", "baseline"], value="",
                                  label="sort by (descending)")
        # one line per decision (long text cells scroll sideways); numbers shown to 4 places, exported in full
        table = gr.Dataframe(pd.DataFrame(columns=audit.COLUMNS), interactive=False, wrap=False, max_height=480,
                             elem_id="e3rl-audit")
        with gr.Row():
            export_btn = gr.Button("export CSV + JSONL")
            export_files = gr.File(label="exports", file_count="multiple")
        gr.Markdown("### Replay a trace step by step")
        with gr.Row():
            replay_trace = gr.Dropdown([], label="trace")
            replay_step = gr.Slider(0, 1, value=1, step=1, label="events shown")
        replay_html = gr.HTML(elem_id="e3rl-replay")
        what_if_controls, wi_table, wi_msg = _what_if_panel()

    filters = [history, loaded, only_erasures, trace_filter, sort_by, only_flipped]
    for trigger in (refresh.click, only_erasures.change, trace_filter.submit, sort_by.change, only_flipped.change):
        trigger(refresh_all, filters, [table, replay_trace])
    # Unprocessed, so the handler sees the upload's original name (gradio still checks that the
    # file is one uploaded to this server); and gradio's filepath processing would leave an empty
    # temporary file behind per upload.
    upload.upload(load_file, [upload, loaded, history, only_erasures, trace_filter, sort_by, only_flipped],
                  [loaded, load_msg, table, replay_trace, upload], api_name="load_traces", preprocess=False)
    table.select(select_row, None, replay_trace)

    def do_export(events: list, files: audit.LoadedTraces | None, only: bool, contains: str, sort: str,
                  flipped: bool) -> list[str]:
        csv, jsonl = audit.export(table_for(events, files, only, contains, sort, flipped), shared.audit_dir)
        return [str(csv), str(jsonl)]

    export_btn.click(do_export, filters, export_files, api_name="export_audit")
    replay_trace.change(pick_trace, [replay_trace, history, loaded], [replay_step, replay_html])
    replay_step.change(step_to, [replay_trace, replay_step, history, loaded], replay_html)
    replay_trace.change(recorded_settings, [replay_trace, history, loaded], what_if_controls)
    for ctl in what_if_controls:
        ctl.change(run_what_if, [replay_trace, *what_if_controls, history, loaded], [wi_table, wi_msg])
    return tab


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
                         elem_id="e3rl-whatif-table")
    return controls, table, gr.Markdown(elem_id="e3rl-whatif")


def end_session(request: gr.Request) -> None:
    """The page was closed: free the traces its session loaded (gradio would keep them an hour)."""
    audit.SESSIONS.end(request.session_hash if request else None)


def _loaded(files: audit.LoadedTraces | None) -> list[Trace]:
    return files.traces if files is not None else []


def all_traces(history: list, files: audit.LoadedTraces | None) -> list[Trace]:
    """This session's traces, then the loaded files'."""
    return group_traces(history) + _loaded(files)


def find_trace(trace_id: str | None, history: list, files: audit.LoadedTraces | None) -> Trace | None:
    return next((t for t in all_traces(history, files) if t.trace_id == trace_id), None)


def table_for(history: list, files: audit.LoadedTraces | None, only: bool, contains: str, sort: str,
              flipped: bool) -> pd.DataFrame:
    frames = [audit.decisions_frame(group_traces(history), "session")]
    if _loaded(files):
        frames.append(audit.decisions_frame(_loaded(files), "file"))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=audit.COLUMNS)
    return audit.filter_frame(df, only, contains or "", sort or "", only_flipped=flipped)


def refresh_all(history: list, files: audit.LoadedTraces | None, only: bool, contains: str, sort: str,
                flipped: bool) -> tuple:
    ids = [t.trace_id for t in all_traces(history, files)]
    return (audit.display_frame(table_for(history, files, only, contains, sort, flipped).round(4)),
            gr.update(choices=ids, value=ids[0] if ids else None))


def load_file(upload: Any, files: audit.LoadedTraces | None, history: list, only: bool, contains: str, sort: str,
              flipped: bool, request: gr.Request) -> tuple:
    """Load an uploaded trace file (unprocessed: gradio's FileData) into this session's traces, then
    delete the upload: what was read is in memory, and uploads must not pile up on the server."""
    path, name = _upload(upload)
    if not path:
        return files, "", gr.update(), gr.update(), gr.update()
    files = audit.SESSIONS.of(request.session_hash if request else None)
    try:
        if not name.lower().endswith(".jsonl"):
            raise E3RLError(f"{name} is not a .jsonl file; load a JSONL trace written by e3rl generate --trace-out")
        msg = files.add(path, name, known=[t.trace_id for t in group_traces(history)])
    except E3RLError as err:
        return files, f"⚠️ {err}", gr.update(), gr.update(), None
    finally:
        _discard(path)
    df, choice = refresh_all(history, files, only, contains, sort, flipped)
    return files, msg, df, choice, None


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


def pick_trace(trace_id: str | None, history: list, files: audit.LoadedTraces | None) -> tuple:
    tr = find_trace(trace_id, history, files)
    if tr is None:
        return gr.update(maximum=1, value=1), ""
    n = len(tr.events)
    return gr.update(maximum=n, value=n), render.trace_html(replay_view(tr, n), with_css=False)


def step_to(trace_id: str | None, upto: int, history: list, files: audit.LoadedTraces | None) -> str:
    tr = find_trace(trace_id, history, files)
    return render.trace_html(replay_view(tr, int(upto)), with_css=False) if tr else ""


def recorded_settings(trace_id: str | None, history: list, files: audit.LoadedTraces | None) -> tuple:
    """Start the what-if controls at the picked trace's own settings, so 'changed' means changed."""
    tr = find_trace(trace_id, history, files)
    if tr is None:
        return tuple(gr.update() for _ in WHAT_IF)
    recorded, default = tr.start.config.get("threshold", {}), ThresholdConfig()
    return tuple(gr.update(value=recorded.get(name, getattr(default, name))) for name in WHAT_IF)


def run_what_if(trace_id: str | None, policy: str, kappa: float, lam: float, value: float, history: list,
                files: audit.LoadedTraces | None) -> tuple:
    if not trace_id:
        return None, "pick a trace above"
    try:
        df = audit.what_if(audit.group_of(all_traces(history, files), trace_id), {
            "threshold.policy": policy, "threshold.kappa": kappa, "threshold.penalty_lambda": lam,
            "threshold.value": value})
    except E3RLError as err:
        return None, f"⚠️ {err}"
    changed = int(df["changed"].sum()) if len(df) else 0
    return audit.display_frame(df.round(4)), f"{changed} of {len(df)} recorded decisions would change"
