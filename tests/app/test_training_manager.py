"""Background training for the Train tab: one run at a time, survives its caller, stops cleanly."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.training import (
    LOCK,
    STOPPING,
    RunRequest,
    TrainingManager,
    curves_spec,
    read_status,
    rollout_html,
    status_markdown,
)
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
                     data="synthetic:train?n=64&seed=1&difficulty=2", eval_data=None)
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
        mgr.start(RunRequest(model=DEMO, steps=10, group_size=1))
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


def write_run(run: Path, pid: int, status: str = "running", step: int = 0, logged: int = 0) -> None:
    """A run directory as the trainer writes it: run.json (its step moves only at checkpoints) and
    one log.jsonl row per step."""
    run.mkdir(exist_ok=True)
    (run / "run.json").write_text(json.dumps({
        "status": status, "message": "", "algo": "grpo", "model": "/models/arith", "data": "synthetic:train?n=64",
        "step": step, "max_steps": 20, "config": {"num_generations": 2, "prompts_per_step": 3,
                                                   "learning_rate": 1e-4, "seed": 7},
        "pid": pid, "host": socket.gethostname()}))
    rows = [json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, logged + 1)]
    (run / "log.jsonl").write_text("".join(rows))


@pytest.fixture
def slow_stopper():
    """A stand-in trainer that takes its time to stop, as one finishing its step does (SIGTERM is
    noted, not obeyed); killed at the end."""
    code = ("import signal, time; signal.signal(signal.SIGTERM, lambda *a: None); print('ready', flush=True); "
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline().strip() == b"ready"  # its SIGTERM handler is in place
    yield proc
    proc.kill()
    proc.wait()


def test_status_counts_steps_from_the_log_and_shows_the_runs_own_settings(tmp_path, slow_stopper):
    run = tmp_path / "grpo-1"
    write_run(run, slow_stopper.pid, step=0, logged=3)  # no checkpoint yet: run.json still says step 0
    lock = {"pid": slow_stopper.pid, "out": str(run), "request": {"model": "form default", "algo": "e3rl"}}
    md = status_markdown(run, read_status(run), lock)
    assert "running — step 3 of 20 (running)" in md
    # what the run uses, from its run.json (not the request, nor the form's starting values)
    assert ("run settings: model `/models/arith` · grpo · 20 steps · group size 2 · 3 prompts per step · "
            "learning rate 0.0001 · seed 7") in md and "form default" not in md
    write_run(run, slow_stopper.pid, step=5, logged=4)  # a resumed run: run.json ahead of the truncated log
    assert "step 5 of 20" in status_markdown(run, read_status(run), lock)


def test_a_starting_run_shows_the_settings_it_was_started_with(tmp_path):
    run = tmp_path / "dapo-1"  # run.json not written yet: the lock's request tells
    req = RunRequest(model="/models/x", algo="dapo", steps=5, group_size=3, prompts_per_step=4, learning_rate=2e-4,
                     seed=4)
    md = status_markdown(run, read_status(run), {"pid": 1, "out": str(run), "request": req.__dict__})
    assert "starting — step 0 of 5 (running)" in md
    assert "model `/models/x` · dapo · 5 steps · group size 3 · 4 prompts per step · learning rate 0.0002" in md


def test_stopping_shows_until_the_run_has_stopped(tmp_path, slow_stopper):
    run = tmp_path / "e3rl-1"
    write_run(run, slow_stopper.pid, logged=2)
    (tmp_path / LOCK).write_text(json.dumps({"pid": slow_stopper.pid, "out": str(run), "request": {}}))
    mgr = TrainingManager(tmp_path)
    assert mgr.stop() == STOPPING
    for _ in range(3):  # every poll while it finishes its step, from this page or a reloaded one
        for manager in (mgr, TrainingManager(tmp_path)):
            md = status_markdown(run, read_status(run), manager.active())
            assert md.startswith(f"**e3rl-1**: {STOPPING} — step 2 of 20 (running)"), md
        time.sleep(0.2)
    slow_stopper.kill()  # it has stopped (and written its status)
    slow_stopper.wait()
    write_run(run, slow_stopper.pid, status="stopped", step=2, logged=2)
    assert mgr.active() is None
    md = status_markdown(run, read_status(run), mgr.active())
    assert md.startswith("**e3rl-1**: stopped — step 2 of 20") and "stopping" not in md and "(running)" not in md


def test_a_bounded_deployment_lowers_steps_and_says_so(tmp_path):
    assert TrainingManager(tmp_path, max_steps=30).clamp_steps(100) == (
        30, "steps lowered from 100 to 30, the most this deployment trains per run")
    assert TrainingManager(tmp_path, max_steps=30).clamp_steps(30) == (30, "")
    assert TrainingManager(tmp_path).clamp_steps(400) == (400, "")


def test_curves_have_axis_titles_and_the_rollout_a_heading_with_its_prompt():
    from e3rl_core.events import StartEvent, TokenEvent

    spec = curves_spec([{"step": 1, "reward_mean": 0.5, "loss": 0.1}, {"step": 2, "reward_mean": 0.7, "loss": 0.2}])
    axes = {k: v for k, v in spec["layout"].items() if k.startswith(("xaxis", "yaxis"))}
    assert len(axes) == 10 and all(a["title"]["text"] for a in axes.values())
    assert {a["title"]["text"] for k, a in axes.items() if k.startswith("x")} == {"step"}
    events = [StartEvent(trace_id="s3r0d0-0-0", model="m", prompt="Compute <b>12</b> + 7 = ", prompt_ids=[1],
                         config={}, seed=0, group_index=0, gold="19", train_step=3),
              TokenEvent(trace_id="s3r0d0-0-0", step=0, token_id=1, text="19", entropy=0.1, surprisal=0.1,
                         segment=0, attempt=0)]
    html = rollout_html(events)
    assert "Latest rollout of step 3" in html and "Compute &lt;b&gt;12&lt;/b&gt; + 7 = " in html
    assert "gold answer <code>19</code>" in html and 'class="e3rl-tok"' in html
    assert rollout_html([]) == ""


def test_held_out_line_shows_before_after_and_progress():
    from app.training import held_out_line

    assert held_out_line({}) == ""
    running = {"data": "synthetic:test?n=100", "samples": 4, "running": {"label": "before", "done": 40, "total": 100}}
    assert "evaluating before training: 40/100 problems" in held_out_line(running)
    done = {"data": "synthetic:test?n=100", "samples": 4, "before": {"avg_at_k": 0.475, "step": 0},
            "after": {"avg_at_k": 0.52, "step": 30}}
    line = held_out_line(done)
    assert "held-out Avg@4 on `synthetic:test?n=100`" in line
    assert "before training **0.475** → after step 30 **0.520** (+0.045)" in line


def test_the_run_trains_on_the_apps_device(tmp_path, monkeypatch):
    """A GPU app's Train tab trains on its GPU: the command carries the manager's device."""
    import app.training as training

    launched = []

    class FakePopen:
        pid = 999_999_999

        def __init__(self, cmd, **kwargs):
            launched.append(cmd)

        def poll(self):
            return 0

    monkeypatch.setattr(training.subprocess, "Popen", FakePopen)
    for device in ("cpu", "cuda:1"):
        mgr = TrainingManager(tmp_path / device, device=device)
        mgr.start(RunRequest(model=DEMO, algo="grpo", steps=1))
        cmd = launched[-1]
        assert cmd[cmd.index("--device") + 1] == device
        # the tab's runs are scored on held-out problems before and after (eval.json)
        assert cmd[cmd.index("--eval-data") + 1] == RunRequest.eval_data and "--eval-samples" in cmd
    mgr = TrainingManager(tmp_path / "none")
    mgr.start(RunRequest(model=DEMO, steps=1, eval_data=None))
    assert "--eval-data" not in launched[-1] and "--eval-samples" not in launched[-1]
