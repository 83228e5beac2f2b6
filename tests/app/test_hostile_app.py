"""The workbench under hostile or careless use: uploads and the session state they fill are bounded
and freed (gzip files by the text they inflate to), huge token texts are shown cut, errors name
files as their user named them; the Train tab works wherever the app was started, and in Space
mode nothing reaches the network."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, make_config

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from gradio_client import Client, handle_file  # noqa: E402

from app import audit  # noqa: E402
from app.session import REPO, GenRequest, Job, resolve  # noqa: E402
from e3rl_core.errors import E3RLError  # noqa: E402
from e3rl_core.events import write_events  # noqa: E402
from e3rl_core.generation.generator import ErasableGenerator  # noqa: E402


def load(client: Client, path: Path) -> tuple[str, int]:
    """Upload ``path`` to the Audit tab: (its message, the rows of the decisions table)."""
    msg, table, *_ = client.predict(handle_file(str(path)), False, "", "", False, api_name="/load_traces")
    return msg, len(table["data"]) if isinstance(table, dict) and "data" in table else -1


def wait_until(check, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.2)
    return check()


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory, tiny_llama) -> Path:
    """A real trace file: two rollouts of the tiny model, every decision recorded."""
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=fixed", "threshold.value=0.5"))
    path = tmp_path_factory.mktemp("traces") / "traces.jsonl"
    write_events(list(gen.stream("Compute 12 + 7 = ", group_size=2, seed=0)), path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, gradio's upload folder): a launched workbench in Space mode with a cache folder of its
    own, so what uploads leave behind can be counted."""
    from app.main import launch

    cache = tmp_path_factory.mktemp("gradio-cache")
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # read by gradio while it serves, not only at launch
    # Space mode, as a public deployment meets hostile visitors
    demo, url = launch(port=free_port(), block=False, space=True, runs_root=str(tmp_path_factory.mktemp("runs")))
    yield url, cache
    demo.close()
    if before is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = before


# ------------------------------------------------------------------ uploads and session state
def test_a_file_loaded_four_times_is_held_once_and_freed_when_the_client_closes(server, trace_file):
    url, cache = server
    client = Client(url, verbose=False)
    first, rows = load(client, trace_file)
    assert first.startswith("loaded 2 trace(s) from traces.jsonl") and rows > 0
    for _ in range(3):
        again, rows_again = load(client, trace_file)
        assert "loaded already" in again and rows_again == rows  # no decision listed twice
    session = client.session_hash
    assert session in audit.SESSIONS and audit.SESSIONS.bytes_of(session) == trace_file.stat().st_size
    assert files_under(cache) == []  # every upload deleted once read, and no stray temporary file
    client.close()
    # gradio keeps a closed session's state for an hour; the unload handler frees it at once
    assert wait_until(lambda: session not in audit.SESSIONS), "the closed session still holds its traces"


def test_loaded_traces_expire_after_their_time_to_live(tmp_path, trace_file):
    """A page left open does not hold its traces for ever: the state's time to live deletes it, and
    its delete callback frees the traces."""
    from app.ui import build

    demo = build(runs_root=str(tmp_path / "runs"), traces_ttl_s=1)
    demo.queue()
    _, url, _ = demo.launch(server_port=free_port(), prevent_thread_lock=True, ssr_mode=False)
    try:
        client = Client(url, verbose=False)
        assert load(client, trace_file)[0].startswith("loaded")
        assert client.session_hash in audit.SESSIONS
        assert wait_until(lambda: client.session_hash not in audit.SESSIONS, timeout=15)
        client.close()
    finally:
        demo.close()


def test_an_upload_over_the_limit_is_refused_before_it_is_stored(server, tmp_path):
    url, cache = server
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(audit.MAX_TRACE_FILE_BYTES + 1)
    with open(big, "rb") as f:
        r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.jsonl", f)}, timeout=120)
    assert r.status_code == 413 and "maximum allowed size" in r.text
    assert files_under(cache) == []


def test_a_gzip_file_loads_and_a_gzip_bomb_stops_at_the_text_limit(server, trace_file, tmp_path, monkeypatch):
    """Gzip is told by its first bytes (this one is named .jsonl); one that inflates past the text a
    file may hold is refused when reading reaches the limit, holding nothing and leaving no file."""
    import gzip

    url, cache = server
    disguised = tmp_path / "gzipped.jsonl"
    disguised.write_bytes(gzip.compress(trace_file.read_bytes()))
    client = Client(url, verbose=False)
    msg, rows = load(client, disguised)
    assert msg.startswith("loaded 2 trace(s) from gzipped.jsonl") and rows > 0
    assert audit.SESSIONS.bytes_of(client.session_hash) == trace_file.stat().st_size  # the text, decompressed
    client.close()
    monkeypatch.setattr(audit, "MAX_TRACE_TEXT_BYTES", 4 * 2**20)  # the server runs in this process
    bomb = tmp_path / "bomb.jsonl.gz"
    bomb.write_bytes(gzip.compress(b"\n" * 2**20 + b" " * 64 * 2**20))  # 65 MiB of text in ~70 KB
    client = Client(url, verbose=False)
    msg, _ = load(client, bomb)
    assert msg == "⚠️ bomb.jsonl.gz holds more than 4 MiB of JSONL text; load at most 4 MiB of traces at once " \
                  "(split the file)"
    assert audit.SESSIONS.bytes_of(client.session_hash) == 0 and files_under(cache) == []
    client.close()


def test_a_bad_file_is_named_as_its_user_named_it(server, tmp_path):
    url, cache = server
    bad = tmp_path / "my traces.jsonl"
    bad.write_text("this is not json\n")
    client = Client(url, verbose=False)
    msg, _ = load(client, bad)
    client.close()
    assert msg.startswith("⚠️ my traces.jsonl:1:") and str(cache) not in msg and "\n" not in msg
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert not (cache / digest).exists() and files_under(cache) == []  # a rejected upload is deleted too


def load_events(server, events: list[dict], path: Path) -> tuple[Client, dict]:
    """Write edited trace events to ``path``, load it into a new session of ``server``: (that client,
    the decisions table), both traces loaded."""
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    client = Client(server[0], verbose=False)
    msg, _ = load(client, path)
    assert msg.startswith("loaded 2 trace(s)")
    return client, client.predict(False, "", "", False, api_name="/decisions")


def test_a_huge_token_is_shown_cut_in_the_table_and_the_replay(server, trace_file, tmp_path):
    lines = [json.loads(line) for line in trace_file.read_text().splitlines()]
    tok = next(e for e in lines if e["event"] == "token")
    tok["text"] = "<b>" * 2_000_000  # 6 MB in one token, to be escaped too
    client, table = load_events(server, lines, tmp_path / "huge.jsonl")
    longest = max(len(cell) for row in table["data"] for cell in row if isinstance(cell, str))
    assert longest <= audit.MAX_CELL_CHARS + 40
    started = time.perf_counter()
    html = client.predict(tok["trace_id"], api_name="/replay")
    client.close()
    assert len(html) < 100_000 and "more characters]" in html
    assert time.perf_counter() - started < 20


def test_a_long_trace_id_is_shown_cut_and_still_replays(server, trace_file, tmp_path):
    """A loaded file's trace ids may be anything: one of 20,000 characters is shown cut (with a
    digest, so the cut form names one trace) in the table, and both forms replay it."""
    lines = [json.loads(line) for line in trace_file.read_text().splitlines()]
    first = lines[0]["trace_id"]
    long_id = "x" * 20_000 + first
    for e in lines:
        if e["trace_id"] == first:
            e["trace_id"] = long_id
    client, table = load_events(server, lines, tmp_path / "long-ids.jsonl")
    shown = {row[0] for row in table["data"]}
    assert audit.shown_id(long_id) in shown and long_id not in shown
    assert max(len(t) for t in shown) <= audit.MAX_ID_CHARS
    by_shown = client.predict(audit.shown_id(long_id), api_name="/replay")
    by_full = client.predict(long_id, api_name="/replay")
    client.close()
    assert by_shown == by_full and "e3rl-tok" in by_shown
    assert audit.shown_id("x" * 20_000 + "a") != audit.shown_id("x" * 20_000 + "b")  # same start, kept apart


def test_a_session_holds_a_bounded_number_of_bytes(trace_file, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(trace_file.read_text().replace('"trace_id": "', '"trace_id": "x'))
    loaded = audit.LoadedTraces()
    cap = trace_file.stat().st_size + other.stat().st_size - 1
    assert loaded.add(trace_file, "traces.jsonl", max_bytes=cap).startswith("loaded 2")
    with pytest.raises(E3RLError, match=r"other\.jsonl would pass the .* a session may hold"):
        loaded.add(other, "other.jsonl", max_bytes=cap)
    assert len(loaded.traces) == 2 and loaded.nbytes == trace_file.stat().st_size  # nothing lost, nothing added
    assert loaded.add(trace_file, "traces.jsonl", max_bytes=cap).endswith("nothing added")


# ------------------------------------------------------------------ the Train tab, Space mode, model paths
def test_model_paths_resolve_the_same_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("checkpoints/arith-demo") == str(REPO / "checkpoints" / "arith-demo")
    (tmp_path / "mine").mkdir()
    assert resolve("mine") == str(tmp_path / "mine")  # a trained checkpoint under a relative runs directory
    # A hub id is left as typed, so load_model fetches it (outside Space mode, which lists models).
    assert resolve("someorg/somemodel") == "someorg/somemodel"
    assert Job.of(GenRequest(model="someorg/somemodel", prompt="x")).path == "someorg/somemodel"


class HubListener:
    """A stand-in hub endpoint that records the first line of every request it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.requests.append(conn.recv(200).decode("latin-1").split("\r\n")[0])
            except OSError:
                self.requests.append("?")
            conn.close()  # no answer: whoever asked gets an error at once


def test_space_mode_trains_from_another_directory_without_the_network(tmp_path, monkeypatch):
    """Started elsewhere than the repository, with HF_HUB_OFFLINE unset: the Train tab trains the
    shipped checkpoint (its relative path resolved), and the training process asks the hub nothing."""
    from app.main import launch
    from app.training import TrainingManager

    hub = HubListener()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read by the training process when it starts
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    runs = tmp_path / "runs"
    demo, url = launch(port=free_port(), block=False, space=True, runs_root=str(runs), threads=1, engine="thread")
    try:
        client = Client(url, verbose=False)
        msg = client.predict("checkpoints/arith-demo", "grpo", 1, 2, 5e-5, 0, 2, 0, api_name="/start_training")
        assert msg.startswith("started"), msg
        manager = TrainingManager(runs)
        assert wait_until(lambda: manager.active() is None, timeout=400)
        client.close()
    finally:
        demo.close()
    run = manager.runs()[0]
    status = json.loads((run / "run.json").read_text())
    console = run.with_name(run.name + ".console.log").read_text()
    assert status["status"] == "finished", console[-500:]
    # This process's gradio_client reports its own use to the hub endpoint; nothing else may ask it.
    own = ("HEAD /api/telemetry/", "GET /api/agent-harnesses")
    assert [r for r in hub.requests if not r.startswith(own)] == []


# ------------------------------------------------------------------ traces that lie
def test_a_trace_that_claims_more_tokens_than_it_holds_is_refused_in_one_line(server, trace_file, tmp_path):
    """A 30 KB file whose segment claims 10**12 tokens used to send the what-if replay through every
    claimed token (never ending, a core pinned). Now the load checks every recorded number against
    the trace itself and names the file and the field."""
    events = [json.loads(line) for line in trace_file.read_text().splitlines()]
    seg = next(e for e in events if e["event"] == "segment")
    seg["end"] = 10**12
    path = tmp_path / "crafted.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    client = Client(server[0], verbose=False)
    t0 = time.monotonic()
    msg, rows = load(client, path)
    assert time.monotonic() - t0 < 10
    assert msg.startswith("⚠️ crafted.jsonl: trace ") and "span [0, 1000000000000)" in msg and "\n" not in msg
    assert rows <= 0  # nothing of it was loaded
    client.close()


@pytest.mark.parametrize("field, value, says", [
    ("attempt", 7, "out of order"), ("start", 3, "disagrees"), ("erasures", 99, "done.erasures")])
def test_other_recorded_numbers_are_checked_against_the_events(trace_file, tmp_path, field, value, says):
    events = [json.loads(line) for line in trace_file.read_text().splitlines()]
    target = next(e for e in events if e["event"] == ("done" if field == "erasures" else "segment"))
    target[field] = value
    path = tmp_path / "edited.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    with pytest.raises(E3RLError, match=f"edited.jsonl: trace .*{says}"):
        audit.load_trace_file(path)


def test_the_decision_replay_steps_through_events_not_claimed_tokens():
    """Even unchecked, a group's replay costs its events: a span of 10**12 tokens is one step."""
    from e3rl_core.events import SegmentEvent
    from e3rl_core.generation.schedule import decision_order

    def seg(i: int, n: int, end: int) -> SegmentEvent:
        return SegmentEvent(trace_id=f"t{i}", segment=n, attempt=0, start=0, end=end, score=0.0, features={},
                            baseline=None, penalty=1.0, history=1.0, threshold=None, decision="accept")

    t0 = time.monotonic()
    order = decision_order([[seg(0, 0, 10**12)], [seg(1, 0, 5), seg(1, 1, 10**9)]], needs_group=True)
    assert time.monotonic() - t0 < 1.0
    assert [(step, i) for step, i, _ in order] == [("score", 1), ("score", 0), ("decide", 0), ("decide", 1),
                                                    ("score", 1), ("decide", 1)]


# ------------------------------------------------------------------ Space visitors
def test_space_visitors_see_and_stop_only_their_own_training_run(tmp_path):
    """Visitor B used to stop visitor A's run and read its settings and the server's paths. Now B is
    told the one run slot is taken, and sees nothing of A's run; A sees and stops it."""
    from app.main import launch
    from app.training import TrainingManager

    runs = tmp_path / "runs"
    demo, url = launch(port=free_port(), block=False, space=True, runs_root=str(runs), threads=1, engine="thread")
    try:
        a, b = Client(url, verbose=False), Client(url, verbose=False)
        msg = a.predict("checkpoints/arith-demo", "grpo", 30, 2, 5e-5, 0, 2, 0, api_name="/start_training")
        assert msg.startswith("started"), msg
        seen_by_b = b.predict(api_name="/training_status")[0]
        assert "another visitor's training run" in seen_by_b and str(tmp_path) not in seen_by_b
        assert "grpo" not in seen_by_b and "arith-demo" not in seen_by_b  # none of A's settings
        assert "another visitor's" in b.predict(api_name="/stop_training")
        assert "another visitor's" in b.predict("checkpoints/arith-demo", "grpo", 1, 2, 5e-5, 0, 2, 0,
                                                api_name="/start_training")
        manager = TrainingManager(runs)
        assert manager.active() and "stop_requested" not in manager.active()  # B's stop did nothing
        seen_by_a = a.predict(api_name="/training_status")[0]
        assert msg.split()[-1] in seen_by_a and str(tmp_path) not in seen_by_a
        assert a.predict(api_name="/stop_training").startswith("stopping")
        assert wait_until(lambda: manager.active() is None, timeout=300)
        a.close()
        b.close()
    finally:
        demo.close()


def test_a_leaving_visitor_frees_the_slot_and_old_runs_are_bounded(tmp_path, monkeypatch):
    from app import training
    from app.training import RunRequest, TrainingManager

    monkeypatch.setattr(training, "MAX_RUNS_KEPT", 2)
    manager = TrainingManager(tmp_path, visitors_apart=True)
    for i in range(3):  # three finished runs of earlier visitors (a console log beside each)
        old = tmp_path / f"grpo-old{i}"
        old.mkdir()
        (tmp_path / f"grpo-old{i}.console.log").write_text("")
        os.utime(tmp_path / f"grpo-old{i}.console.log", (i, i))
    (tmp_path / "someone-elses-folder").mkdir()
    out = manager.start(RunRequest(model="checkpoints/arith-demo", algo="grpo", steps=30, group_size=2,
                                   prompts_per_step=2, learning_rate=5e-5, seed=0, eval_data=None), owner="A")
    kept = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert {"grpo-old2", "someone-elses-folder"} <= kept and not {"grpo-old0", "grpo-old1"} & kept
    assert (tmp_path / f"{out.name}.owner").read_text() == "A"
    manager.release("B")  # another visitor leaving changes nothing
    assert manager.active() and "stop_requested" not in manager.active()
    manager.release("A")
    record = manager.active()  # the process may have ended already (a stop before it set up its handler)
    assert record is None or "stop_requested" in record
    assert wait_until(lambda: manager.active() is None, timeout=300)


# ------------------------------------------------------------------ exports
def test_csv_cells_a_spreadsheet_would_run_are_neutralised_and_the_jsonl_keeps_them(tmp_path):
    import pandas as pd

    hostile = ["=HYPERLINK(\"http://x\",\"y\")", "=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
    df = pd.DataFrame({"trace": hostile, "erased text": ["ok"] * len(hostile), "score": [-1.5] * len(hostile)})
    csv, rows = audit.export(df, tmp_path)[:2]
    back = pd.read_csv(csv, keep_default_na=False)
    assert all(cell.startswith("'") for cell in back["trace"]) and list(back["erased text"]) == ["ok"] * 7
    assert list(back["score"]) == [-1.5] * 7  # numbers stay numbers
    assert [json.loads(line)["trace"] for line in rows.read_text().splitlines()] == hostile


def test_one_engine_limit_for_the_whole_server(monkeypatch):
    """/generate, /counterfactual and the page's Generate used to have a limit of 2 each (6 ran at
    once). They now share one concurrency group: never more than ENGINE_CONCURRENCY at once."""
    from concurrent.futures import ThreadPoolExecutor

    from app import session
    from app.main import launch

    running, peak, lock = [0], [0], threading.Lock()
    real = session.engine_events

    def counted(job, store):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            yield from real(job, store)
            time.sleep(0.3)  # hold the slot a moment, so overlapping runs would show
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(session, "engine_events", counted)
    demo, url = launch(port=free_port(), block=False, space=True, engine="thread", threads=1)
    try:
        def call(i: int) -> None:
            client = Client(url, verbose=False)
            kwargs = dict(prompt="Compute 3 + 4 = ", max_new_tokens=16, group_size=1)
            client.predict(**kwargs, api_name="/generate" if i % 2 else "/counterfactual")
            client.close()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(call, range(8)))
    finally:
        demo.close()
    assert 1 <= peak[0] <= session.ENGINE_CONCURRENCY


def test_a_sessions_generated_history_is_capped_oldest_runs_first(monkeypatch):
    from app.tabs import generate as gen_tab
    from e3rl_core.events import TokenEvent

    monkeypatch.setattr(gen_tab, "MAX_HISTORY_EVENTS", 10)

    def run(tid: str, n: int) -> list:
        return [TokenEvent(trace_id=tid, step=i, token_id=1, text="x", entropy=0.0, surprisal=0.0, segment=0,
                           attempt=0) for i in range(n)]

    history = run("a", 4) + run("b", 4)
    capped = gen_tab.cap_history(history + run("c", 4))
    assert [e.trace_id for e in capped] == ["b"] * 4 + ["c"] * 4  # whole traces, newest kept
    assert gen_tab.cap_history(history) == history


def test_export_folders_are_bounded_oldest_removed_first(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "MAX_EXPORTS", 3)
    made = []
    for i in range(5):
        d = audit.export_dir(tmp_path)
        os.utime(d, (time.time() - 100 + i, time.time() - 100 + i))
        made.append(d)
    left = sorted(p for p in tmp_path.iterdir())
    assert len(left) == 3 and left == sorted(made[-3:])


def test_uploads_never_loaded_are_removed_after_the_documented_age(tmp_path, monkeypatch):
    """5 x 90 MB sent to /gradio_api/upload and never loaded used to stay until a restart. gradio's
    delete_cache removes them once CACHE_MAX_AGE_S old (checked every CACHE_MAX_AGE_S); here 2 s."""
    import app.ui
    from app.main import launch

    monkeypatch.setattr(app.ui, "CACHE_MAX_AGE_S", 2)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    demo, url = launch(port=free_port(), block=False, space=True, runs_root=str(tmp_path / "runs"))
    try:
        payload = tmp_path / "never-loaded.jsonl"
        payload.write_bytes(b"{}\n" * 1000)
        with open(payload, "rb") as f:
            r = httpx.post(f"{url}gradio_api/upload", files={"files": ("never-loaded.jsonl", f)}, timeout=60)
        assert r.status_code == 200
        stored = Path(r.json()[0])
        assert stored.is_file()
        assert wait_until(lambda: not stored.exists(), timeout=30)
    finally:
        demo.close()


def test_the_what_if_stops_at_its_time_bound_with_one_line(trace_file):
    """gradio cannot stop a running handler: the what-if bounds its own time (WHAT_IF_BUDGET_S)."""
    from e3rl_core.events import group_traces, read_events

    group = group_traces(read_events(trace_file))
    assert len(audit.what_if(group, {})) > 0  # within the bound: every recorded decision
    with pytest.raises(E3RLError, match=r"needs more than -1 s; load a smaller trace file"):
        audit.what_if(group, {}, budget_s=-1)
