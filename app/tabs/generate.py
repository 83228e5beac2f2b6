"""The Generate tab: a prompt and the E3RL settings in; the streamed heatmap, summary and chart
out; and the counterfactual, the same request with erasure off beside it."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Iterator

import gradio as gr

from e3rl_core.errors import E3RLError
from e3rl_core.generation.segmenter import SEGMENTERS
from e3rl_core.generation.thresholds import POLICIES
from e3rl_core.tasks import arith

from .. import render
from ..session import Frame, GenRequest, Job, defaults, same_run, stream_generation
from . import Shared

# The order the controls are sent in: GenRequest's fields, and the /generate API's arguments.
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


def build(shared: Shared) -> tuple[gr.Tab, gr.Dropdown]:
    """The tab, and its model picker (the Train tab trains the model picked here)."""
    with gr.Tab("Generate") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                controls = _prompt_controls(shared)
            with gr.Column(scale=1):
                controls.update(_settings())
                color_by = gr.Radio(["entropy", "surprisal"], value="entropy", label="colour tokens by")
                with gr.Row():
                    go_btn = gr.Button("Generate", variant="primary", elem_id="e3rl-generate")
                    stop_btn = gr.Button("Stop")
                    cf_btn = gr.Button("Counterfactual (erasure off)")
        row = gr.Radio([0], value=0, label="rollout of the group", type="value")
        legend = gr.HTML(render.legend_html("entropy"))
        shown = [gr.HTML(elem_id="e3rl-heatmap"), gr.Markdown(elem_id="e3rl-summary"), gr.Markdown(),
                 # An empty chart from the start: the browser loads plotly with the page, not on the first click.
                 gr.Plot(render.trace_figure(render.TraceView()), label="scores vs thresholds; per-token signal",
                         elem_id="e3rl-chart"), row]
        cf_outputs = _counterfactual_panel()
    inputs = [controls[name] for name in GEN_FIELDS]
    last, history = shared.last_events, shared.session_events

    def on_generate(colour: str, which: int, events: list, *values: Any) -> Iterator[tuple]:
        yield from generate(shared, colour, which, events, *values)

    def on_counterfactual(colour: str, shown_events: list, events: list, *values: Any) -> tuple:
        return counterfactual(shared, colour, shown_events, events, *values)

    gen_event = go_btn.click(on_generate, [color_by, row, history, *inputs], [*shown, last, history],
                             concurrency_limit=2, show_progress="hidden",  # the spinner would repaint all run long
                             api_name="generate")
    stop_btn.click(None, None, None, cancels=[gen_event])
    color_by.change(draw, [last, row, color_by], shown)
    color_by.change(render.legend_html, color_by, legend)
    row.change(draw, [last, row, color_by], shown)
    cf_btn.click(on_counterfactual, [color_by, last, history, *inputs], [*cf_outputs, history], concurrency_limit=2,
                 api_name="counterfactual")
    return tab, controls["model"]


def _prompt_controls(shared: Shared) -> dict[str, Any]:
    first = examples()[0]
    model = gr.Dropdown(shared.model_choices(), value=shared.default_model, label="model",
                        allow_custom_value=not shared.space)
    if not shared.space:
        gr.Markdown("Any local model directory, or a hub id when online, can be typed into the model box.")
    prompt = gr.Textbox(label="prompt (a one-line question is wrapped in the task template)", lines=3, value=first[0])
    gold = gr.Textbox(label="gold answer (optional: shows ✓/✗)", value=first[1])
    gr.Examples(examples(), inputs=[prompt, gold], label="examples")
    return {"model": model, "prompt": prompt, "gold": gold}


def _settings() -> dict[str, Any]:
    """The sampling and E3RL controls, starting at GenRequest's defaults."""
    d = defaults()
    with gr.Accordion("sampling and E3RL", open=False):
        c = {
            "temperature": gr.Slider(0, 2, value=d["temperature"], step=0.05, label="temperature (0 = greedy)"),
            "top_p": gr.Slider(0.05, 1, value=d["top_p"], step=0.05, label="top-p"),
            "max_new_tokens": gr.Slider(16, 1024, value=d["max_new_tokens"], step=16, label="max new tokens"),
            "signal": gr.Radio(["surprisal", "entropy"], value=d["signal"], label="decision signal"),
            "segment_mode": gr.Dropdown(SEGMENTERS.names(), value=d["segment_mode"], label="segment mode"),
            "segment_tokens": gr.Slider(4, 512, value=d["segment_tokens"], step=4, label="segment length (tokens)"),
            "policy": gr.Dropdown(POLICIES.names(), value=d["policy"], label="threshold policy"),
            "kappa": gr.Slider(0, 3, value=d["kappa"], step=0.1, label="κ (e3rl baseline μ + κσ)"),
            "threshold_value": gr.Slider(0, 5, value=d["threshold_value"], step=0.05, label="fixed threshold"),
            "warmup_segments": gr.Slider(0, 8, value=d["warmup_segments"], step=1, label="warm-up segments"),
            "erase_budget": gr.Slider(0, 8, value=d["erase_budget"], step=1, label="erase budget K (Erase@K)"),
            "erase": gr.Checkbox(value=d["erase"], label="erasure on"),
        }
    c["group_size"] = gr.Slider(1, 8, value=d["group_size"], step=1, label="group size G")
    c["seed"] = gr.Number(value=d["seed"], precision=0, label="seed")
    return c


def _counterfactual_panel() -> list[Any]:
    """Hidden until a counterfactual is asked for: the run with erasure beside the run without."""
    with gr.Row(visible=False) as cf_row:
        with gr.Column():
            gr.Markdown("**with erasure**")
            cf_on, cf_on_md = gr.HTML(), gr.Markdown()
        with gr.Column():
            gr.Markdown("**erasure off (same prompt and seed)**")
            cf_off, cf_off_md = gr.HTML(), gr.Markdown()
    return [cf_row, cf_on, cf_on_md, cf_off, cf_off_md]


def request(shared: Shared, values: tuple) -> GenRequest:
    """The controls' values as a request (a Space refuses unlisted models here)."""
    kw = dict(zip(GEN_FIELDS, values))
    shared.check_model(kw["model"], "used")
    return GenRequest(**kw)


def draw(events: list, which: int, colour: str) -> tuple:
    """Heatmap, summary, group table, chart and row picker for rollout ``which`` of a finished run."""
    views = list(render.fold(events).values())
    if not views:
        return "", "", "", None, gr.update()
    which = min(int(which or 0), len(views) - 1)
    v = views[which]
    grp = render.group_markdown(views) if len(views) > 1 else ""
    return (render.trace_html(v, colour, with_css=False), render.summary_markdown(v), grp,
            render.trace_figure(v, colour), gr.update(choices=list(range(len(views))), value=which))


def generate(shared: Shared, colour: str, which: int, history: list, *values: Any) -> Iterator[tuple]:
    try:
        req = request(shared, values)
        # Frames at most every 0.25 s: each update is serialized and drawn by a browser that shares
        # the CPU with the model.
        frames = stream_generation(shared.store, req, min_interval=0.25, engine=shared.engine)
        yield from _stream(frames, colour, which, history)
    except E3RLError as err:
        raise gr.Error(str(err)) from None


def _stream(frames: Iterator[Frame], colour: str, which: int, history: list) -> Iterator[tuple]:
    """The frames as the tab's outputs: heatmap, summary, group table, chart, row picker, the run's
    events and the session's."""
    n_fig, fig_at, out, n_rows = 0, 0.0, None, 0
    v = render.TraceView()
    for frame in frames:
        views = list(frame.views.values())
        which_ = min(int(which or 0), len(views) - 1) if views else 0
        v = views[which_] if views else render.TraceView()
        decided = sum(a.decision is not None for a in v.attempts)
        # The first frame clears the last run's chart (if any); later ones redraw it when a decision
        # was added, 1.5 s apart (a redraw costs the browser far more than a text update, and the
        # browser shares the CPU with the model).
        fig = gr.update()
        if out is None and history:
            fig = render.trace_figure(render.TraceView())
        elif not frame.finished and decided != n_fig and frame.elapsed - fig_at >= 1.5:
            fig, n_fig, fig_at = render.trace_figure(v, colour), decided, frame.elapsed
        rows = gr.update()
        if len(views) != n_rows:  # the row picker changes only when rollouts start
            n_rows, rows = len(views), gr.update(choices=list(range(len(views))), value=which_)
        total = sum(len(a.tokens) for w in views for a in w.attempts)
        md = render.summary_markdown(v, frame.elapsed, frame.first_token_s, total if len(views) > 1 else None)
        if frame.finished:
            md += f"  \n_finished: {total} tokens over {len(views)} rollout(s)_"
        out = [render.trace_html(v, colour, with_css=False), md,
               render.group_markdown(views) if len(views) > 1 else "", fig, rows, list(frame.events),
               history + (list(frame.events) if frame.finished else [])]
        yield tuple(out)
    if out is not None:
        # The finished text first, then its chart a moment later, so the browser paints the answer
        # before the chart redraw holds its main thread.
        time.sleep(0.1)
        out[3], out[4] = render.trace_figure(v, colour), gr.update()
        yield tuple(out)


def counterfactual(shared: Shared, colour: str, last: list, history: list, *values: Any) -> tuple:
    """The request with erasure on (the run on screen when it is this request) and off, side by side."""
    try:
        job = Job.of(request(shared, values))
        new: list = []
        # The run just shown, if it is this request with erasure on, is reused as is.
        reuse = job.req.erase and same_run(last, job, shared.store.get(job.path)[1])
        on_events = list(last) if reuse else []
        if not on_events:
            on_events = new = _final_events(shared, job)
        off_events = _final_events(shared, Job.of(replace(job.req, erase=False)))
    except E3RLError as err:
        raise gr.Error(str(err)) from None
    on, off = list(render.fold(on_events).values())[0], list(render.fold(off_events).values())[0]
    return (gr.update(visible=True), render.trace_html(on, colour, with_css=False), render.summary_markdown(on),
            render.trace_html(off, colour, with_css=False), render.summary_markdown(off),
            history + new + off_events)


def _final_events(shared: Shared, job: Job) -> list:
    return list(stream_generation(shared.store, job, engine=shared.engine))[-1].events
