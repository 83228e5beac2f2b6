"""What the handlers do, as plain functions and generators (no gradio import).

``ModelStore`` loads each model once and shares it between sessions (inference only; every
generation gets its own ``ErasableGenerator`` and event list, so two users never see each other's
tokens). ``stream_generation`` turns the engine's event stream into rendered frames at a bounded
rate, so the browser is not flooded with one update per token.

A request travels once: ``GenRequest`` is what the Generate tab sends (its field defaults are the
tab's starting values), ``Job.of`` resolves its model path and builds its config where it enters,
and everything downstream (the store, the engine, the producers, ``same_run``) takes the ``Job``.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from e3rl_core.errors import E3RLError
from e3rl_core.events import Event, Trace
from e3rl_core.generation.config import GenerationConfig
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.models import load_model, recommended_config
from e3rl_core.overrides import apply_overrides, with_values
from e3rl_core.tasks.rewards import extract_answer, is_correct, prompt_opens_think

from .producer import ENGINES, ProcessProducer, Producer, Workers, fork_available, fork_safe
from .render import TraceView, fold

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints"
MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 16_384
"""The most new tokens one generation may ask for: a long reasoning trace (the paper samples up to
16 x 512)."""
SPACE_MAX_NEW_TOKENS = 1_024
ENGINE_CONCURRENCY = 2
"""Generations running at once in the whole server: the page's Generate, /generate and
/counterfactual share this one limit (a gradio concurrency group); the rest wait in the queue."""
MAX_HISTORY_EVENTS = 100_000
"""A session keeps its generated runs up to this many events (~30 MB; a 4k-token run is ~5k
events); past it the oldest runs leave the Audit tab (export them first)."""
SPACE_MAX_MODEL_BYTES = 4 * 2**30
"""In a Space, a model whose config describes more than 4 GiB of weights is refused before it is built."""
"""The most in Space mode, whose CPU is shared by every visitor (as its training runs are bounded)."""


def shipped_models() -> list[str]:
    """Checkpoint directories shipped with the project (relative paths, for display)."""
    if not SHIPPED.is_dir():
        return []
    return sorted(str(p.relative_to(REPO)) for p in SHIPPED.iterdir() if (p / "config.json").is_file())


def resolve(model: str) -> str:
    """A display path to a loadable one, the same wherever the app was started: an absolute path as
    is; a relative one against the repository (the shipped checkpoints are listed relative to it),
    else against the working directory (trained checkpoints under a relative runs directory); any
    other name unchanged, for ``load_model`` to fetch as a hub id (or report missing)."""
    p = Path(model).expanduser()
    if p.is_absolute():
        return str(p)
    for base in (REPO, Path.cwd()):
        if (base / p).exists():
            return str(base / p)
    return model


class ModelStore:
    """Loaded (model, tokenizer) pairs by path, loaded once under a lock on ``device`` in ``dtype``
    (``e3rl app --device/--dtype``); and the forked workers that generate with them (``workers``,
    for the "process" engine, CPU only)."""

    def __init__(self, device: str = "cpu", dtype: str = "auto", max_bytes: int | None = None) -> None:
        self.device = device
        self.max_bytes = max_bytes  # a model whose config describes more weights is refused unbuilt
        self.dtype = dtype
        self._models: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self.workers = Workers(self)

    def loaded(self) -> set[str]:
        """The paths of the loaded models."""
        return set(self._models)

    def forked(self) -> None:
        """Called first in a forked worker: a parent thread may have held the lock at the fork."""
        self._lock = threading.Lock()

    def get(self, path: str) -> tuple[Any, Any]:
        """The model and tokenizer at ``path``, a loadable path (``resolve`` makes one of a display
        path); loaded on first use."""
        with self._lock:
            if path not in self._models:
                self._models[path] = load_model(path, device=self.device, dtype=self.dtype, max_bytes=self.max_bytes)
            return self._models[path]


THINKING = {"default": None, "on": True, "off": False}
"""The thinking control's choices, as ``render_prompt``'s ``enable_thinking``."""


@dataclass
class GenRequest:
    """Everything the Generate tab sends; field names follow ``GenerationConfig``. The field
    defaults are the tab's starting values (``defaults()``), written here only.

    They are where erasure measurably helps the shipped model (docs/results/demo-model.json):
    sampling at T=1 with the group policy, G=4, Erase@3: 0.469 -> 0.550 accuracy. With them, the
    first example's rollout 0 slips, erases three segments and ends correct, while the same seed
    with erasure off ends wrong, with 1, 2 or 4 torch threads alike (float sums differ with the
    thread count, and some seeds' decisions sit close enough to the threshold to flip; checked by
    tests/app/test_render.py)."""

    model: str
    """As the user typed or picked it (a path relative to the repository, or absolute); traces
    record it so. ``Job.of`` resolves it."""
    prompt: str
    gold: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    signal: str = "surprisal"
    segment_mode: str = "delimiter"
    segment_tokens: int = 32
    policy: str = "e3rl"
    kappa: float = 1.0
    threshold_value: float = 2.0
    warmup_segments: int = 2
    erase_budget: int = 3
    erase: bool = True
    group_size: int = 4
    seed: int = 8
    thinking: str = "default"
    """For a one-line question under a chat template that reads ``enable_thinking`` (Qwen3):
    "on" or "off" passes it; "default" leaves the template's own choice."""
    extra: list[str] = field(default_factory=list)
    """Further ``section.field=value`` settings, applied last."""

    def __post_init__(self) -> None:
        # Sliders and API clients send whole numbers as floats (256.0) or text: each numeric field
        # takes its own type here, once, so the config, the seeds and the group size agree.
        for f in fields(self):
            cast = {"int": int, "float": float}.get(str(f.type))
            value = getattr(self, f.name)
            if cast is None or type(value) is cast:
                continue
            try:
                setattr(self, f.name, cast(value))
            except (TypeError, ValueError):
                raise E3RLError(f"{f.name} expects a number, got {value!r}") from None
        if self.thinking not in THINKING:
            raise E3RLError(f"thinking must be one of {', '.join(THINKING)}; got {self.thinking!r}")

    def gold_answer(self) -> str | None:
        """The gold answer as checked (blank means none)."""
        return self.gold.strip() if self.gold and self.gold.strip() else None

    def config(self, path: str | None = None) -> GenerationConfig:
        """The model's recommended config with this request's settings. ``path``: the model's
        resolved path, when the caller has it (``Job.of`` does)."""
        config = with_values(recommended_config(path or resolve(self.model)), {
            "sampling.temperature": self.temperature, "sampling.top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens, "score.signal": self.signal,
            "segment.mode": self.segment_mode, "segment.segment_tokens": self.segment_tokens,
            "threshold.policy": self.policy, "threshold.kappa": self.kappa, "threshold.value": self.threshold_value,
            "threshold.warmup_segments": self.warmup_segments, "erase.budget": self.erase_budget,
            "erase.enabled": self.erase, "record_top_k": 5,
        })
        return apply_overrides(config, self.extra) if self.extra else config


def defaults() -> dict[str, Any]:
    """The Generate tab's starting values: ``GenRequest``'s field defaults."""
    return {f.name: f.default for f in fields(GenRequest) if f.default is not MISSING}


@dataclass(frozen=True)
class Job:
    """A request as it runs: its model path resolved and its config built once, where it enters."""

    req: GenRequest
    path: str
    """The loadable model path (``req.model`` stays as typed, for display and the traces)."""
    config: GenerationConfig

    @classmethod
    def of(cls, req: GenRequest | Job) -> Job:
        if isinstance(req, Job):
            return req
        if not req.model:
            raise E3RLError("no model chosen; pick one in the model box")
        path = resolve(req.model)
        return cls(req, path, req.config(path))


def check_prompt(prompt: str) -> str:
    if not prompt or not prompt.strip():
        raise E3RLError("the prompt is empty; type a question or pick an example")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise E3RLError(f"the prompt has {len(prompt):,} characters; shorten it to at most {MAX_PROMPT_CHARS:,}")
    return prompt


@dataclass
class Frame:
    """One UI update: the events so far (a snapshot), the views folded from them, and timing."""

    events: list[Event]
    views: dict[str, TraceView]
    elapsed: float
    first_token_s: float | None
    finished: bool
    stopped: bool = False
    """The last frame of a generation stopped before every rollout was done: those rollouts' views
    are marked stopped (``TraceView.stop``), and ``events`` holds their partial traces."""


def stream_generation(store: ModelStore, req: GenRequest | Job, *, min_interval: float = 0.08,
                      stop: threading.Event | None = None, engine: str = "thread") -> Iterator[Frame]:
    """Run one generation and yield frames at most every ``min_interval`` seconds (the first
    token at once, and the last frame when the generation ends). Closing the iterator, or setting
    ``stop``, ends the generation at the next token; after ``stop`` a last frame still comes, with
    the partial traces (``Frame.stopped``). ``engine``: where the engine runs, "thread"
    (this process, torch's thread count) or "process" (a forked child on one torch thread; Linux)."""
    if engine not in ENGINES:
        raise E3RLError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "process" and not fork_available():
        raise E3RLError("engine 'process' needs fork (Linux); use engine 'thread'")
    if engine == "process" and not fork_safe(store.device):
        raise E3RLError(f"engine 'process' forks workers, and a {store.device} model does not survive a fork; "
                        f"use engine 'thread'")
    asked = req.req if isinstance(req, Job) else req
    check_prompt(asked.prompt)
    if not 1 <= asked.group_size <= 16:
        raise E3RLError("group size must be between 1 and 16")
    if not 1 <= asked.max_new_tokens <= MAX_NEW_TOKENS:
        raise E3RLError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS:,}, got {asked.max_new_tokens:,}")
    job = Job.of(req)  # a bad setting fails here, in the handler
    store.get(job.path)  # loaded here, so a worker forked now shares it
    run = functools.partial(engine_events, job)
    if engine == "process":
        producer: Producer = ProcessProducer(run, store.workers, job.path)
    else:
        producer = Producer(lambda: run(store))
    yield from _frames(producer, min_interval, stop)


def _frames(producer: Producer, min_interval: float, stop: threading.Event | None) -> Iterator[Frame]:
    """Start ``producer`` and fold its events into frames, as ``stream_generation`` describes."""
    views: dict[str, TraceView] = {}
    t0 = time.perf_counter()
    first: float | None = None
    seen = 0
    producer.start()
    try:
        producer.first_token.wait()  # the first token is shown at once
        while True:
            done = producer.stop.is_set() or (stop is not None and stop.is_set())
            n = len(producer.events)
            for ev in producer.events[seen:n]:
                views.setdefault(ev.trace_id, TraceView()).apply(ev)
                if first is None and ev.kind == "token":
                    first = time.perf_counter() - t0
            seen = n
            if done:
                producer.stop.set()
                producer.join()
                if producer.error is not None:
                    raise producer.error
                for ev in producer.events[seen:]:  # appended after the last look
                    views.setdefault(ev.trace_id, TraceView()).apply(ev)
                # Asked to stop: the rollouts not done are cut short where they stand.
                asked = stop is not None and stop.is_set()
                cut = [v for v in views.values() if asked and v.done is None and v.error is None]
                for v in cut:
                    v.stop()
                yield Frame(list(producer.events), views, time.perf_counter() - t0, first, True, bool(cut))
                return
            yield Frame(producer.events[:n], views, time.perf_counter() - t0, first, False)
            # the next frame after min_interval, or as soon as the generation ends
            deadline = time.perf_counter() + max(min_interval, 0.005)
            while not producer.stop.is_set() and (stop is None or not stop.is_set()):
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                producer.stop.wait(min(left, 0.05))
    finally:
        # The consumer went away (Stop, a closed page) or the run ended: end the engine too, and
        # wait for it, so no generation outlives its request (it stops at the next token).
        producer.stop.set()
        producer.join(timeout=30)


class Stops:
    """Stop requests by browser session. The Generate tab's Stop sets the events of the session's
    running generations instead of cancelling their handlers: a cancelled handler sends nothing
    more, and the page would keep "generating…" and a half-struck trace; a stopped one sends a last
    frame that says where it stopped and keeps the partial trace for the Audit tab."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, set[threading.Event]] = {}

    @contextlib.contextmanager
    def watch(self, session: str | None) -> Iterator[threading.Event]:
        """An event that ``stop(session)`` sets while the block runs (a session of None: no one can)."""
        event = threading.Event()
        key = session or ""
        if key:
            with self._lock:
                self._running.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            if key:
                with self._lock:
                    mine = self._running.get(key, set())
                    mine.discard(event)
                    if not mine:
                        self._running.pop(key, None)

    def stop(self, session: str | None) -> int:
        """Stop every running generation of ``session``; how many there were."""
        with self._lock:
            events = list(self._running.get(session or "", ()))
        for event in events:
            event.set()
        return len(events)


def unknown_characters(tokenizer: Any, text: str) -> list[str] | None:
    """None when ``tokenizer`` reads all of ``text``; else the characters it reads as its unknown
    token, each once in order (empty when only a combination of known characters is unknown). A
    character-level model knows only its task's characters."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk not in tokenizer(text, add_special_tokens=False)["input_ids"]:
        return None
    # each distinct character alone: a few hundred short encodes at most (the prompt is bounded)
    return [ch for ch in dict.fromkeys(text) if unk in tokenizer(ch, add_special_tokens=False)["input_ids"]]


def unknown_warning(tokenizer: Any, req: GenRequest) -> str | None:
    """A one-line warning when the prompt holds characters the model cannot read, else None."""
    chars = unknown_characters(tokenizer, prompt_text(req, tokenizer))
    if chars is None:
        return None
    unk = getattr(tokenizer, "unk_token", None) or "unknown"
    which = ": " + " ".join(repr(c) for c in chars[:12]) + (" …" if len(chars) > 12 else "") if chars else ""
    return (f"the model reads {len(chars) or 'some'} character(s) of the prompt as {unk}{which}; "
            f"rephrase it with characters the model knows (the shipped model knows only its task's)")


def engine_events(job: Job, store: ModelStore) -> Iterator[Event]:
    """The engine's event stream for one request (run in a thread, or in a forked worker with its
    copy of the store)."""
    req = job.req
    model, tok = store.get(job.path)
    prompt = prompt_text(req, tok)
    checker, answer_fn = answer_hooks(prompt)
    gen = ErasableGenerator(model, tok, job.config, model_name=req.model, checker=checker, answer_fn=answer_fn)
    gold = req.gold_answer()
    return gen.stream(prompt, group_size=req.group_size, seed=req.seed, golds=None if gold is None else [gold])


def answer_hooks(prompt: str) -> tuple[Callable[[str, str], bool], Callable[[str], str | None]]:
    """The answer checker and reader for completions of ``prompt``: a chat template that leaves
    the think block open in the prompt (DeepSeek-R1 distills) starts every completion inside the
    reasoning, so its answer comes only after the closing tag (as the trainer reads it)."""
    opened = prompt_opens_think(prompt)
    return functools.partial(is_correct, opened=opened), functools.partial(extract_answer, opened=opened)


def prompt_text(req: GenRequest, tokenizer: Any) -> str:
    """The prompt as generated: a bare one-line question gets the task's template (the model's
    chat template, with ``req.thinking``); a full prompt is used as written."""
    from e3rl_core.tasks.datasets import DataError, render_prompt

    prompt = req.prompt
    if not prompt.rstrip().endswith("Answer:") and "\n" not in prompt.strip():
        try:
            prompt = render_prompt(prompt.strip(), tokenizer, enable_thinking=THINKING[req.thinking])
        except DataError as err:
            if "enable_thinking" not in str(err):
                raise
            raise E3RLError(f"thinking {req.thinking!r} needs a chat template that reads enable_thinking (Qwen3's "
                            f"does) and this model's does not; set thinking to 'default'") from None
    return prompt


def same_run(events: list[Event], req: GenRequest | Job, tokenizer: Any) -> bool:
    """Whether ``events`` are a finished generation of exactly ``req`` (model, prompt, settings,
    seed, group size, gold), so the Counterfactual can reuse them instead of generating again."""
    job = Job.of(req)
    req = job.req
    starts = [e for e in events if e.kind == "start"]
    done = {e.trace_id for e in events if e.kind == "done"}
    if not starts or len(starts) != req.group_size or {s.trace_id for s in starts} != done:
        return False
    first = starts[0]
    return (first.model == req.model and first.prompt == prompt_text(req, tokenizer)
            and first.gold == req.gold_answer()
            and first.config == job.config.to_dict()
            and sorted(s.seed for s in starts) == [req.seed + r for r in range(req.group_size)])


def replay_view(trace: Trace, upto: int) -> TraceView:
    """The view after the first ``upto`` events of a recorded trace (step-by-step replay). Replayed
    to its end, a trace without a done or error event (a stopped run, a cut-off file) is shown
    stopped where it ends, not as still generating."""
    view = fold(trace.events[: max(0, upto)]).get(trace.trace_id, TraceView())
    if upto >= len(trace.events) and view.start is not None and view.done is None and view.error is None:
        view.stop()
    return view
