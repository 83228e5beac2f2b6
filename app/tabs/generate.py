"""The Generate tab: a prompt and the E3RL settings in; the streamed heatmap, summary and chart
out; and the counterfactual, the same request with erasure off beside it.

Two endpoints are public (``/generate`` and ``/counterfactual``, for gradio_client); their handlers
name every parameter, because gradio names an endpoint's parameters after its handler's (a
``*values`` handler's read param_3, param_4, ...). Every other listener is UI-only and private.
"""
from __future__ import annotations

import inspect
import threading
import time
from dataclasses import replace
from typing import Any, Iterator

import gradio as gr

from e3rl_core.errors import E3RLError
from e3rl_core.generation.segmenter import SEGMENTERS
from e3rl_core.generation.thresholds import POLICIES
from e3rl_core.tasks import arith

from .. import live, render
from ..session import (ENGINE_CONCURRENCY, MAX_HISTORY_EVENTS, MAX_NEW_TOKENS, SPACE_MAX_NEW_TOKENS, THINKING, Frame,
                       GenRequest, Job, Stops, check_prompt, defaults, same_run, stream_generation, unknown_warning)
from . import Shared

# The order the controls are sent in: GenRequest's fields, and the API's parameters after the
# leading ones (the handlers below name them in this order; a test checks they agree).
GEN_FIELDS = ["model", "prompt", "gold", "temperature", "top_p", "max_new_tokens", "signal", "segment_mode",
              "segment_tokens", "policy", "kappa", "threshold_value", "warmup_segments", "erase_budget", "erase",
              "group_size", "seed", "thinking"]


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
    with gr.Tab("Generate", id="generate") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                controls = _prompt_controls(shared)
            with gr.Column(scale=1):
                controls.update(_settings(shared))
                color_by = gr.Radio(["entropy", "surprisal"], value="entropy", label="colour tokens by",
                                    elem_id="e3rl-colour")
                collapse = gr.Checkbox(label="collapse decided segments to one line (score vs threshold, erasures)",
                                       elem_id="e3rl-collapse")
                with gr.Row():
                    go_btn = gr.Button("Generate", variant="primary", elem_id="e3rl-generate")
                    stop_btn = gr.Button("Stop", elem_id="e3rl-stop")
                    cf_btn = gr.Button("Counterfactual (erasure off)")
        row, legend, edits, cf_outputs, shown = _views()
        # /generate for scripts: the same run with the whole heatmap in every frame (no page to edit).
        # Its listener sits on a button nobody sees; the page's own button is the one above.
        api_btn = gr.Button("generate (API)", elem_classes=["e3rl-offstage"])
        # (inside the tab: a component between two tabs would throw the strip's tabs out of step)
        run_info = gr.State({})  # the shown run's timing, warning and whether it was stopped (for redraws)
    inputs = [controls[name] for name in GEN_FIELDS]
    last, history = shared.last_events, shared.session_events
    stops = Stops()

    def generate_endpoint(colour_by: str, rollout: int, history: list, model: str, prompt: str, gold: str,
                          temperature: float, top_p: float, max_new_tokens: int, signal: str, segment_mode: str,
                          segment_tokens: int, policy: str, kappa: float, threshold_value: float,
                          warmup_segments: int, erase_budget: int, erase: bool, group_size: int, seed: int,
                          thinking: str, request: gr.Request) -> Iterator[tuple]:
        """Generate a group of rollouts with erasure, streamed: each update is the heatmap (HTML), the
        summary (markdown: answer, counts, timing), the group table, the chart and the rollout picker.

        Parameters:
            colour_by: "entropy" or "surprisal", the signal the heatmap colours tokens by
            rollout: which rollout of the group the heatmap, summary and chart show (0-based)
            model: a shipped or trained checkpoint directory, or a local model directory
            prompt: a one-line question (wrapped in the task template) or full prompt text
            gold: the known answer, checked against the model's ("" for none)
            temperature: sampling temperature (0 = greedy)
            top_p: nucleus sampling mass
            max_new_tokens: tokens to generate at most per rollout
            signal: the decision signal, "surprisal" or "entropy"
            segment_mode: how the trace is cut into segments
            segment_tokens: segment length in tokens (fixed mode; a cap otherwise)
            policy: threshold policy
            kappa: κ of the e3rl baseline μ + κσ
            threshold_value: the fixed policy's threshold
            warmup_segments: segments decided before any is erased
            erase_budget: erasures allowed per segment (Erase@K)
            erase: erasure on (False: plain sampling, for comparison)
            group_size: rollouts generated together (G)
            seed: rollout r samples with seed + r
            thinking: "default", "on" or "off": enable_thinking for a chat template that reads it (Qwen3),
                applied to a one-line question
        """
        yield from run(locals(), edits=False)

    def generate_in_page(*args: Any, **kwargs: Any) -> Iterator[tuple]:
        """The Generate button: /generate's frames, the heatmap sent as edits while it streams."""
        yield from run(signature.bind(*args, **kwargs).arguments, edits=True)

    # gradio passes arguments (and the request) by the handler's signature: the button's handler
    # takes exactly /generate's.
    signature = inspect.signature(generate_endpoint)
    generate_in_page.__signature__ = signature  # type: ignore[attr-defined]
    generate_in_page.__annotations__ = generate_endpoint.__annotations__  # where gradio finds gr.Request

    def run(params: dict[str, Any], edits: bool) -> Iterator[tuple]:
        request = params.get("request")
        with stops.watch(request.session_hash if request else None) as stop:
            yield from generate(shared, params["colour_by"], params["rollout"], params["history"],
                                _request_values(params), stop, edits=edits)

    def counterfactual_endpoint(colour_by: str, shown_run: list, history: list, model: str, prompt: str, gold: str,
                                temperature: float, top_p: float, max_new_tokens: int, signal: str,
                                segment_mode: str, segment_tokens: int, policy: str, kappa: float,
                                threshold_value: float, warmup_segments: int, erase_budget: int, erase: bool,
                                group_size: int, seed: int, thinking: str) -> tuple:
        """The same request with erasure on and with erasure off, rollout 0 of each side by side: its
        heatmap (HTML) and summary (markdown) with erasure, then without. The run on screen is reused
        when it is this request.

        Parameters:
            colour_by: "entropy" or "surprisal", the signal the heatmaps colour tokens by
            model: as for /generate, and every parameter after it
        """
        return counterfactual(shared, colour_by, shown_run, history, _request_values(locals()))

    def stop_running(request: gr.Request) -> None:
        stops.stop(request.session_hash)

    joined = dict(fn=join_history, inputs=[history, last, run_info], outputs=history, api_visibility="private")
    # At once in the page, before the server answers: the heatmap scrolls into view, a bar says the
    # run is under way, and the last run's views dim until the first frame replaces them (an error
    # leaves them dimmed and says so: they are the previous run's). Registered first: gradio runs a
    # button's listeners in the order they were added.
    go_btn.click(None, js=live.BUSY_JS, api_visibility="private")
    run_click = go_btn.click(generate_in_page, [color_by, row, history, *inputs], [*shown, last, run_info, edits],
                             concurrency_limit=ENGINE_CONCURRENCY, concurrency_id="engine",
                             show_progress="hidden",  # the spinner would repaint all run long
                             api_visibility="private")
    run_click.then(**joined).then(None, js=live.IDLE_JS, api_visibility="private")
    run_click.success(None, js=live.FRESH_JS, api_visibility="private")  # (frames already did, unless none came)
    run_click.failure(None, js=live.IDLE_JS, api_visibility="private")  # gradio runs no .then after an error

    # (gradio_client runs no .then steps: the API's frames carry the session's events themselves)
    api_btn.click(generate_endpoint, [color_by, row, history, *inputs], [*shown, last, history, run_info],
                  concurrency_limit=ENGINE_CONCURRENCY, concurrency_id="engine", api_name="generate")
    _wire_page_scripts(edits, collapse)
    # Stop ends the session's runs at their next token, and each then sends its last frame (see
    # Stops); cancelling the handler instead would leave the page mid-run.
    stop_btn.click(stop_running, None, None, queue=False, api_visibility="private")
    _wire_redraws(color_by, row, legend, cf_outputs[0], dict(fn=draw, inputs=[last, row, color_by, run_info],
                                                            outputs=shown, api_visibility="private"))
    cf_btn.click(counterfactual_endpoint, [color_by, last, history, *inputs], [*cf_outputs, history],
                 concurrency_limit=ENGINE_CONCURRENCY, concurrency_id="engine", api_name="counterfactual")
    return tab, controls["model"]


def _wire_redraws(color_by: gr.Radio, row: gr.Radio, legend: gr.HTML, cf_row: gr.Row, redraw: dict) -> None:
    """Another colour or rollout redraws the finished run (``redraw``: the ``draw`` listener)."""
    color_by.change(**redraw)
    color_by.change(render.legend_html, color_by, legend, api_visibility="private")
    row.change(**redraw)
    # The counterfactual compares rollout 0: another rollout on screen hides it rather than leave it
    # standing beside a trace it is not the counterfactual of.
    row.change(lambda r: gr.update(visible=False) if r else gr.update(), row, cf_row, api_visibility="private")


def _wire_page_scripts(edits: gr.Textbox, collapse: gr.Checkbox) -> None:
    """Listeners that run in the page only: the live edits applied to the heatmap, and collapse."""
    edits.change(None, edits, None, js=live.live_js("#e3rl-heatmap"), api_visibility="private")
    # A long trace reads segment by segment: decided segments fold to their one-line summary (CSS
    # on the heatmap element; nothing is sent, and edits keep applying underneath).
    collapse.change(None, collapse, None, api_visibility="private", js=live.collapse_js("#e3rl-heatmap"))


def _views() -> tuple:
    """The run's views, under the controls: the rollout picker, the legend, the heatmap (and the
    hidden box its live edits travel through), the summary, the counterfactual panel, the group
    table and the chart. Returns (row, legend, edits, counterfactual outputs, the views a frame fills)."""
    row = gr.Radio([0], value=0, label="rollout of the group", type="value")
    legend = gr.HTML(render.legend_html("entropy"), elem_id="e3rl-legend")
    # Labels name the API's return values (none is drawn: HTML and Markdown hide theirs).
    heatmap = gr.HTML(live.page_html(render.TraceView()), elem_id="e3rl-heatmap", label="heatmap")
    # While a run streams, the heatmap is edited in the page (app.live): each frame sends what
    # changed, not the whole trace; the last frame and every redraw send the whole trace.
    edits = gr.Textbox(elem_id="e3rl-live-edits", elem_classes=["e3rl-offstage"], label="heatmap edits")
    summary = gr.Markdown(elem_id="e3rl-summary", label="summary")
    cf_outputs = _counterfactual_panel()  # under the run it compares with, above the table and chart
    shown = [heatmap, summary, gr.Markdown(label="group table"),
             # An empty chart from the start: the browser loads plotly with the page, not on the first click.
             gr.Plot(render.trace_figure(render.TraceView()), label="scores vs thresholds; per-token signal",
                     elem_id="e3rl-chart"), row]
    return row, legend, edits, cf_outputs, shown


def _request_values(params: dict[str, Any]) -> tuple:
    """A handler's named request parameters, in GEN_FIELDS order."""
    return tuple(params[name] for name in GEN_FIELDS)


def _prompt_controls(shared: Shared) -> dict[str, Any]:
    first = examples()[0]
    model = gr.Dropdown(shared.model_choices(), value=shared.default_model, label="model",
                        # A Space takes a typed name too, and refuses it with the reason (rather than the box
        # silently going back to a listed model).
        allow_custom_value=True, elem_id="e3rl-model")
    if not shared.space:
        gr.Markdown("Any local model directory, or a hub id when online, can be typed into the model box.")
    prompt = gr.Textbox(label="prompt (a one-line question is wrapped in the task template)", lines=3, value=first[0],
                        elem_id="e3rl-prompt")
    gold = gr.Textbox(label="gold answer (optional: shows ✓/✗)", value=first[1], elem_id="e3rl-gold")
    # Qwen3's chat template opens an empty think block when enable_thinking is false; other
    # templates do not read the flag, and the shipped model has no chat template at all.
    thinking = gr.Radio(list(THINKING), value=defaults()["thinking"], elem_id="e3rl-thinking",
                        label="thinking (enable_thinking of a chat template that reads it, e.g. Qwen3's; "
                              "one-line questions)")
    gr.Examples(examples(), inputs=[prompt, gold], label="examples", api_visibility="private")
    return {"model": model, "prompt": prompt, "gold": gold, "thinking": thinking}


def _settings(shared: Shared) -> dict[str, Any]:
    """The sampling and E3RL controls, starting at GenRequest's defaults."""
    d = defaults()
    most = SPACE_MAX_NEW_TOKENS if shared.space else MAX_NEW_TOKENS  # a Space's CPU is shared by every visitor
    with gr.Accordion("sampling and E3RL", open=False):
        c = {
            "temperature": gr.Slider(0, 2, value=d["temperature"], step=0.05, label="temperature (0 = greedy)"),
            "top_p": gr.Slider(0.05, 1, value=d["top_p"], step=0.05, label="top-p"),
            "max_new_tokens": gr.Slider(16, most, value=d["max_new_tokens"], step=16,
                                        label=f"max new tokens (at most {most:,} here)", elem_id="e3rl-max-new-tokens"),
            "signal": gr.Radio(["surprisal", "entropy"], value=d["signal"], label="decision signal"),
            "segment_mode": gr.Dropdown(SEGMENTERS.names(), value=d["segment_mode"], label="segment mode"),
            "segment_tokens": gr.Slider(4, 512, value=d["segment_tokens"], step=4, label="segment length (tokens)",
                                        elem_id="e3rl-segment-tokens"),
            "policy": gr.Dropdown(POLICIES.names(), value=d["policy"], label="threshold policy"),
            "kappa": gr.Slider(0, 3, value=d["kappa"], step=0.1, label="κ (e3rl baseline μ + κσ)"),
            "threshold_value": gr.Slider(0, 5, value=d["threshold_value"], step=0.05, label="fixed threshold"),
            "warmup_segments": gr.Slider(0, 8, value=d["warmup_segments"], step=1, label="warm-up segments"),
            "erase_budget": gr.Slider(0, 8, value=d["erase_budget"], step=1, label="erase budget K (Erase@K)"),
            "erase": gr.Checkbox(value=d["erase"], label="erasure on"),
        }
    c["group_size"] = gr.Slider(1, 8, value=d["group_size"], step=1, label="group size G", elem_id="e3rl-group-size")
    c["seed"] = gr.Number(value=d["seed"], precision=0, label="seed")
    return c


def _counterfactual_panel() -> list[Any]:
    """Hidden until a counterfactual is asked for: the run with erasure beside the run without."""
    with gr.Row(visible=False, elem_id="e3rl-counterfactual") as cf_row:
        with gr.Column():
            gr.Markdown("**rollout 0 with erasure**")
            cf_on, cf_on_md = gr.HTML(label="heatmap with erasure"), gr.Markdown(label="summary with erasure")
        with gr.Column():
            gr.Markdown("**rollout 0, erasure off (same prompt and seed)**")
            cf_off, cf_off_md = gr.HTML(label="heatmap, erasure off"), gr.Markdown(label="summary, erasure off")
    return [cf_row, cf_on, cf_on_md, cf_off, cf_off_md]


def request(shared: Shared, values: tuple) -> GenRequest:
    """The controls' values as a request (a Space refuses unlisted models and long generations here)."""
    kw = dict(zip(GEN_FIELDS, values))
    shared.check_model(kw["model"], "used")
    req = GenRequest(**kw)
    if shared.space and req.max_new_tokens > SPACE_MAX_NEW_TOKENS:
        raise E3RLError(f"this Space generates at most {SPACE_MAX_NEW_TOKENS:,} new tokens; lower max new tokens")
    return req


def draw(events: list, which: int, colour: str, info: dict | None = None) -> tuple:
    """Heatmap, summary, group table, chart and row picker for rollout ``which`` of a finished run;
    ``info``: the run's timing, warning and whether it was stopped, as ``_stream`` recorded them."""
    info = info or {}
    views = list(render.fold(events).values())
    if not views:
        return live.page_html(render.TraceView(), colour), "", "", None, gr.update()
    if info.get("stopped"):
        for v in views:
            if v.done is None and v.error is None:
                v.stop()
    which = min(int(which or 0), len(views) - 1)
    v = views[which]
    grp = render.group_markdown(views) if len(views) > 1 else ""
    md = (render.summary_markdown(v, info.get("seconds"), info.get("first_token_s"), info.get("group_tokens"),
                                  info.get("warning")) + info.get("tail", "") + render.prompt_markdown(v))
    return (live.page_html(v, colour), md, grp, render.trace_figure(v, colour),
            gr.update(choices=list(range(len(views))), value=which))


def generate(shared: Shared, colour: str, which: int, history: list, values: tuple,
             stop: threading.Event | None = None, edits: bool = False) -> Iterator[tuple]:
    """The Generate click: frames of the run as the tab's outputs (see ``_stream``). ``stop``: set
    to end the run at its next token; a last frame then says where it stopped. ``edits``: for the
    page's button (the heatmap as edits while it streams) rather than the API (the whole heatmap)."""
    try:
        req = request(shared, values)
        check_prompt(req.prompt)
        job = Job.of(req)
        warning = unknown_warning(shared.store.get(job.path)[1], req)  # loads the model (once)
        if warning:
            gr.Warning(warning)
        # Frames at most every 0.25 s: each update is serialized and drawn by a browser that shares
        # the CPU with the model.
        frames = stream_generation(shared.store, job, min_interval=0.25, stop=stop, engine=shared.engine)
        yield from _stream(frames, colour, which, history, warning, edits)
    except E3RLError as err:
        raise gr.Error(str(err)) from None


def _stream(frames: Iterator[Frame], colour: str, which: int, history: list,
            warning: str | None = None, edits: bool = False) -> Iterator[tuple]:
    """The frames as the tab's outputs: heatmap, summary, group table, chart, row picker, the run's
    events, the session's events (the API's frames; the page's leave them to ``join_history``, see
    ``build``), the run's info for redraws (timing, warning, stopped), and the heatmap's edits (the
    page's frames, ``edits``). Then while the run streams the heatmap itself is left alone and the
    edits (``app.live``) bring the page up to date, so a frame costs what changed; the last frame
    sends the whole trace (what a redraw or a reconnect shows)."""
    n_fig, fig_at, out, n_rows = 0, 0.0, None, 0
    v = render.TraceView()
    page = live.LiveFrames(colour)
    for seq, frame in enumerate(frames):
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
        total = sum(w.generated() for w in views)
        info = dict(seconds=frame.elapsed, first_token_s=frame.first_token_s,
                    group_tokens=total if len(views) > 1 else None, warning=warning, stopped=frame.stopped)
        if frame.finished:
            info["tail"] = (f"  \n_{'stopped' if frame.stopped else 'finished'}: {total} tokens over "
                            f"{len(views)} rollout(s)_")
        md = render.summary_markdown(v, info["seconds"], info["first_token_s"], info["group_tokens"], warning)
        # A stopped run's partial traces join the session's events too: the Audit tab shows them.
        if not edits:  # the API: the whole trace in every frame
            heatmap, ops = render.trace_html(v, colour, with_css=False), ""
        elif frame.finished:
            heatmap, ops = live.page_html(v, colour), live.encode([], seq)
        else:
            heatmap, ops = gr.skip(), live.encode(page.frame(v), seq)
        events = list(frame.events)
        # the prompt as the model read it (after the chat template), once the run has ended: re-sent
        # every frame, a block the user opened would close at each one
        prompt = render.prompt_markdown(v) if frame.finished else ""
        out = [heatmap, md + info.get("tail", "") + prompt, render.group_markdown(views) if len(views) > 1 else "", fig,
               rows, events]
        out += [info, ops] if edits else [cap_history(history + (events if frame.finished else [])), info]
        yield tuple(out)
    if out is not None:
        # The finished text first, then its chart a moment later, so the browser paints the answer
        # before the chart redraw holds its main thread.
        time.sleep(0.1)
        out[3], out[4] = render.trace_figure(v, colour), gr.update()
        yield tuple(out)


def join_history(history: list, events: list, info: dict | None) -> list:
    """The session's events with the run that just ended added, once: the step after each Generate
    click. ``events``/``info``: the run's, as its last frame left them. A run that failed before
    its first frame leaves the previous run's there (already in the history: not added again); one
    that failed midway (no "finished"/"stopped" line in ``info``) is not added.

    This is a step of its own rather than an output of every frame because the Audit tab listens
    to the session's events: gradio hashes a listened-to state before and after every frame of a
    handler that outputs it, which costs O(the whole session) per frame."""
    if not events or not (info or {}).get("tail"):
        return history
    first = events[0].trace_id
    if any(e.trace_id == first for e in history):
        return history
    return cap_history(history + list(events))


def cap_history(events: list) -> list:
    """A session's generated events, the oldest runs dropped past ``MAX_HISTORY_EVENTS`` (whole
    traces: the newest ones kept), as loaded trace files are bounded per session."""
    if len(events) <= MAX_HISTORY_EVENTS:
        return events
    counts: dict[str, int] = {}
    for e in events:
        counts[e.trace_id] = counts.get(e.trace_id, 0) + 1
    keep, total = set(), 0
    for tid in reversed(list(counts)):  # newest first (traces in order of first appearance)
        if total + counts[tid] > MAX_HISTORY_EVENTS:
            break
        keep.add(tid)
        total += counts[tid]
    return [e for e in events if e.trace_id in keep]


def counterfactual(shared: Shared, colour: str, last: list, history: list, values: tuple) -> tuple:
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
            cap_history(history + new + off_events))


def _final_events(shared: Shared, job: Job) -> list:
    return list(stream_generation(shared.store, job, engine=shared.engine))[-1].events
