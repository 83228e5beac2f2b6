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


def test_kept_tokens_view():
    t = Trace([
        TokenEvent("a", 0, 5, "x", 0.1, 0.2, 0, 0),
        TokenEvent("a", 1, 6, "y", 0.1, 0.2, 0, 1),
    ])
    from e3rl_core.events import EraseEvent
    t.events.insert(1, EraseEvent("a", 0, 0, 0, 1, "x", 3, 2))
    assert [k.token_id for k in t.kept_tokens()] == [6]
