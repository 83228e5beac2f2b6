"""The Train tab: start and stop one background ``e3rl train`` run on the model picked in the
Generate tab, and watch its status, settings, curves and latest rollout while the tab is open.
Its public endpoints: ``/start_training``, ``/stop_training`` and ``/training_status``."""
from __future__ import annotations

from dataclasses import fields

import gradio as gr

from e3rl_core.errors import E3RLError

from .. import render
from ..session import resolve
from ..training import EVAL_PROBLEMS, RunRequest, curves_spec, latest_trace_events, read_status, rollout_html, status_markdown
from . import Shared

MAX_EVAL_PROBLEMS = 1000
EVAL_SECONDS_PER_100 = 45
"""What scoring 100 held-out problems (Avg@4) takes with the shipped model on a 2-core CPU: a
5-step run spends about as long on each evaluation as on its training, which the form says."""
MAX_STEPS = 500
"""The steps slider's end. A deployment that trains fewer (a Space: 30) lowers a larger request
and says so, rather than the slider silently stopping short."""


def build(shared: Shared, model: gr.Dropdown) -> tuple[gr.Tab, gr.Timer]:
    """The tab, and its timer (active only while the tab is open; ``app.ui`` switches it)."""
    d = {f.name: f.default for f in fields(RunRequest)}
    bound = shared.trainer.max_steps
    with gr.Tab("Train", id="train") as tab:
        with gr.Row():
            algo = gr.Dropdown(["e3rl", "grpo", "dapo"], value=d["algo"], label="algorithm")
            # the slider ends at the deployment's bound (a Space: 30), so it offers only what runs
            steps = gr.Slider(1, bound or MAX_STEPS, value=min(d["steps"], bound or MAX_STEPS), step=1, label="steps",
                              info=f"this deployment trains at most {bound} steps per run" if bound else None)
            group = gr.Slider(2, 16, value=d["group_size"], step=1, label="group size")
            prompts = gr.Slider(1, 32, value=d["prompts_per_step"], step=1, label="prompts per step")
            lr = gr.Number(value=d["learning_rate"], label="learning rate")
            seed = gr.Number(value=d["seed"], precision=0, label="seed")
            held = gr.Number(value=EVAL_PROBLEMS, precision=0, minimum=0, maximum=MAX_EVAL_PROBLEMS,
                             label="held-out problems",
                             info=f"scored before the first step and after the last (Avg@{d['eval_samples']}): "
                                  f"about {EVAL_SECONDS_PER_100:.0f} s per 100 problems each time on a 2-core CPU; "
                                  "0: none")
        with gr.Row():
            start_btn = gr.Button("Start training", variant="primary")
            stop_btn = gr.Button("Stop", elem_id="e3rl-train-stop")
        msg = gr.Markdown(elem_id="e3rl-train-status", label="status")
        plot = gr.Plot(label="training curves", elem_id="e3rl-train-curves")
        rollout = gr.HTML(label="latest rollout", elem_id="e3rl-train-rollout")
        timer = gr.Timer(2.0, active=False)

    def start_training(model: str | None, algo: str = d["algo"], steps: int = d["steps"],
                       group_size: int = d["group_size"], learning_rate: float = d["learning_rate"],
                       seed: int = d["seed"], prompts_per_step: int = d["prompts_per_step"],
                       eval_problems: int = EVAL_PROBLEMS, request: gr.Request = None) -> str:
        """Start a background training run of `model` (a listed model or a local directory); returns
        a line saying which run started, or why none did. `eval_problems` held-out problems are
        scored before the first step and after the last (0: none)."""
        return start_run(shared, model, algo, steps, group_size, learning_rate, seed, prompts_per_step,
                         eval_problems, owner=visitor(request))

    def stop_training(request: gr.Request = None) -> str:
        """Ask the running run to stop after its current step (it writes a checkpoint first)."""
        return shared.trainer.stop(visitor(request))

    def training_status(request: gr.Request = None) -> tuple:
        """The newest run: its status line (step from its log, model and settings from its run.json),
        its training curves, and its latest logged rollout as a heatmap."""
        return status(shared, visitor(request))

    def model_choices(current: str | None):  # new checkpoints appear in the Generate tab's model box
        return gr.update(choices=shared.model_choices(), value=current)

    start_btn.click(start_training, [model, algo, steps, group, lr, seed, prompts, held], msg,
                    api_name="start_training")
    stop_btn.click(stop_training, None, msg, api_name="stop_training")
    timer.tick(training_status, None, [msg, plot, rollout], api_name="training_status",
               show_progress="hidden").then(model_choices, model, model, api_visibility="private",
                                            show_progress="hidden")
    # Opening the tab shows the status at once, not at the timer's first tick.
    tab.select(training_status, None, [msg, plot, rollout], api_visibility="private")
    return tab, timer


def visitor(request: gr.Request | None) -> str | None:
    """The browser session a call comes from (a Space keeps each visitor's run to them)."""
    return getattr(request, "session_hash", None) if request is not None else None


def start_run(shared: Shared, model: str | None, algo: str, steps: int, group_size: int, learning_rate: float,
              seed: int, prompts_per_step: int = RunRequest.prompts_per_step, eval_problems: int = EVAL_PROBLEMS,
              owner: str | None = None) -> str:
    try:
        n_eval = int(eval_problems or 0)
        if not 0 <= n_eval <= MAX_EVAL_PROBLEMS:
            raise E3RLError(f"held-out problems must be between 0 (none) and {MAX_EVAL_PROBLEMS}, got {n_eval}")
        if int(prompts_per_step) < 1:
            raise E3RLError(f"prompts per step must be at least 1, got {prompts_per_step}")
        shared.check_model(model, "trained")
        chosen = model or shared.default_model
        if not chosen:
            raise E3RLError("no model chosen; pick one in the Generate tab's model box")
        steps, note = shared.trainer.clamp_steps(int(steps))
        # Resolved as the Generate tab resolves it: the training process must not read a relative
        # path against the server's working directory (or take it for a hub id).
        out = shared.trainer.start(RunRequest(
            model=resolve(chosen), algo=algo, steps=steps, group_size=int(group_size),
            prompts_per_step=int(prompts_per_step), learning_rate=float(learning_rate), seed=int(seed),
            eval_data=eval_spec(n_eval)), owner=owner)
    except E3RLError as err:
        return f"⚠️ {err}"
    return f"started {out.name}" + (f" (⚠️ {note})" if note else "")


def eval_spec(n: int) -> str | None:
    """The held-out set of ``n`` test-split problems of the synthetic task (the training data's
    counterpart: no test question is ever trained on); None for 0."""
    return f"synthetic:test?n={n}" if n > 0 else None


def status(shared: Shared, owner: str | None = None) -> tuple:
    """The newest run's status markdown, curves figure and latest rollout (with visitors kept apart:
    the visitor's own newest run, and only that another visitor's run holds the slot)."""
    trainer = shared.trainer
    active = trainer.active()
    busy = ""
    if active and not trainer.owns(active, owner):
        busy = "another visitor's training run holds this Space's one run slot; yours can start when it ends"
        active = None
    runs = trainer.runs(owner)
    if not runs:
        return busy or "no training run yet", None, ""
    st = read_status(runs[0])
    rows = st.get("rows", [])
    fig = render.as_figure(curves_spec(rows)) if rows else None
    text = status_markdown(runs[0], st, active, show_paths=not trainer.visitors_apart)
    return "\n\n".join(x for x in (busy, text) if x), fig, rollout_html(latest_trace_events(runs[0]))
