"""The workbench's tabs, one module each: ``build(shared, ...)`` lays out the tab's components
inside the open Blocks and wires them to plain handler functions. What a handler computes lives in
``app.session``, ``app.audit``, ``app.render`` and ``app.training`` (gradio-free, tested without a
server); ``app.ui`` builds the Blocks, the shared state, and calls each tab's builder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e3rl_core.errors import E3RLError

from ..effects import EffectsManager
from ..session import ModelStore
from ..training import TrainingManager


@dataclass
class Shared:
    """What more than one tab uses: one per server (the models, the trainer, the deployment's
    mode) plus the browser session's event lists."""

    store: ModelStore
    trainer: TrainingManager
    space: bool
    """Hugging Face Space mode: only the listed models (shipped, default, trained here)."""
    engine: str
    """Where generations run: "thread" or "process" (see ``app.producer``)."""
    default_model: str | None
    shipped: list[str]
    audit_dir: Path
    """Where the Audit tab writes its exports."""
    session_events: Any
    """gr.State: every event of this browser session (generations and counterfactuals)."""
    last_events: Any
    """gr.State: the events of the generation on screen."""
    effects: EffectsManager | None = None
    """Background decision-effect jobs (the Audit tab's "Decision effects")."""

    def model_choices(self) -> list[str]:
        """The model picker's entries: shipped checkpoints, the default, then every trained checkpoint."""
        trained = [str(p) for p in self.trainer.checkpoints()]
        extra = [self.default_model] if self.default_model and self.default_model not in self.shipped else []
        return self.shipped + extra + trained

    def check_model(self, model: str | None, action: str) -> None:
        """In a Space, refuse a model that is not listed (a typed path could be anything on the host)."""
        if self.space and model not in self.model_choices():
            raise E3RLError(f"in this Space only the listed models can be {action}: {str(model)[:200]!r} is not "
                            f"one of them (a Space runs offline, on a CPU its visitors share); pick one from "
                            f"the list, or run the workbench locally (`./run demo`) to use any model")
