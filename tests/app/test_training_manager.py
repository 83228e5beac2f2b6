"""Background training for the Train tab: one run at a time, survives its caller, stops cleanly."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.training import RunRequest, TrainingManager, read_status
from e3rl_core.errors import E3RLError
from e3rl_core.training.checkpoint import checkpoints

DEMO = str(Path(__file__).resolve().parents[2] / "checkpoints" / "arith-demo")


def _wait(cond, timeout: float = 180.0) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not met in time")
        time.sleep(0.5)


def test_background_run_one_at_a_time_and_stop_keeps_a_checkpoint(tmp_path):
    mgr = TrainingManager(tmp_path)
    req = RunRequest(model=DEMO, algo="grpo", steps=200, group_size=2, prompts_per_step=2, save_steps=100,
                     data="synthetic:train?n=64&seed=1&difficulty=2")
    out = mgr.start(req)
    with pytest.raises(E3RLError, match="already in progress"):
        mgr.start(req)
    # a fresh manager (a reloaded page, another worker) sees the same run through the lock file
    assert TrainingManager(tmp_path).active()["out"] == str(out)
    _wait(lambda: len(read_status(out)["rows"]) >= 2)
    assert "stopping" in mgr.stop()
    _wait(lambda: mgr.active() is None)
    status = read_status(out)
    assert status["status"] == "stopped" and status["step"] < 200
    assert [s for s, _ in checkpoints(out)] == [status["step"]]
    assert mgr.checkpoints() == [checkpoints(out)[-1][1]]
    assert mgr.stop() == "no run in progress"


def test_bounded_steps_and_bad_group_size(tmp_path):
    mgr = TrainingManager(tmp_path, max_steps=30)
    with pytest.raises(E3RLError, match="at most 30 steps"):
        mgr.start(RunRequest(model=DEMO, steps=31))
    with pytest.raises(E3RLError, match="at least 2"):
        mgr.start(RunRequest(model=DEMO, group_size=1))
    assert mgr.active() is None and not list(tmp_path.iterdir())


def test_latest_trace_events_reads_only_the_tail(tmp_path):
    from app.training import latest_trace_events
    from e3rl_core.events import StartEvent, TokenEvent, write_events

    events = []
    for k in range(300):  # a long file: many traces
        tid = f"s{k}r0d0-0-0"
        events.append(StartEvent(trace_id=tid, model="m", prompt="p" * 200, prompt_ids=[1], config={}, seed=k,
                                 group_index=0))
        events.append(TokenEvent(trace_id=tid, step=0, token_id=1, text="x", entropy=0.1, surprisal=0.1,
                                 segment=0, attempt=0))
    write_events(events, tmp_path / "rollouts.jsonl")
    got = latest_trace_events(tmp_path, max_bytes=4096)
    assert [e.trace_id for e in got] == ["s299r0d0-0-0"] * 2
    assert latest_trace_events(tmp_path / "missing") == []
