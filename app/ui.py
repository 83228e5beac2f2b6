"""The workbench's Blocks: the shared state, each tab's builder (``app.tabs``), and the wiring
between tabs. What a handler computes lives in ``session``, ``render``, ``audit`` and ``training``
(all gradio-free and tested without a server)."""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import gradio as gr

from e3rl_core.errors import E3RLError

from .session import SPACE_MAX_MODEL_BYTES, ModelStore, defaults, resolve, shipped_models
from .tabs import Shared, audit, generate, train
from .tabs.generate import GEN_FIELDS, examples
from .effects import SPACE_MAX_ROWS, EffectsManager
from .training import TrainingManager

__all__ = ["DEFAULTS", "GEN_FIELDS", "build", "examples"]

DEFAULTS = defaults()  # the Generate tab's starting values (GenRequest's field defaults), for tests and scripts


CACHE_MAX_AGE_S = 600
"""Files gradio keeps for this app (uploads never passed to a load, exports offered for download)
are deleted 10 to 20 minutes after they were written (checked every 10 minutes), and all of them
when the server stops."""


def build(space: bool = False, runs_root: str | None = None, default_model: str | None = None,
          engine: str = "thread", traces_ttl_s: float = audit.TRACES_TTL_S, device: str = "cpu",
          dtype: str = "auto") -> gr.Blocks:
    """The workbench's Blocks. engine: where generations run, "thread" or "process" (see
    ``app.producer``); traces_ttl_s: how long a session keeps trace files it loaded; device and
    dtype: where and how the models are loaded."""
    store = ModelStore(device=device, dtype=dtype, max_bytes=SPACE_MAX_MODEL_BYTES if space else None)
    # In a Space, training runs offline: its models are local directories, and nothing is fetched.
    trainer = TrainingManager(runs_root or os.environ.get("E3RL_RUNS", "runs/app"), max_steps=30 if space else None,
                              offline=space, device=device, visitors_apart=space)
    effects_jobs = EffectsManager(trainer.root, visitors_apart=space, max_rows=SPACE_MAX_ROWS if space else None,
                                  device=device)
    models = shipped_models()
    default = default_model or (models[0] if models else None)
    if default:  # load before the first click, so it streams at once
        threading.Thread(target=_preload, args=(store, resolve(default)), daemon=True).start()
    with gr.Blocks(title="E3RL workbench", analytics_enabled=False,
                   delete_cache=(CACHE_MAX_AGE_S, CACHE_MAX_AGE_S)) as demo:
        shared = Shared(store=store, trainer=trainer, effects=effects_jobs, space=space, engine=engine, default_model=default,
                        shipped=models, audit_dir=_audit_dir(),
                        session_events=gr.State([]), last_events=gr.State([]))
        gr.Markdown("# E3RL workbench\nWatch the model generate, erase uncertain segments and regenerate them; "
                    "audit every decision; train with GRPO, DAPO or E3RL.")
        # One tab strip at the top: every tab is a sibling of this Tabs (a component between two
        # tabs would start a second strip further down the page).
        with gr.Tabs(elem_id="e3rl-tabs"):
            gen_tab, model = generate.build(shared)
            audit_tab, effects_tab, effects_timer = audit.build(shared, traces_ttl_s)
            train_tab, timer = train.build(shared, model)
        # The Train tab polls its run only while it is open; coming back to Generate lists the
        # checkpoints written meanwhile. Page plumbing, not actions: private (no API endpoint).
        def poll_on() -> gr.Timer:
            return gr.Timer(active=True)

        def poll_off() -> gr.Timer:
            return gr.Timer(active=False)

        def back_to_generate(current: str | None) -> tuple:
            return gr.Timer(active=False), gr.update(choices=shared.model_choices(), value=current)

        train_tab.select(poll_on, None, timer, api_visibility="private")
        gen_tab.select(back_to_generate, model, [timer, model], api_visibility="private")
        for other in (audit_tab, effects_tab):
            other.select(poll_off, None, timer, api_visibility="private")
        # The decision-effects job is polled while its tab is open (its progress is on disk, so a
        # reloaded page shows it again at the next tick).
        effects_tab.select(poll_on, None, effects_timer, api_visibility="private")
        for other in (gen_tab, audit_tab, train_tab):
            other.select(poll_off, None, effects_timer, api_visibility="private")
        demo.unload(audit.end_session)

        def leave(request: gr.Request) -> None:  # a visitor's run and job end with their visit (a Space)
            trainer.release(request.session_hash if request else None)
            effects_jobs.release(request.session_hash if request else None)

        if space:
            demo.unload(leave)
    return demo


def _audit_dir() -> Path:
    """This server's folder for audit exports, removed when the process ends."""
    path = Path(tempfile.mkdtemp(prefix="e3rl-audit-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def _preload(store: ModelStore, path: str) -> None:
    """Load the first model in the background. A failure (a hub id offline, a broken directory) is
    one line here and shows again, in the page, when the model is used."""
    try:
        store.get(path)
    except E3RLError as err:
        print(f"[e3rl app] could not load {path}: {err}", file=sys.stderr)
