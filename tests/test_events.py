"""Trace events: JSONL round trip from a real generation, and bad files."""
from __future__ import annotations

import json

import pytest
from conftest import make_config

from e3rl_core.errors import TraceFormatError
from e3rl_core.events import (
    DoneEvent,
    StartEvent,
    TokenEvent,
    Trace,
    event_from_dict,
    event_to_dict,
    group_traces,
    read_events,
    write_events,
)
from e3rl_core.generation.generator import ErasableGenerator


@pytest.fixture(scope="module")
def events(tiny_llama):
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=fixed", "threshold.value=1.2"))
    return list(gen.stream(["1 + 1 = ", "2 * 3 = "], group_size=2, seed=0, golds=["2", "6"]))


def test_schema_fields(events):
    required = {
        "start": {"trace_id", "model", "prompt", "prompt_ids", "config", "seed", "group_index"},
        "token": {"trace_id", "step", "token_id", "text", "entropy", "surprisal", "segment", "attempt"},
        "segment": {"trace_id", "segment", "attempt", "start", "end", "score", "features", "baseline",
                    "penalty", "history", "threshold", "decision"},
        "erase": {"trace_id", "segment", "attempt", "start", "end", "text", "cache_len_before",
                  "cache_len_after"},
        "done": {"trace_id", "text", "token_ids", "tokens_generated", "erasures", "answer", "correct"},
    }
    seen = set()
    for e in events:
        d = event_to_dict(e)
        seen.add(d["event"])
        assert required[d["event"]] <= set(d), d["event"]
        if d["event"] == "segment":
            assert set(d["features"]) == {"base", "max", "delta"}
            assert d["decision"] in ("accept", "erase", "forced_accept")
    assert seen == set(required)


def test_jsonl_round_trip(events, tmp_path):
    path = tmp_path / "trace.jsonl"
    write_events(events, path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(events)
    assert all(isinstance(json.loads(line), dict) for line in lines)
    back = read_events(path)
    assert back == events
    assert [event_from_dict(event_to_dict(e)) for e in events] == events
    traces = group_traces(back)
    assert len(traces) == 4
    assert all(isinstance(t.start, StartEvent) and isinstance(t.done, DoneEvent) for t in traces)
    assert traces[0].start.gold == "2" and traces[3].start.gold == "6"


def test_truncated_and_malformed_files(events, tmp_path):
    path = tmp_path / "cut.jsonl"
    write_events(events[:5], path)
    text = path.read_text()
    path.write_text(text + text.splitlines()[1][:17])  # killed mid-line
    with pytest.raises(TraceFormatError, match="ends mid-line"):
        read_events(path)
    assert read_events(path, allow_truncated=True) == events[:5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text + '{"event": "token", "trace_id": "x"}\n')
    with pytest.raises(TraceFormatError, match=r"bad.jsonl:6: token event lacks field\(s\)"):
        read_events(bad)
    with pytest.raises(TraceFormatError, match="unknown event 'tok'"):
        event_from_dict({"event": "tok"})
    with pytest.raises(TraceFormatError, match="not found"):
        read_events(tmp_path / "missing.jsonl")


def test_gzip_files_written_by_name_and_read_by_their_first_bytes(events, tmp_path):
    """A name ending in .gz writes gzip (write_events, and TraceWriter as `e3rl generate --trace-out`
    uses it); reading tells gzip by its magic bytes, whatever the name, one line at a time."""
    import gzip

    from e3rl_core.events import TraceWriter, is_gzip, iter_events

    whole, live = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    write_events(events, whole)
    with TraceWriter(live) as w:
        for e in events:
            w.write(e)
    plain = tmp_path / "c.jsonl"
    write_events(events, plain)
    for path in (whole, live):
        assert is_gzip(path) and gzip.decompress(path.read_bytes()) == plain.read_bytes()
        assert read_events(path) == events
    assert not is_gzip(plain)
    disguised = tmp_path / "gz-named-plain.jsonl"
    disguised.write_bytes(whole.read_bytes())
    assert read_events(disguised) == events
    lazy = iter_events(whole)
    assert next(lazy) == events[0]  # a generator: the rest is not read yet
    lazy.close()


def test_a_gzip_file_cut_off_mid_stream(events, tmp_path):
    """A writer killed before gzip's end marker: what was flushed reads with allow_truncated, and
    a stream cut inside a line drops that line; without allow_truncated, one line says so."""
    import gzip

    from e3rl_core.events import TraceWriter

    path = tmp_path / "live.jsonl.gz"
    w = TraceWriter(path)
    w.GZ_FLUSH_S = 0.0  # flush each line, as the writer does once its flush interval has passed
    for e in events:
        w.write(e)
    cut = path.read_bytes()  # no end marker yet: the process was killed here
    w.close()
    killed = tmp_path / "killed.jsonl.gz"
    killed.write_bytes(cut)
    with pytest.raises(TraceFormatError, match=r"killed.jsonl.gz: the compressed file ends early"):
        read_events(killed)
    assert read_events(killed, allow_truncated=True) == events
    killed.write_bytes(cut[: len(cut) * 2 // 3])  # cut inside the deflate stream
    partial = read_events(killed, allow_truncated=True)
    assert 0 < len(partial) < len(events) and partial == events[: len(partial)]
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b"")[:10] + b"\xff" * 64)  # a bare header, then no valid deflate block
    with pytest.raises(TraceFormatError, match="not a readable gzip file"):
        read_events(corrupt, allow_truncated=True)


def test_kept_tokens_view():
    t = Trace([
        TokenEvent("a", 0, 5, "x", 0.1, 0.2, 0, 0),
        TokenEvent("a", 1, 6, "y", 0.1, 0.2, 0, 1),
    ])
    from e3rl_core.events import EraseEvent
    t.events.insert(1, EraseEvent("a", 0, 0, 0, 1, "x", 3, 2))
    assert [k.token_id for k in t.kept_tokens()] == [6]


def test_start_events_carry_batch_group_and_step(events, tiny_llama):
    starts = [e for e in events if isinstance(e, StartEvent)]
    assert len({s.batch for s in starts}) == 1 and starts[0].batch  # one stream() call, one batch
    assert [(s.group_id, s.group_index) for s in starts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(s.train_step is None for s in starts)  # not a training rollout
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("max_new_tokens=4"))
    traces = gen.generate(["1 + 1 = "], group_size=2, seed=0, trace_prefix="my-run-1", train_step=7)
    assert [(t.start.batch, t.start.group_id, t.start.train_step) for t in traces] == [("my-run-1", 0, 7)] * 2


def _old_start(trace_id: str, **extra) -> dict:
    return {"event": "start", "trace_id": trace_id, "model": "m", "prompt": "p", "prompt_ids": [1],
            "config": {}, "seed": 0, "group_index": int(trace_id.rsplit("-", 1)[-1]) if "-" in trace_id else 0,
            "gold": None, **extra}


def test_old_files_without_batch_and_step_still_load(tmp_path):
    """Start events written before batch/train_step were fields: the loader fills them in from the id."""
    rows = [
        _old_start("s12r0d1-0-1", group_id=0),
        {"event": "token", "trace_id": "s12r0d1-0-1", "step": 0, "token_id": 5, "text": "x",
         "entropy": 0.1, "surprisal": 0.2, "segment": 0, "attempt": 0},
        _old_start("my-run-1-1-0"),  # older still: no group_id either
        _old_start("custom"),
    ]
    path = tmp_path / "old.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    starts = [e for e in read_events(path) if isinstance(e, StartEvent)]
    assert [(s.batch, s.group_id, s.train_step) for s in starts] == [
        ("s12r0d1", 0, 12), ("my-run-1", 1, None), ("custom", 0, None)]
    # a new file keeps what it says, even where the id would suggest otherwise
    new = event_from_dict(_old_start("s3r0d0-0-0", batch="b", train_step=None))
    assert (new.batch, new.train_step) == ("b", None)
    again = tmp_path / "again.jsonl"
    write_events(starts, again)
    assert read_events(again) == starts
