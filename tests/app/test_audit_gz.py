"""The Audit tab's trace files at paper length: .jsonl and .jsonl.gz read and written alike (gzip
told by its first bytes, not its name), streamed while loading, and every size bounded: an upload,
the text one file inflates to, and what one session holds."""
from __future__ import annotations

import gzip
import json
import shutil
import tracemalloc

import pandas as pd
import pytest
from conftest import make_config

from app import audit
from e3rl_core.errors import E3RLError
from e3rl_core.events import (
    DoneEvent,
    StartEvent,
    TokenEvent,
    TraceWriter,
    dumps,
    group_traces,
    read_events,
    write_events,
)
from e3rl_core.generation.generator import ErasableGenerator


@pytest.fixture(scope="module")
def events(tiny_llama) -> list:
    """A real group of two rollouts with top-5 alternatives recorded, every decision in it."""
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=fixed", "threshold.value=0.5",
                                                    "record_top_k=5"))
    return list(gen.stream("Compute 12 + 7 = ", group_size=2, seed=0))


def synthetic_group(rollouts: int, tokens: int, prefix: str = "g") -> list:
    """A group of long rollouts with top-5 alternatives, as a reasoning model writes them (the
    texts are a small vocabulary's pieces, so they repeat as real tokens do)."""
    pieces = [" the", " so", " =", " 12", " +", "\n", " we", " x", " answer", " is"]
    out = []
    for r in range(rollouts):
        tid = f"{prefix}-0-{r}"
        out.append(StartEvent(trace_id=tid, model="m", prompt="p", prompt_ids=[1], config={}, seed=0,
                              group_index=r, batch=prefix))
        for i in range(tokens):
            out.append(TokenEvent(trace_id=tid, step=i, token_id=1000 + i % 97, text=pieces[i % 10],
                                  entropy=0.5 + (i % 13) / 7, surprisal=1.0 + (i % 11) / 5, segment=i // 512,
                                  attempt=0, index=i,
                                  top=[[1000 + (i + k) % 97, pieces[(i + k) % 10], 0.5 / (k + 1)] for k in range(5)]))
        out.append(DoneEvent(trace_id=tid, text="", token_ids=[], tokens_generated=tokens, erasures=0, answer=None,
                             correct=None))
    return out


def as_json(traces) -> list[list[str]]:
    """Traces as the lines they write (loaded events hold their top-k as tuples, written as lists)."""
    return [[dumps(e) for e in t.events] for t in traces]



def read_traced(path):
    """``audit.read_trace_file(path)`` with the Python memory it holds after and at its peak."""
    tracemalloc.start()
    try:
        traces, text = audit.read_trace_file(path)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return traces, text, held, peak

def test_gzip_and_plain_load_alike_whatever_their_names(events, tmp_path):
    plain, gz = tmp_path / "t.jsonl", tmp_path / "t.jsonl.gz"
    write_events(events, plain)
    write_events(events, gz)
    assert gz.read_bytes()[:2] == b"\x1f\x8b" and gz.stat().st_size < plain.stat().st_size / 3
    want = as_json(group_traces(events))
    assert any(e.kind == "token" and e.top for e in events)  # top-5 alternatives recorded
    for path in (plain, gz):
        traces, text = audit.read_trace_file(path)
        assert as_json(traces) == want and text == plain.stat().st_size
    # named for the other kind: told by the first bytes
    disguised, misnamed = tmp_path / "gzipped.jsonl", tmp_path / "plain.jsonl.gz"
    shutil.copy(gz, disguised)
    shutil.copy(plain, misnamed)
    assert as_json(audit.load_trace_file(disguised)) == want
    assert as_json(audit.load_trace_file(misnamed)) == want


def test_export_writes_gzip_that_loads_again(events, tmp_path):
    traces = group_traces(events)
    df = audit.decisions_frame(traces)
    csv, rows, trace_file = audit.export(df, tmp_path, compress=True, traces=traces)
    assert rows.name.endswith(".jsonl.gz") and trace_file.name.endswith(".jsonl.gz")
    assert rows.read_bytes()[:2] == b"\x1f\x8b" == trace_file.read_bytes()[:2]
    back = pd.read_json(rows, lines=True, compression="gzip")
    assert len(back) == len(pd.read_csv(csv)) == len(df) > 0
    assert list(back["score"]) == pytest.approx(list(df["score"]))
    assert as_json(audit.load_trace_file(trace_file)) == as_json(traces)
    assert not list(tmp_path.glob(".tmp-*"))  # written under temporary names, all renamed
    plain = audit.export(df, tmp_path / "plain")  # without traces: the table only, as before
    assert [p.suffix for p in plain] == [".csv", ".jsonl"]


def test_a_killed_gzip_writer_leaves_a_file_that_loads_up_to_its_last_flush(events, tmp_path):
    path = tmp_path / "killed.jsonl.gz"
    writer = TraceWriter(path)
    writer.GZ_FLUSH_S = 0.0  # flush every line, as a writer does once its interval has passed
    for e in events:
        writer.write(e)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(path.read_bytes())  # as a SIGKILL leaves it: no gzip end marker
    writer.close()
    assert read_events(path) == events
    with pytest.raises(E3RLError, match="ends early"):
        read_events(cut)
    assert read_events(cut, allow_truncated=True) == events
    assert sum(len(t.events) for t in audit.load_trace_file(cut)) == len(events)


def test_a_gzip_bomb_stops_at_the_text_limit_with_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.jsonl.gz"
    with gzip.open(bomb, "wb") as f:  # 64 MiB of one endless line, a few hundred KB compressed
        chunk = b"a" * 2**20
        for _ in range(64):
            f.write(chunk)
    assert bomb.stat().st_size < 2**20
    limit = 2 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(audit.TraceTooLarge, match=r"bomb\.jsonl\.gz holds more than 2 MiB of JSONL text"):
            audit.read_trace_file(bomb, max_text_bytes=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * limit  # one line read with at most the bytes left, never the whole 64 MiB


def test_loading_streams_the_file(events, tmp_path):
    """Reading holds one line at a time besides the events: 24 MiB of blank padding between the
    events costs no memory."""
    path = tmp_path / "padded.jsonl"
    pad = (" " * 4095 + "\n").encode()
    with open(path, "wb") as f:
        for e in events:
            f.write((dumps(e) + "\n").encode())
            f.write(pad * (24 * 256 // len(events) + 1))
    assert path.stat().st_size > 24 * 2**20
    traces, text, _, peak = read_traced(path)
    assert sum(len(t.events) for t in traces) == len(events) and text == path.stat().st_size
    assert peak < 4 * 2**20


def test_a_session_counts_decompressed_text_and_refuses_past_its_budget(events, tmp_path):
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    write_events(events, a)
    write_events([type(e)(**{**e.__dict__, "trace_id": "x" + e.trace_id}) for e in events], b)
    text_a = sum(len((dumps(e) + "\n").encode()) for e in events)
    loaded = audit.LoadedTraces()
    cap = text_a + text_a // 2  # room for a, not for a and b (b's text is as long, plus one byte per line)
    assert loaded.add(a, "a.jsonl.gz", max_bytes=cap).startswith("loaded 2 trace(s)")
    assert loaded.nbytes == text_a > a.stat().st_size  # what memory follows, not the compressed size
    with pytest.raises(E3RLError, match=r"b\.jsonl\.gz would pass the .* a session may hold"):
        loaded.add(b, "b.jsonl.gz", max_bytes=cap)
    assert loaded.nbytes == text_a and len(loaded.traces) == 2 and len(loaded.digests) == 1  # nothing changed


def test_the_server_budget_for_all_sessions_refuses_a_load_that_would_pass_it(events, tmp_path, monkeypatch):
    """Sessions together hold at most MAX_SERVER_TRACE_BYTES: a load past what the live sessions
    leave is refused, naming the server's budget, and changes nothing; a session ending frees room."""
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    write_events(events, a)
    write_events([type(e)(**{**e.__dict__, "trace_id": "x" + e.trace_id}) for e in events], b)
    text_a = sum(len((dumps(e) + "\n").encode()) for e in events)
    sessions = audit.TraceSessions()
    monkeypatch.setattr(audit, "MAX_SERVER_TRACE_BYTES", text_a + text_a // 2)
    first, second = sessions.of("s1"), sessions.of("s2")
    room = lambda: audit.MAX_SERVER_TRACE_BYTES - sessions.total_bytes()  # noqa: E731  (as the Audit tab asks)
    assert first.add(a, "a.jsonl.gz", server_room=room()).startswith("loaded 2 trace(s)")
    assert sessions.total_bytes() == text_a
    with pytest.raises(E3RLError, match=r"b\.jsonl\.gz would pass the 0 MiB of loaded traces this server holds "
                                        r"for all its sessions together .*try again later"):
        second.add(b, "b.jsonl.gz", server_room=room())
    assert second.nbytes == 0 and not second.traces and not second.digests
    sessions.end("s1")
    assert sessions.total_bytes() == 0
    assert second.add(b, "b.jsonl.gz", server_room=room()).startswith("loaded 2 trace(s)")


def test_a_paper_length_group_fits_every_bound(events):
    """A G = 8 x 16k-token group with top-5 alternatives, at the bytes per token event the generator
    really writes (the issue measured 370), fits the upload cap as plain JSONL, the text one file
    may hold, and a session."""
    tokens = [len((dumps(e) + "\n").encode()) for e in events if e.kind == "token"]
    per_token = max(sum(tokens) / len(tokens), 370)
    group = 8 * 16_384 * per_token
    assert group > 45 * 2**20  # the size the bounds are for
    assert group < audit.MAX_TRACE_FILE_BYTES <= audit.MAX_TRACE_TEXT_BYTES <= audit.MAX_SESSION_TRACE_BYTES


def test_memory_per_text_byte_is_what_the_session_budget_assumes(tmp_path):
    """The events a session holds cost at most about MEMORY_PER_TEXT_BYTE bytes of memory per byte
    of their JSONL text (measured on a long group with top-5 alternatives, as a reasoning model
    writes), so a session's memory is bounded by its text budget."""
    path = tmp_path / "long.jsonl.gz"
    write_events(synthetic_group(8, 1024), path)
    traces, text, held, _ = read_traced(path)
    assert sum(len(t.events) for t in traces) == 8 * 1026
    assert held / text <= audit.MEMORY_PER_TEXT_BYTE
    assert audit.MEMORY_PER_TEXT_BYTE * audit.MAX_SESSION_TRACE_BYTES <= 512 * 2**20  # per session, at most
    assert json.loads(gzip.open(path).readline())["event"] == "start"
