"""The app's views as pure functions: events -> HTML, figures, tables (no server, no gradio)."""
from __future__ import annotations

import os
import re
import time

import pandas as pd
import pytest

from app import audit, render
from app.producer import fork_available
from app.session import REPO, GenRequest, ModelStore, replay_view, stream_generation
from app.ui import DEFAULTS, examples
from e3rl_core.errors import E3RLError
from e3rl_core.events import SegmentEvent, group_traces, write_events

STORE = ModelStore()
MODEL = "checkpoints/arith-demo"


def generate(**kw):
    q, g = examples()[0]
    req = GenRequest(model=MODEL, prompt=kw.pop("prompt", q), gold=kw.pop("gold", g), **kw)
    return list(stream_generation(STORE, req, min_interval=0.0))


@pytest.fixture(scope="module")
def frames():
    return generate(seed=DEFAULTS["seed"], group_size=DEFAULTS["group_size"])


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_defaults_show_a_slip_erased_and_healed(threads):
    """The first example with the default settings: rollout 0 erases and ends correct; with erasure
    off the same seed ends wrong (what the Generate tab shows on a first click), whatever number of
    torch threads the app runs with."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        on = generate(seed=DEFAULTS["seed"], group_size=DEFAULTS["group_size"])
        off = generate(seed=DEFAULTS["seed"], group_size=DEFAULTS["group_size"], erase=False)
    finally:
        torch.set_num_threads(before)
    v = list(on[-1].views.values())[0]
    assert v.erasures() and v.done.correct is True
    assert list(off[-1].views.values())[0].done.correct is False


def test_streaming_frames_grow_and_show_the_erasure_in_flight(frames):
    assert frames[0].first_token_s is not None or len(frames) > 1
    sizes = [len(f.events) for f in frames]
    assert sizes == sorted(sizes) and frames[-1].finished
    # replaying the events one by one, the erased attempt is struck through while its retry streams
    events = frames[-1].events
    tid = events[0].trace_id
    seen_erasing = False
    view = render.TraceView()
    for ev in events:
        if ev.trace_id != tid:
            continue
        view.apply(ev)
        if view.last_erased is not None:
            seen_erasing |= 'class="e3rl-erasing"' in render.trace_html(view)
    assert seen_erasing
    final = render.trace_html(view)
    assert 'class="e3rl-erasing"' not in final and final.count('class="e3rl-erased"') == len(view.erasures())


def test_trace_html_colours_marks_and_hover_cards(frames):
    v = list(frames[-1].views.values())[0]
    html = render.trace_html(v, "entropy")
    kept = v.kept_tokens()
    assert html.count('class="e3rl-tok"') == len(kept)
    assert html.count(' data-seg="') == len({a.segment for a in v.attempts})  # one block per segment
    assert "top: " in html and "surprisal" in html  # hover card: signals and top-5 alternatives
    colours = set(re.findall(r"background:(rgb\(\d+,\d+,\d+\))", html))
    assert len(colours) > 3  # a heatmap, not one colour
    assert render.colour(0.0) == "rgb(255,255,255)" and render.colour(99.0) == "rgb(232,62,50)"
    assert render.trace_html(v, "surprisal") != html
    assert "surprisal" in render.legend_html("surprisal") and "nats" in render.legend_html("entropy")


def test_text_is_escaped():
    from e3rl_core.events import StartEvent, TokenEvent

    v = render.TraceView()
    v.apply(StartEvent(trace_id="t", model="m", prompt="p", prompt_ids=[1], config={}, seed=0, group_index=0))
    v.apply(TokenEvent(trace_id="t", step=0, token_id=1, text="<script>x</script>", entropy=0.1, surprisal=0.1,
                       segment=0, attempt=0))
    assert "<script>" not in render.trace_html(v, with_css=False)
    v.apply(TokenEvent(trace_id="t", step=1, token_id=1, text="x", entropy=0.1, surprisal=0.1,
                       segment='"><img src=x onerror=alert(1)>', attempt=0))  # a hostile loaded file
    assert "<img" not in render.trace_html(v, with_css=False)


def test_figure_summary_and_group(frames):
    views = list(frames[-1].views.values())
    v = views[0]
    fig = render.trace_figure(v)
    names = [t.name for t in fig.data]
    assert "U_n, kept" in names and "U_n, erased" in names and "Θ_n" in names
    decided = [a for a in v.attempts if a.decision is not None]
    kept, erased = fig.data[names.index("U_n, kept")], fig.data[names.index("U_n, erased")]
    assert len(kept.x) + len(erased.x) == len(decided) and len(erased.x) == len(v.erasures())
    md = render.summary_markdown(v, 1.0, 0.1)
    assert "✓" in md and f"erasures {len(v.erasures())}" in md
    table = render.group_markdown(views)
    assert table.count("\n") == len(views) + 1


def test_audit_table_export_round_trip(frames, tmp_path):
    traces = group_traces(frames[-1].events)
    df = audit.decisions_frame(traces)
    n_segments = sum(isinstance(e, SegmentEvent) for e in frames[-1].events)
    assert len(df) == n_segments
    erased = df[df["decision"] == "erase"]
    assert len(erased) and (erased["erased_text"] != "").all() and (erased["replacement"] != "").all()
    only = audit.filter_frame(df, only_erasures=True, sort_by="score")
    assert len(only) == len(erased) and list(only["score"]) == sorted(only["score"], reverse=True)
    csv, jsonl = audit.export(df, tmp_path)
    back_csv = pd.read_csv(csv)
    back_jsonl = pd.read_json(jsonl, lines=True)
    assert len(back_csv) == len(back_jsonl) == len(df)
    assert list(back_jsonl["score"]) == pytest.approx(list(df["score"]))


def test_each_export_gets_its_own_folder_and_old_ones_are_removed(frames, tmp_path):
    """Sessions share the server's export root: two exports keep their plain file names in separate
    folders, so neither overwrites the other; folders past their age are removed."""
    df = audit.decisions_frame(group_traces(frames[-1].events))
    first = audit.export(df, audit.export_dir(tmp_path))
    second = audit.export(df.head(1), audit.export_dir(tmp_path))
    assert [p.name for p in first] == [p.name for p in second] and first[0].parent != second[0].parent
    assert len(pd.read_csv(first[0])) == len(df) and len(pd.read_csv(second[0])) == 1
    old = first[0].parent
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    third = audit.export_dir(tmp_path, max_age_s=3600)
    assert not old.exists() and second[0].exists() and third.is_dir()


def test_load_trace_file_validates(frames, tmp_path):
    good = tmp_path / "good.jsonl"
    write_events(frames[-1].events, good)
    assert len(audit.load_trace_file(good)) == DEFAULTS["group_size"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event": "token", "nope": 1}\n')
    with pytest.raises(E3RLError):
        audit.load_trace_file(bad)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(E3RLError, match="JSONL|UTF-8|line"):
        audit.load_trace_file(binary)
    with pytest.raises(E3RLError, match="no such trace file"):
        audit.load_trace_file(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(E3RLError, match="no events"):
        audit.load_trace_file(empty)


def test_what_if_same_params_change_nothing_and_a_high_bar_keeps_everything(frames):
    traces = group_traces(frames[-1].events)
    same = audit.what_if(traces, {})
    assert len(same) == sum(len(t.segments) for t in traces)
    assert not same["changed"].any()  # the replayed policy reproduces every recorded decision
    assert (same["new_decision"] == same["decision"]).mean() > 0.9
    strict = audit.what_if(traces, {"threshold.policy": "fixed", "threshold.value": 1e9})
    assert (strict["new_decision"] != "erase").all()
    assert strict["changed"].sum() == (strict["decision"] == "erase").sum() > 0
    assert audit.group_of(traces, traces[1].trace_id) == traces


def test_replay_view_steps_through_the_same_renderer(frames):
    tr = group_traces(frames[-1].events)[0]
    assert render.trace_html(replay_view(tr, 0), with_css=False).count("e3rl-tok") == 0
    full = replay_view(tr, len(tr.events))
    assert full.done is not None and len(full.kept_tokens()) == len(tr.done.token_ids)


def test_bad_prompts_are_refused_clearly():
    with pytest.raises(E3RLError, match="empty"):
        next(stream_generation(STORE, GenRequest(model=MODEL, prompt="   ")))
    with pytest.raises(E3RLError, match="shorten"):
        next(stream_generation(STORE, GenRequest(model=MODEL, prompt="x" * 5000)))


def test_counterfactual_twins_mark_flipped_answers(frames):
    off = generate(seed=DEFAULTS["seed"], group_size=DEFAULTS["group_size"], erase=False)
    traces = group_traces(frames[-1].events) + group_traces(off[-1].events)
    twins = audit.counterfactual_twins(traces)
    on_ids = [t.trace_id for t in group_traces(frames[-1].events)]
    assert set(twins) == set(on_ids)  # every erasure-on rollout found its erasure-off twin
    df = audit.decisions_frame(traces)
    row0 = df[df["trace"] == on_ids[0]]
    assert (row0["correct"] == True).all() and (row0["correct_without_erasure"] == False).all()  # noqa: E712
    flipped = audit.filter_frame(df, only_flipped=True)
    assert len(flipped) and (flipped["decision"] == "erase").all() and (flipped["flipped"] == True).all()  # noqa: E712
    assert on_ids[0] in set(flipped["trace"])


def _signature(events):
    # trace ids start with a random run id; the rest names the rollout
    return [(e.kind, e.trace_id.split("-", 1)[1], getattr(e, "token_id", None), getattr(e, "segment", None))
            for e in events]


def test_streamed_frames_are_prefixes_of_the_inline_engine_run(frames):
    """The engine runs in its own thread while frames are drawn; what it yields must be exactly
    what running it inline yields."""
    from e3rl_core.generation.generator import ErasableGenerator
    from e3rl_core.tasks.rewards import extract_answer, is_correct

    q, g = examples()[0]
    req = GenRequest(model=MODEL, prompt=q, gold=g, seed=DEFAULTS["seed"], group_size=DEFAULTS["group_size"])
    model, tok = STORE.get(MODEL)
    from e3rl_core.tasks.datasets import render_prompt

    inline = list(ErasableGenerator(model, tok, req.config(), model_name=MODEL, checker=is_correct,
                                    answer_fn=extract_answer).stream(
        render_prompt(q, tok), group_size=req.group_size, seed=req.seed, golds=[g]))
    final = _signature(frames[-1].events)
    assert final == _signature(inline)
    for f in frames[:-1]:
        assert not f.finished and final[: len(f.events)] == _signature(f.events)
    assert frames[-1].finished and frames[-1].first_token_s is not None


ENGINES = ["thread", pytest.param("process", marks=pytest.mark.skipif(not fork_available(), reason="needs fork"))]


def test_the_process_engine_streams_what_the_engine_yields_inline():
    """In a forked child (one torch thread) the engine must yield exactly what it yields inline
    on one thread, and the frames must be prefixes of that."""
    if not fork_available():
        pytest.skip("needs fork")
    import torch

    from e3rl_core.generation.generator import ErasableGenerator
    from e3rl_core.tasks.datasets import render_prompt
    from e3rl_core.tasks.rewards import extract_answer, is_correct

    q, g = examples()[0]
    req = GenRequest(model=MODEL, prompt=q, gold=g, seed=DEFAULTS["seed"], group_size=DEFAULTS["group_size"])
    streamed = list(stream_generation(STORE, req, min_interval=0.0, engine="process"))
    model, tok = STORE.get(MODEL)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inline = list(ErasableGenerator(model, tok, req.config(), model_name=MODEL, checker=is_correct,
                                    answer_fn=extract_answer).stream(
            render_prompt(q, tok), group_size=req.group_size, seed=req.seed, golds=[g]))
    finally:
        torch.set_num_threads(before)
    final = _signature(streamed[-1].events)
    assert final == _signature(inline) and streamed[-1].finished
    def signals(events):
        return [(e.entropy, e.surprisal, e.top) for e in events if e.kind == "token"]

    assert signals(streamed[-1].events) == signals(inline)  # bit for bit, top-5 included
    for f in streamed[:-1]:
        assert not f.finished and final[: len(f.events)] == _signature(f.events)
    done = [e for e in streamed[-1].events if e.kind == "done"]
    assert len(done) == req.group_size and all(d.correct is not None for d in done)  # checked in the child


def _busy() -> bool:
    import threading

    return any(t.name == "e3rl-generate" for t in threading.enumerate())


@pytest.mark.parametrize("engine", ENGINES)
def test_closing_the_stream_or_setting_stop_ends_the_engine(engine):
    import threading

    store = ModelStore()
    q, g = examples()[2]
    req = GenRequest(model=MODEL, prompt=q, gold=g, group_size=8, seed=1)
    it = stream_generation(store, req, min_interval=0.0, engine=engine)
    first = next(it)
    assert any(e.kind == "token" for e in first.events)
    it.close()  # what gradio does on Stop or a closed page
    assert not _busy()

    stop = threading.Event()
    out = []
    for frame in stream_generation(store, req, min_interval=0.0, stop=stop, engine=engine):
        out.append(frame)
        stop.set()
    full = list(stream_generation(store, req, min_interval=0.0, engine=engine))[-1]
    # a stopped worker takes the next job and runs it whole
    assert out[-1].finished and len(out[-1].events) < len(full.events)
    assert sum(e.kind == "done" for e in full.events) == 8
    assert not _busy()
    store.workers.close()


def test_process_workers_are_reused_shared_and_end_with_their_parent(model_dir):
    """One worker serves generation after generation; it holds no socket or pipe it inherited; a
    model loaded after it was forked gets a new worker (which shares it); two at once get two; and
    workers end when their parent does, even killed."""
    if not fork_available():
        pytest.skip("needs fork")
    import multiprocessing
    import os
    import select
    import subprocess
    import sys
    import time

    def workers() -> set[int]:  # this test's (other tests' stores may keep idle workers)
        return {c.pid for c in multiprocessing.active_children() if c.name == "e3rl-engine"} - before

    import socket

    before = {c.pid for c in multiprocessing.active_children()}
    store = ModelStore()
    q, g = examples()[0]
    req = GenRequest(model=MODEL, prompt=q, gold=g, group_size=1, seed=3)
    server = socket.create_server(("127.0.0.1", 0))  # as the web server's listening socket
    port = server.getsockname()[1]
    read_end, write_end = os.pipe()  # as the pipe to a browser driver that waits for its input's end
    a = list(stream_generation(store, req, engine="process"))[-1]
    first = workers()
    server.close()  # the worker, forked while these were open, must not keep them open
    os.close(write_end)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert select.select([read_end], [], [], 5)[0] and os.read(read_end, 1) == b""  # the end, at once
    os.close(read_end)
    b = list(stream_generation(store, req, engine="process"))[-1]
    assert len(first) == 1 and workers() == first  # reused
    assert _signature(a.events)[1:] == _signature(b.events)[1:]  # same seed, same tokens
    other = GenRequest(model=str(model_dir), prompt="hello", group_size=1, max_new_tokens=8)
    assert list(stream_generation(store, other, engine="process"))[-1].finished
    assert len(workers()) == 1 and workers() != first  # forked after the new model was loaded; old one retired
    store.workers.close()
    assert not workers()

    script = f"""
import os, sys, threading
sys.path.insert(0, {str(REPO)!r})
from app.session import GenRequest, ModelStore, stream_generation
store = ModelStore()
req = GenRequest(model={MODEL!r}, prompt={q!r}, gold={g!r}, group_size=2, seed=1)
runs = [threading.Thread(target=lambda: list(stream_generation(store, req, engine="process"))) for _ in range(2)]
[t.start() for t in runs]; [t.join() for t in runs]
import multiprocessing
print(" ".join(str(c.pid) for c in multiprocessing.active_children()), flush=True)
os._exit(0)  # no clean-up, as if killed
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    pids = [int(x) for x in out.stdout.split()]
    assert len(pids) == 2  # two generations at once ran on two workers

    def alive(p: int) -> bool:
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().split(") ")[1][0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 10
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "a worker outlived its parent"
    assert len(set(pids)) == 2  # two distinct workers, both gone


def _broken(monkeypatch, fail):
    from app import session
    from e3rl_core.generation.generator import ErasableGenerator

    class Broken(ErasableGenerator):
        def stream(self, *a, **k):
            yield from list(super().stream(*a, **k))[:3]
            fail()

    monkeypatch.setattr(session, "ErasableGenerator", Broken)
    q, g = examples()[0]
    return GenRequest(model=MODEL, prompt=q, gold=g, group_size=1)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_engine_error_reaches_the_caller(monkeypatch, engine):
    def fail():
        raise RuntimeError("engine broke")

    store = ModelStore()  # its workers are forked after the patch
    with pytest.raises(RuntimeError, match="engine broke"):
        list(stream_generation(store, _broken(monkeypatch, fail), min_interval=0.0, engine=engine))
    store.workers.close()


class _NeedsKeyword(Exception):
    def __init__(self, message: str, *, row: int) -> None:  # cannot be rebuilt from its args
        super().__init__(message)
        self.row = row


def test_the_process_engine_reports_errors_that_do_not_pickle_and_a_dead_worker(monkeypatch):
    if not fork_available():
        pytest.skip("needs fork")
    import os
    import signal

    def odd():
        raise _NeedsKeyword("odd failure", row=2)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would

    store = ModelStore()
    req = _broken(monkeypatch, odd)
    with pytest.raises(RuntimeError, match="_NeedsKeyword: odd failure"):
        list(stream_generation(store, req, min_interval=0.0, engine="process"))
    store.workers.close()
    store = ModelStore()
    with pytest.raises(E3RLError, match=r"generation process ended unexpectedly \(exit code -9\)"):
        list(stream_generation(store, _broken(monkeypatch, die), min_interval=0.0, engine="process"))
    monkeypatch.undo()  # the dead worker was dropped: the next generation gets a new one
    q, g = examples()[0]
    assert list(stream_generation(store, GenRequest(model=MODEL, prompt=q, gold=g, group_size=1),
                                  engine="process"))[-1].finished
    store.workers.close()


def test_a_failed_fork_is_a_clear_error(monkeypatch):
    if not fork_available():
        pytest.skip("needs fork")
    import multiprocessing.context

    def no_memory(self):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", no_memory)
    q, g = examples()[0]
    with pytest.raises(E3RLError, match=r"cannot start a generation process .*Cannot allocate memory.*--engine thread"):
        list(stream_generation(ModelStore(), GenRequest(model=MODEL, prompt=q, gold=g, group_size=1),
                               engine="process"))


def test_unknown_engine_is_refused_before_generating():
    q, g = examples()[0]
    with pytest.raises(E3RLError, match="unknown engine 'gpu'"):
        next(stream_generation(STORE, GenRequest(model=MODEL, prompt=q, gold=g), engine="gpu"))


def test_chart_specs_are_plain_json_and_valid_plotly():
    import json

    spec = render.training_spec([{"step": i, "reward_mean": 0.1 * i, "loss": 1.0 - 0.1 * i} for i in range(4)],
                                window=2)
    assert len(spec["data"]) == 2 * len(render.TRAINING_KEYS) and json.dumps(spec)  # per step + moving mean
    assert {t["xaxis"] for t in spec["data"]} == {"x", "x2", "x3", "x4", "x5"}
    fig = render.as_figure(spec)  # plotly validates every attribute
    assert list(fig.data[0].y) == [0.0, 0.1, 0.2, 0.30000000000000004]
    assert list(fig.data[1].y) == pytest.approx([0.0, 0.05, 0.15, 0.25])  # the 2-step trailing mean
    assert render.moving_mean([1.0, None, 3.0, float("nan")], 2) == [1.0, 1.0, 3.0, 3.0]  # gaps are skipped
    empty = render.figure_spec(render.TraceView())
    assert json.dumps(empty) and all(len(t["x"]) == 0 for t in empty["data"])


def test_same_run_recognises_the_run_just_shown(frames):
    """The Counterfactual reuses the shown run only when it is exactly the requested one."""
    from app.session import same_run

    q, g = examples()[0]
    _, tok = STORE.get(MODEL)
    req = GenRequest(model=MODEL, prompt=q, gold=g, seed=DEFAULTS["seed"], group_size=DEFAULTS["group_size"])
    events = frames[-1].events
    assert same_run(events, req, tok)
    assert not same_run(frames[0].events, req, tok)  # unfinished (a stopped run)
    for change in (dict(seed=DEFAULTS["seed"] + 1), dict(erase=False), dict(kappa=2.0), dict(gold="1"),
                   dict(group_size=2), dict(prompt=q.replace("12", "13"))):
        other = GenRequest(**{**req.__dict__, **change})
        assert not same_run(events, other, tok), change


# ---------------------------------------------------------------- what a first-time user trips over
def _tok(step: int, text: str, value: float = 0.1, segment: int = 0, attempt: int = 0):
    from e3rl_core.events import TokenEvent

    return TokenEvent(trace_id="t", step=step, token_id=step, text=text, entropy=value, surprisal=2 * value,
                      segment=segment, attempt=attempt, index=step)


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE trained here on ASCII only: every other character is several byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(["plain ascii text, the cat sat on the mat."] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_byte_pieces_of_one_character_are_one_span_with_every_signal(byte_bpe):
    """Tokens that decode to nothing alone (bytes of a character completed by a later token) are
    drawn as one visible span: coloured by its most uncertain piece, each piece's signals on hover."""
    from e3rl_core.generation.detok import Decoder, push, start_state

    text = "é 東 😀 ok"
    ids = byte_bpe(text, add_special_tokens=False).input_ids
    state, decode = start_state(byte_bpe("a", add_special_tokens=False).input_ids), Decoder(byte_bpe)
    texts = [push(decode, state, i) for i in ids]
    assert "" in texts and len(ids) > len(text)  # the fixture does split characters into bytes
    v = render.TraceView()
    for step, piece in enumerate(texts):
        v.apply(_tok(step, piece, value=0.1 * (step + 1)))
    groups = render.pieces(v.kept_tokens())
    assert sum(len(g) for g in groups) == len(ids) and all("".join(t.text for t in g) for g in groups)
    html = render.trace_html(v, "entropy", with_css=False)
    spans = re.findall(r'<span class="e3rl-tok" style="background:(rgb\([^)]*\))" title="([^"]*)">([^<]*)</span>',
                       html)
    assert len(spans) == len(groups) and "".join(s[2] for s in spans) == text  # nothing invisible, nothing lost
    emoji = next(s for s in spans if s[2] == "😀")
    pieces = next(g for g in groups if "".join(t.text for t in g) == "😀")
    assert len(pieces) == 4 and emoji[1].count("piece ") == 4  # the four byte tokens' signals on hover
    assert emoji[0] == render.colour(max(t.entropy for t in pieces))
    # a character whose last byte has not arrived yet shows as one replacement mark, not as nothing
    partial = render.TraceView()
    partial.apply(_tok(0, texts[0]))  # the first of "é"'s two byte tokens, alone
    assert texts[0] == "" and texts[1] == "é" and ">\ufffd</span>" in render.trace_html(partial, with_css=False)


def _partial_run_with_erasure_in_flight(events):
    """The default run's first rollout cut just after an erasure, its retry streaming."""
    tid = events[0].trace_id
    view = render.TraceView()
    for ev in events:
        if ev.trace_id != tid:
            continue
        view.apply(ev)
        if view.last_erased is not None and view.attempts[-1].tokens and view.attempts[-1].erased is None:
            return view
    raise AssertionError("the default run erases nothing")


def test_a_stopped_trace_says_where_it_stopped_and_folds_its_erasures(frames):
    v = _partial_run_with_erasure_in_flight(frames[-1].events)
    assert 'class="e3rl-erasing"' in render.trace_html(v) and "generating" in render.summary_markdown(v)
    v.stop()
    html, md = render.trace_html(v, with_css=False), render.summary_markdown(v, 2.0, 0.1)
    n = sum(len(a.tokens) for a in v.attempts)
    assert f"stopped at token {n}" in html and f"stopped at token {n}" in md and "generating" not in md
    assert 'class="e3rl-erasing"' not in html and html.count('class="e3rl-erased"') == len(v.erasures())
    assert html.count('class="e3rl-tok"') == len(v.kept_tokens())  # the partial retry stays, as kept text
    # the Audit tab's replay of such a partial trace ends the same way (and steps through it as before)
    from e3rl_core.events import Trace

    partial = Trace([e for e in frames[-1].events if e.trace_id == v.trace_id][: v.n_events])
    assert replay_view(partial, len(partial.events)).stopped and not replay_view(partial, 5).stopped
    assert render.trace_html(replay_view(partial, len(partial.events)), with_css=False) == html
    assert "2.00 s" in md  # the timing stays
    assert "_stopped_" in render.group_markdown([v])


def test_stop_ends_the_run_with_a_last_frame_that_keeps_the_partial_traces():
    import threading

    q, g = examples()[2]
    stop = threading.Event()
    out = []
    for frame in stream_generation(STORE, GenRequest(model=MODEL, prompt=q, gold=g, group_size=4, seed=1),
                                   min_interval=0.0, stop=stop):
        out.append(frame)
        stop.set()
    last = out[-1]
    assert last.finished and last.stopped and any(e.kind == "token" for e in last.events)
    cut = [v for v in last.views.values() if v.done is None]
    assert cut and all(v.stopped and v.last_erased is None for v in cut)
    assert all(not v.stopped for v in last.views.values() if v.done is not None)


def test_stops_reach_only_their_own_session():
    from app.session import Stops

    stops = Stops()
    with stops.watch("a") as a1, stops.watch("a") as a2, stops.watch("b") as b:
        assert stops.stop("a") == 2 and a1.is_set() and a2.is_set() and not b.is_set()
    assert stops.stop("a") == 0 and stops.stop("b") == 0  # nothing left running
    with stops.watch(None) as anonymous:
        assert stops.stop(None) == 0 and not anonymous.is_set()


def test_a_prompt_with_characters_the_model_cannot_read_gets_a_warning():
    from app.session import unknown_characters, unknown_warning

    _, tok = STORE.get(MODEL)
    assert unknown_characters(tok, examples()[0][0]) is None
    assert unknown_warning(tok, GenRequest(model=MODEL, prompt=examples()[0][0])) is None
    assert unknown_characters(tok, "a = 5 × 3. b = a ÷ 5. What is b? ×") == ["×", "÷"]
    msg = unknown_warning(tok, GenRequest(model=MODEL, prompt="a = 5 × 3. What is a?"))
    assert "'×'" in msg and tok.unk_token in msg and "rephrase" in msg
    assert "⚠" in render.summary_markdown(render.TraceView(), warning=msg)


def test_max_new_tokens_goes_to_16k_and_no_further():
    from app.session import MAX_NEW_TOKENS

    assert MAX_NEW_TOKENS == 16_384
    q, g = examples()[0]
    with pytest.raises(E3RLError, match="between 1 and 16,384"):
        next(stream_generation(STORE, GenRequest(model=MODEL, prompt=q, gold=g, max_new_tokens=MAX_NEW_TOKENS + 1)))
    assert GenRequest(model=MODEL, prompt=q, max_new_tokens=MAX_NEW_TOKENS).config().max_new_tokens == MAX_NEW_TOKENS


def test_chart_explains_every_mark_and_counts_segments_in_whole_numbers(frames):
    v = list(frames[-1].views.values())[0]
    spec = render.figure_spec(v)
    assert all(t["name"] and t["showlegend"] for t in spec["data"])  # each mark has its legend entry
    assert len({t["name"] for t in spec["data"]}) == len(spec["data"])
    def look(t: dict) -> tuple:
        return (t["mode"], *(str(t.get(part, {}).get(key)) for part, key in
                             (("marker", "symbol"), ("marker", "color"), ("line", "color"), ("line", "dash"))))

    assert len({look(t) for t in spec["data"]}) == len(spec["data"])  # no two entries look alike
    axis = spec["layout"]["xaxis"]
    n_segments = max(a.segment for a in v.attempts) + 1
    assert axis["tickformat"] == "d" and axis["tick0"] == 0 and isinstance(axis["dtick"], int)
    assert axis["dtick"] >= 1 and n_segments / axis["dtick"] <= 20
    long = render.TraceView()
    for i in range(300):
        long.apply(_tok(i, "x", segment=i // 2))
    dtick = render.figure_spec(long)["layout"]["xaxis"]["dtick"]
    # round steps (1, 2 or 5 x 10^k), the smallest that gives at most 20 ticks; no tick left of segment 0
    assert dtick == 10 and render.nice_step(7.5) == 10 and render.nice_step(157) == 200 and render.nice_step(0.3) == 1
    assert render.figure_spec(long)["layout"]["xaxis"]["range"][0] == -0.5
    assert all(t["title"]["text"] for t in (axis, spec["layout"]["xaxis2"], spec["layout"]["yaxis"]))


def test_legend_labels_its_scale_under_the_bar():
    html = render.legend_html("surprisal")
    scale = re.search(r'<span class="scale"><span class="bar"></span><span class="ticks">((?:<span>[^<]*</span>)*)'
                      r"</span></span>", html)
    assert scale is not None  # the tick labels follow the bar inside one column (placed in Chromium: test_generate_tab)
    assert re.findall(r"<span>([^<]*)</span>", scale.group(1)) == ["0", "1.5", "≥ 3 nats"]


def test_the_app_reads_answers_after_a_think_block_its_prompt_opened():
    """A DeepSeek-R1-style prompt ends inside <think>: a \\boxed{} in the reasoning is no answer, and
    the answer after </think> is the one checked; a plain prompt reads the completion as it is."""
    from app.session import answer_hooks

    checker, answer = answer_hooks("<｜User｜>What is 1+2?<｜Assistant｜><think>\n")
    assert answer("maybe \\boxed{4}, let me check") is None
    assert answer("maybe \\boxed{4}... no.</think>The answer is \\boxed{3}.") == "3"
    assert checker("no.</think>\\boxed{3}", "3") and not checker("\\boxed{3} still thinking", "3")
    checker, answer = answer_hooks("Question: What is 1+2?\nAnswer:\n")
    assert answer("\\boxed{3}") == "3" and checker("\\boxed{3}", "3")


def test_token_series_are_downsampled_to_their_envelope():
    import random as _random

    from app.render import downsample

    rng = _random.Random(0)
    xs = list(range(16_384))
    ys = [rng.random() for _ in xs]
    ys[12_345] = 9.0  # a spike survives
    dx, dy = downsample(xs, ys, 2000)
    assert len(dx) <= 2000 and dx == sorted(dx) and 9.0 in dy
    size = -(-len(xs) // 1000)
    for i in range(0, len(xs), size):  # every stretch keeps its lowest and highest value (brute force)
        kept = {y for x, y in zip(dx, dy) if i <= x < i + size}
        assert max(ys[i:i + size]) in kept and min(ys[i:i + size]) in kept
    assert downsample(xs[:50], ys[:50], 2000) == (xs[:50], ys[:50])
