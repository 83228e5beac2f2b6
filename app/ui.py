"""Gradio wiring: components and events only. What a handler computes lives in ``session``,
``render``, ``audit`` and ``training`` (all gradio-free and tested without a server)."""
from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from e3rl_core.errors import E3RLError
from e3rl_core.events import Trace, group_traces
from e3rl_core.generation.segmenter import SEGMENTERS
from e3rl_core.generation.thresholds import POLICIES
from e3rl_core.tasks import arith

from . import audit, render
from .session import GenRequest, ModelStore, replay_view, same_run, shipped_models, stream_generation
from .training import RunRequest, TrainingManager, latest_trace_events, read_status

# Defaults where erasure measurably helps the shipped model (docs/results/demo-model.json):
# sampling at T=1 with the group policy, G=4, Erase@3 — 0.469 -> 0.550 accuracy.
DEFAULTS = dict(temperature=1.0, signal="surprisal", segment_mode="delimiter", segment_tokens=32, policy="e3rl",
                kappa=1.0, erase_budget=3, group_size=4, seed=8, max_new_tokens=256)
# With these, the first example's rollout 0 slips, erases three segments and ends correct, while the
# same seed with erasure off ends wrong, with 1, 2 or 4 torch threads alike (float sums differ with
# the thread count, and some seeds' decisions sit close enough to the threshold to flip; checked by
# tests/test_app_render.py).
GEN_FIELDS = ["model", "prompt", "gold", "temperature", "top_p", "max_new_tokens", "signal", "segment_mode",
              "segment_tokens", "policy", "kappa", "threshold_value", "warmup_segments", "erase_budget", "erase",
              "group_size", "seed"]


def examples() -> list[list[Any]]:
    """Held-out task problems (known answers) and one free-text prompt."""
    rows = []
    for level, seed in ((3, 5), (4, 11), (5, 2), (2, 1)):
        p = arith.problems("test", 1, seed=seed, difficulty=level)[0]
        rows.append([p.question, p.answer])
    rows.append(["Question: x = 6 * 7. y = x - 19. What is y?\nAnswer:\n", "23"])
    return rows


def build(space: bool = False, runs_root: str | None = None, default_model: str | None = None,
          engine: str = "thread") -> gr.Blocks:
    """The workbench's Blocks. engine: where generations run, "thread" or "process" (see
    ``app.producer``)."""
    store = ModelStore()
    trainer = TrainingManager(runs_root or os.environ.get("E3RL_RUNS", "runs/app"), max_steps=30 if space else None)
    models = shipped_models()
    default = default_model or (models[0] if models else None)
    audit_dir = Path(tempfile.mkdtemp(prefix="e3rl-audit-"))
    if default:  # load before the first click, so it streams at once
        threading.Thread(target=store.get, args=(default,), daemon=True).start()

    def model_choices() -> list[str]:
        trained = [str(p) for p in trainer.checkpoints()]
        extra = [default] if default and default not in models else []
        return models + extra + trained

    with gr.Blocks(title="E3RL workbench", analytics_enabled=False) as demo:
        session_events = gr.State([])  # every event of this browser session (generation + counterfactual)
        last_events = gr.State([])
        gr.Markdown("# E3RL workbench\nWatch the model generate, erase uncertain segments and regenerate them; "
                    "audit every decision; train with GRPO, DAPO or E3RL.")
        with gr.Tab("Generate") as gen_tab:
            with gr.Row():
                with gr.Column(scale=2):
                    model = gr.Dropdown(model_choices(), value=default, label="model", allow_custom_value=not space)
                    if not space:
                        gr.Markdown("Any local model directory can be typed into the model box.")
                    prompt = gr.Textbox(label="prompt (a one-line question is wrapped in the task template)",
                                        lines=3, value=examples()[0][0])
                    gold = gr.Textbox(label="gold answer (optional: shows ✓/✗)", value=examples()[0][1])
                    gr.Examples(examples(), inputs=[prompt, gold], label="examples")
                with gr.Column(scale=1):
                    with gr.Accordion("sampling and E3RL", open=False):
                        temperature = gr.Slider(0, 2, value=DEFAULTS["temperature"], step=0.05, label="temperature (0 = greedy)")
                        top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="top-p")
                        max_new = gr.Slider(16, 1024, value=DEFAULTS["max_new_tokens"], step=16, label="max new tokens")
                        signal = gr.Radio(["surprisal", "entropy"], value="surprisal", label="decision signal")
                        seg_mode = gr.Dropdown(SEGMENTERS.names(), value="delimiter", label="segment mode")
                        seg_tokens = gr.Slider(4, 512, value=32, step=4, label="segment length (tokens)")
                        policy = gr.Dropdown(POLICIES.names(), value="e3rl", label="threshold policy")
                        kappa = gr.Slider(0, 3, value=1.0, step=0.1, label="κ (e3rl baseline μ + κσ)")
                        thr_value = gr.Slider(0, 5, value=2.0, step=0.05, label="fixed threshold")
                        warmup = gr.Slider(0, 8, value=2, step=1, label="warm-up segments")
                        budget = gr.Slider(0, 8, value=3, step=1, label="erase budget K (Erase@K)")
                        erase = gr.Checkbox(value=True, label="erasure on")
                    group = gr.Slider(1, 8, value=DEFAULTS["group_size"], step=1, label="group size G")
                    seed = gr.Number(value=DEFAULTS["seed"], precision=0, label="seed")
                    color_by = gr.Radio(["entropy", "surprisal"], value="entropy", label="colour tokens by")
                    with gr.Row():
                        go_btn = gr.Button("Generate", variant="primary", elem_id="e3rl-generate")
                        stop_btn = gr.Button("Stop")
                        cf_btn = gr.Button("Counterfactual (erasure off)")
            row = gr.Radio([0], value=0, label="rollout of the group", type="value")
            legend = gr.HTML(render.legend_html("entropy"))
            heat = gr.HTML(elem_id="e3rl-heatmap")
            summary = gr.Markdown(elem_id="e3rl-summary")
            group_md = gr.Markdown()
            # An empty chart from the start: the browser loads plotly with the page, not on the first click.
            chart = gr.Plot(render.trace_figure(render.TraceView()), label="scores vs thresholds; per-token signal",
                            elem_id="e3rl-chart")
            with gr.Row(visible=False) as cf_row:
                with gr.Column():
                    gr.Markdown("**with erasure**")
                    cf_on = gr.HTML()
                    cf_on_md = gr.Markdown()
                with gr.Column():
                    gr.Markdown("**erasure off (same prompt and seed)**")
                    cf_off = gr.HTML()
                    cf_off_md = gr.Markdown()

        gen_inputs = [model, prompt, gold, temperature, top_p, max_new, signal, seg_mode, seg_tokens, policy, kappa,
                      thr_value, warmup, budget, erase, group, seed]

        def request(*values: Any) -> GenRequest:
            kw = dict(zip(GEN_FIELDS, values))
            if space and kw["model"] not in model_choices():
                raise gr.Error("in this Space only the listed models can be used")
            return GenRequest(**kw)

        def views_of(events: list) -> list[render.TraceView]:
            return list(render.fold(events).values())

        def draw(events: list, which: int, colour: str, frame_info: tuple | None = None):
            views = views_of(events)
            if not views:
                return "", "", "", None, gr.update()
            which = min(int(which or 0), len(views) - 1)
            v = views[which]
            elapsed, first = frame_info or (None, None)
            md = render.summary_markdown(v, elapsed, first)
            grp = render.group_markdown(views) if len(views) > 1 else ""
            return (render.trace_html(v, colour, with_css=False), md, grp, render.trace_figure(v, colour),
                    gr.update(choices=list(range(len(views))), value=which))

        def run(colour: str, which: int, history: list, *values: Any):
            try:
                req = request(*values)
                # Frames at most every 0.25 s and the chart at most every 1.5 s: each update is
                # serialized and drawn by a browser that shares the CPU with the model.
                frames = stream_generation(store, req, min_interval=0.25, engine=engine)
                n_fig, fig_at, out, n_rows = 0, 0.0, None, 0
                for frame in frames:
                    views = list(frame.views.values())
                    which_ = min(int(which or 0), len(views) - 1) if views else 0
                    v = views[which_] if views else render.TraceView()
                    decided = sum(a.decision is not None for a in v.attempts)
                    # The first frame clears the last run's chart (if any); later ones redraw it when
                    # a decision was added, 1.5 s apart (a redraw costs the browser far more than a
                    # text update, and the browser shares the CPU with the model).
                    fig = gr.update()
                    if out is None and history:
                        fig = render.trace_figure(render.TraceView())
                    elif not frame.finished and decided != n_fig and frame.elapsed - fig_at >= 1.5:
                        fig, n_fig, fig_at = render.trace_figure(v, colour), decided, frame.elapsed
                    rows = gr.update()
                    if len(views) != n_rows:  # the row picker changes only when rollouts start
                        n_rows, rows = len(views), gr.update(choices=list(range(len(views))), value=which_)
                    total = sum(len(a.tokens) for w in views for a in w.attempts)
                    md = render.summary_markdown(v, frame.elapsed, frame.first_token_s,
                                                 total if len(views) > 1 else None)
                    if frame.finished:
                        md += f"  \n_finished: {total} tokens over {len(views)} rollout(s)_"
                    out = [render.trace_html(v, colour, with_css=False), md,
                           render.group_markdown(views) if len(views) > 1 else "", fig, rows, list(frame.events),
                           history + (list(frame.events) if frame.finished else [])]
                    yield tuple(out)
                if out is not None:
                    # The finished text first, then its chart a moment later, so the browser paints
                    # the answer before the chart redraw holds its main thread.
                    time.sleep(0.1)
                    out[3], out[4] = render.trace_figure(v, colour), gr.update()
                    yield tuple(out)
            except E3RLError as err:
                raise gr.Error(str(err)) from None

        outs = [heat, summary, group_md, chart, row, last_events, session_events]
        gen_event = go_btn.click(run, [color_by, row, session_events, *gen_inputs], outs, concurrency_limit=2,
                                 show_progress="hidden",  # the spinner would repaint all run long
                                 api_name="generate")
        stop_btn.click(None, None, None, cancels=[gen_event])
        color_by.change(lambda e, w, c: draw(e, w, c), [last_events, row, color_by], [heat, summary, group_md, chart, row])
        color_by.change(lambda c: render.legend_html(c), color_by, legend)
        row.change(lambda e, w, c: draw(e, w, c), [last_events, row, color_by], [heat, summary, group_md, chart, row])

        def counterfactual(colour: str, last: list, history: list, *values: Any):
            try:
                req = request(*values)
                new: list = []
                # The run just shown, if it is this request with erasure on, is reused as is.
                on_events = list(last) if req.erase and same_run(last, req, store.get(req.model)[1]) else []
                if not on_events:
                    on_events = new = list(stream_generation(store, req, engine=engine))[-1].events
                req.erase = False
                off_events = list(stream_generation(store, req, engine=engine))[-1].events
            except E3RLError as err:
                raise gr.Error(str(err)) from None
            on, off = views_of(on_events)[0], views_of(off_events)[0]
            return (gr.update(visible=True), render.trace_html(on, colour, with_css=False), render.summary_markdown(on),
                    render.trace_html(off, colour, with_css=False), render.summary_markdown(off),
                    history + new + off_events)

        cf_btn.click(counterfactual, [color_by, last_events, session_events, *gen_inputs],
                     [cf_row, cf_on, cf_on_md, cf_off, cf_off_md, session_events], concurrency_limit=2,
                     api_name="counterfactual")

        # ------------------------------------------------------------------ audit
        with gr.Tab("Audit") as audit_tab:
            loaded = gr.State([])
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
            # one line per decision (long text cells scroll sideways); numbers shown to 4 places,
            # exported in full
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
            gr.Markdown("### What-if: re-judge the recorded decisions under other thresholds")
            with gr.Row():
                wi_policy = gr.Dropdown(POLICIES.names(), value="e3rl", label="policy")
                wi_kappa = gr.Slider(0, 3, value=1.0, step=0.1, label="κ")
                wi_lambda = gr.Slider(0, 1, value=0.3, step=0.05, label="penalty λ")
                wi_value = gr.Slider(0, 5, value=2.0, step=0.05, label="fixed threshold")
            wi_table = gr.Dataframe(pd.DataFrame(columns=audit.WHAT_IF_COLUMNS), interactive=False, max_height=300,
                                    elem_id="e3rl-whatif-table")
            wi_msg = gr.Markdown(elem_id="e3rl-whatif")

        def all_traces(history: list, files: list) -> list[Trace]:
            return group_traces(history) + list(files)

        def table_for(history: list, files: list, only: bool, contains: str, sort: str, flipped: bool) -> pd.DataFrame:
            frames = [audit.decisions_frame(group_traces(history), "session")]
            if files:
                frames.append(audit.decisions_frame(files, "file"))
            df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=audit.COLUMNS)
            return audit.filter_frame(df, only, contains or "", sort or "", only_flipped=flipped)

        def refresh_all(history: list, files: list, only: bool, contains: str, sort: str, flipped: bool):
            ids = [t.trace_id for t in all_traces(history, files)]
            return (table_for(history, files, only, contains, sort, flipped).round(4),
                    gr.update(choices=ids, value=ids[0] if ids else None))

        filters = [session_events, loaded, only_erasures, trace_filter, sort_by, only_flipped]
        for trigger in (refresh.click, only_erasures.change, trace_filter.submit, sort_by.change, only_flipped.change):
            trigger(refresh_all, filters, [table, replay_trace])

        def load_file(path: str | None, files: list, history: list, only: bool, contains: str, sort: str,
                      flipped: bool):
            if not path:
                return files, "", gr.update(), gr.update()
            try:
                traces = audit.load_trace_file(path)
            except E3RLError as err:
                return files, f"⚠️ {err}", gr.update(), gr.update()
            files = list(files) + traces
            df, choice = refresh_all(history, files, only, contains, sort, flipped)
            return files, f"loaded {len(traces)} trace(s) from {Path(path).name}", df, choice

        upload.upload(load_file, [upload, loaded, session_events, only_erasures, trace_filter, sort_by, only_flipped],
                      [loaded, load_msg, table, replay_trace], api_name="load_traces")

        def select_row(evt: gr.SelectData):  # selecting a table row replays its trace below
            row = evt.row_value if getattr(evt, "row_value", None) is not None else None
            return gr.update(value=row[0]) if row else gr.update()

        table.select(select_row, None, replay_trace)

        def do_export(history: list, files: list, only: bool, contains: str, sort: str, flipped: bool):
            df = table_for(history, files, only, contains, sort, flipped)
            csv, jsonl = audit.export(df, audit_dir)
            return [str(csv), str(jsonl)]

        export_btn.click(do_export, filters, export_files, api_name="export_audit")

        def pick_trace(trace_id: str | None, history: list, files: list):
            tr = next((t for t in all_traces(history, files) if t.trace_id == trace_id), None)
            if tr is None:
                return gr.update(maximum=1, value=1), ""
            n = len(tr.events)
            return gr.update(maximum=n, value=n), render.trace_html(replay_view(tr, n), with_css=False)

        replay_trace.change(pick_trace, [replay_trace, session_events, loaded], [replay_step, replay_html])

        def recorded_settings(trace_id: str | None, history: list, files: list):
            """Start the what-if sliders at the picked trace's own settings, so 'changed' means changed."""
            tr = next((t for t in all_traces(history, files) if t.trace_id == trace_id), None)
            if tr is None:
                return gr.update(), gr.update(), gr.update(), gr.update()
            th = tr.start.config.get("threshold", {})
            return (gr.update(value=th.get("policy", "e3rl")), gr.update(value=th.get("kappa", 1.0)),
                    gr.update(value=th.get("penalty_lambda", 0.3)), gr.update(value=th.get("value", 2.0)))

        def step_to(trace_id: str | None, upto: int, history: list, files: list) -> str:
            tr = next((t for t in all_traces(history, files) if t.trace_id == trace_id), None)
            return render.trace_html(replay_view(tr, int(upto)), with_css=False) if tr else ""

        replay_step.change(step_to, [replay_trace, replay_step, session_events, loaded], replay_html)

        def run_what_if(trace_id: str | None, pol: str, k: float, lam: float, val: float, history: list, files: list):
            traces = all_traces(history, files)
            if not trace_id:
                return None, "pick a trace above"
            try:
                df = audit.what_if(audit.group_of(traces, trace_id), {
                    "threshold.policy": pol, "threshold.kappa": k, "threshold.penalty_lambda": lam,
                    "threshold.value": val})
            except E3RLError as err:
                return None, f"⚠️ {err}"
            changed = int(df["changed"].sum()) if len(df) else 0
            return df.round(4), f"{changed} of {len(df)} recorded decisions would change"

        replay_trace.change(recorded_settings, [replay_trace, session_events, loaded],
                            [wi_policy, wi_kappa, wi_lambda, wi_value])
        for ctl in (wi_policy, wi_kappa, wi_lambda, wi_value):
            ctl.change(run_what_if, [replay_trace, wi_policy, wi_kappa, wi_lambda, wi_value, session_events, loaded],
                       [wi_table, wi_msg])

        # ------------------------------------------------------------------ train
        with gr.Tab("Train") as train_tab:
            with gr.Row():
                t_algo = gr.Dropdown(["e3rl", "grpo", "dapo"], value="e3rl", label="algorithm")
                t_steps = gr.Slider(1, 30 if space else 500, value=10, step=1, label="steps")
                t_group = gr.Slider(2, 16, value=4, step=1, label="group size")
                t_lr = gr.Number(value=5e-5, label="learning rate")
                t_seed = gr.Number(value=0, precision=0, label="seed")
            with gr.Row():
                t_start = gr.Button("Start training", variant="primary")
                t_stop = gr.Button("Stop")
            t_msg = gr.Markdown()
            t_plot = gr.Plot(label="training curves")
            t_rollout = gr.HTML(label="latest rollout")
            timer = gr.Timer(2.0, active=False)  # polls only while the Train tab is open

        def start_run(mdl: str, algo: str, steps: int, grp: int, lr: float, sd: int) -> str:
            if space and mdl not in model_choices():
                return "⚠️ in this Space only the listed models can be trained"
            try:
                out = trainer.start(RunRequest(model=str(Path(mdl)) if mdl else default, algo=algo, steps=int(steps),
                                               group_size=int(grp), learning_rate=float(lr), seed=int(sd)))
            except E3RLError as err:
                return f"⚠️ {err}"
            return f"started {out.name}"

        t_start.click(start_run, [model, t_algo, t_steps, t_group, t_lr, t_seed], t_msg, api_name="start_training")
        t_stop.click(lambda: trainer.stop(), None, t_msg, api_name="stop_training")

        def poll(current_model: str):
            runs = trainer.runs()
            if not runs:
                return "no training run yet", None, "", gr.update()
            st = read_status(runs[0])
            rows = st.get("rows", [])
            active = trainer.active()
            msg = (f"**{runs[0].name}**: {st.get('status')} — step {st.get('step', len(rows))} of "
                   f"{st.get('max_steps', '?')}" + (" (running)" if active else ""))
            if st.get("status") == "failed":
                msg += f"\n\n⚠️ {st.get('message')}"
            elif not active and st.get("status") == "starting" and "error" in st.get("console", ""):
                msg += "\n\n⚠️ " + st["console"].strip().splitlines()[-1]
            fig = render.as_figure(render.training_spec(rows)) if rows else None
            evs = latest_trace_events(runs[0])
            html = render.trace_html(list(render.fold(evs).values())[-1], with_css=False) if evs else ""
            return msg, fig, html, gr.update(choices=model_choices(), value=current_model)

        timer.tick(poll, model, [t_msg, t_plot, t_rollout, model])
        train_tab.select(lambda: gr.Timer(active=True), None, timer)
        gen_tab.select(lambda m: (gr.Timer(active=False), gr.update(choices=model_choices(), value=m)), model,
                       [timer, model])  # new checkpoints appear when coming back to Generate
        audit_tab.select(lambda: gr.Timer(active=False), None, timer)
    return demo
