"""The Train tab: start and stop one background ``e3rl train`` run on the model picked in the
Generate tab, and watch its curves and latest rollout while the tab is open."""
from __future__ import annotations

from dataclasses import fields

import gradio as gr

from e3rl_core.errors import E3RLError

from .. import render
from ..session import resolve
from ..training import RunRequest, latest_trace_events, read_status, status_markdown
from . import Shared


def build(shared: Shared, model: gr.Dropdown) -> tuple[gr.Tab, gr.Timer]:
    """The tab, and its timer (active only while the tab is open; ``app.ui`` switches it)."""
    d = {f.name: f.default for f in fields(RunRequest)}
    with gr.Tab("Train") as tab:
        with gr.Row():
            algo = gr.Dropdown(["e3rl", "grpo", "dapo"], value=d["algo"], label="algorithm")
            # the slider stops where this deployment's trainer does (30 steps in a Space)
            steps = gr.Slider(1, shared.trainer.max_steps or 500, value=d["steps"], step=1, label="steps")
            group = gr.Slider(2, 16, value=d["group_size"], step=1, label="group size")
            lr = gr.Number(value=d["learning_rate"], label="learning rate")
            seed = gr.Number(value=d["seed"], precision=0, label="seed")
        with gr.Row():
            start_btn = gr.Button("Start training", variant="primary")
            stop_btn = gr.Button("Stop")
        msg = gr.Markdown()
        plot = gr.Plot(label="training curves")
        rollout = gr.HTML(label="latest rollout")
        timer = gr.Timer(2.0, active=False)

    def on_start(mdl: str, algo_: str, steps_: int, grp: int, rate: float, sd: int) -> str:
        return start_run(shared, mdl, algo_, steps_, grp, rate, sd)

    def on_poll(current_model: str) -> tuple:
        return poll(shared, current_model)

    start_btn.click(on_start, [model, algo, steps, group, lr, seed], msg, api_name="start_training")
    stop_btn.click(shared.trainer.stop, None, msg, api_name="stop_training")
    timer.tick(on_poll, model, [msg, plot, rollout, model])
    return tab, timer


def start_run(shared: Shared, model: str | None, algo: str, steps: int, group_size: int, learning_rate: float,
              seed: int) -> str:
    try:
        shared.check_model(model, "trained")
        chosen = model or shared.default_model
        if not chosen:
            raise E3RLError("no model chosen; pick one in the Generate tab's model box")
        # Resolved as the Generate tab resolves it: the training process must not read a relative
        # path against the server's working directory (or take it for a hub id).
        out = shared.trainer.start(RunRequest(
            model=resolve(chosen), algo=algo, steps=int(steps),
            group_size=int(group_size), learning_rate=float(learning_rate), seed=int(seed)))
    except E3RLError as err:
        return f"⚠️ {err}"
    return f"started {out.name}"


def poll(shared: Shared, current_model: str) -> tuple:
    """The newest run's status, curves and latest rollout; and the model picker, with new checkpoints."""
    runs = shared.trainer.runs()
    if not runs:
        return "no training run yet", None, "", gr.update()
    st = read_status(runs[0])
    rows = st.get("rows", [])
    fig = render.as_figure(render.training_spec(rows)) if rows else None
    evs = latest_trace_events(runs[0])
    html = render.trace_html(list(render.fold(evs).values())[-1], with_css=False) if evs else ""
    return (status_markdown(runs[0], st, bool(shared.trainer.active())), fig, html,
            gr.update(choices=shared.model_choices(), value=current_model))
