"""The Audit and Train tabs as a researcher scripts them (gradio_client on a launched app) and as a
first-time user meets them (Chromium): deliberate endpoints with named parameters and nothing else,
the README's calls run as written, a session's decisions shown as the tab opens, the what-if's
recorded decisions before any slider moves, a filter that applies while typing, and a training
run's own settings and step after a reload."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import make_config

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from gradio_client import Client, handle_file  # noqa: E402
from test_browser import CHROMIUM, chromium  # noqa: E402  (the browser tests' Chromium set-up)

from app.ui import examples  # noqa: E402
from e3rl_core.events import write_events  # noqa: E402
from e3rl_core.generation.generator import ErasableGenerator  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"
ENDPOINTS = {  # the Audit and Train tabs' endpoints and their parameters, in order
    "/load_traces": ["trace_file", "only_erasures", "trace_contains", "sort_by", "only_flipped"],
    "/decisions": ["only_erasures", "trace_contains", "sort_by", "only_flipped"],
    "/replay": ["trace_id"],
    "/what_if": ["trace_id", "policy", "kappa", "penalty_lambda", "threshold_value"],
    "/export_audit": ["only_erasures", "trace_contains", "sort_by", "only_flipped", "gzip_jsonl"],
    "/start_training": ["model", "algo", "steps", "group_size", "learning_rate", "seed", "prompts_per_step",
                        "eval_problems"],
    "/stop_training": [],
    "/training_status": [],
    "/start_effects": ["scope", "samples", "only_erasures", "trace_contains", "sort_by", "only_flipped"],
    "/stop_effects": [],
    "/effects_status": [],
}
# What the tabs' page plumbing would be listed as if it leaked (handler names, gradio's numbering)
UI_ONLY = re.compile(r"^/(lambda|refresh_all|run_what_if|pick_trace|step_to|select_row|trace_choices|"
                     r"recorded_settings|poll|on_|back_to_generate|model_choices|end_session|status)|_\d+$")


def wait_until(check, timeout: float = 300.0, every: float = 1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def rows(table: dict) -> list[dict]:
    """A Dataframe output as records."""
    return [dict(zip(table["headers"], r)) for r in table["data"]]


@pytest.fixture(scope="module")
def trace_gz(tmp_path_factory, tiny_llama) -> Path:
    """A real trace file, gzipped as `e3rl generate --trace-out trace.jsonl.gz` writes it."""
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=fixed", "threshold.value=0.5"))
    path = tmp_path_factory.mktemp("gz") / "trace.jsonl.gz"
    write_events(gen.stream("Compute 12 + 7 = ", group_size=2, seed=0), path)
    return path


def readme_block(uses: str) -> str:
    """The python block of the README's scripting section that calls ``uses``."""
    text = README.read_text()
    section = text[text.index("### Scripting the workbench (gradio_client)"):]
    section = section[: section.index("\n## ")]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if uses in b]
    assert len(blocks) == 1, f"one README block calls {uses}"
    return blocks[0]


def run_readme(block: str, url: str) -> str:
    """Run a README block as written, against ``url``; what it printed."""
    assert '"http://127.0.0.1:7860/"' in block
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.replace('"http://127.0.0.1:7860/"', repr(url)), "README.md", "exec"), {})  # noqa: S102
    return out.getvalue()


def test_view_api_lists_the_deliberate_endpoints_and_hides_the_rest(app_url):
    api = Client(app_url, verbose=False).view_api(print_info=False, return_format="dict")
    named = api["named_endpoints"]
    for name, params in ENDPOINTS.items():
        assert [p["parameter_name"] for p in named[name]["parameters"]] == params, name
        defaults = {p["parameter_name"]: p["parameter_has_default"] for p in named[name]["parameters"]}
        # everything but what names the input has a default: the control's starting value
        assert [k for k, v in defaults.items() if not v] == [k for k in params if k in ("trace_file", "trace_id")]
    assert named["/start_training"]["parameters"][2]["parameter_default"] == 40
    assert not api["unnamed_endpoints"]
    assert [n for n in named if UI_ONLY.search(n)] == []


def test_readme_audit_calls_run_as_written(app_url, trace_gz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the README's trace file is
    (tmp_path / "trace.jsonl.gz").write_bytes(trace_gz.read_bytes())
    printed = run_readme(readme_block("/load_traces"), app_url)
    assert "loaded 2 trace(s) from trace.jsonl.gz" in printed
    assert re.search(r"recorded decisions would change", printed)


def test_readme_train_calls_run_as_written(app_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the model path is read relative to the repository
    printed = run_readme(readme_block("/start_training"), app_url)
    assert "started grpo-" in printed and "run settings: model" in printed
    client = Client(app_url, verbose=False)
    # the README's run (stopped or finished) has ended before the next test starts one
    wait_until(lambda: "(running)" not in client.predict(api_name="/training_status")[0], every=2)


def test_session_decisions_replay_what_if_and_a_gzip_export_that_loads_again(app_url):
    client = Client(app_url, verbose=False)
    q, g = examples()[0]
    client.predict(prompt=q, gold=g, group_size=2, seed=8, api_name="/generate")
    table = rows(client.predict(api_name="/decisions"))
    assert table and {r["source"] for r in table} == {"session"}
    erased = rows(client.predict(only_erasures=True, sort_by="score", api_name="/decisions"))
    assert erased and {r["decision"] for r in erased} == {"erase"}
    assert [r["score"] for r in erased] == sorted((r["score"] for r in erased), reverse=True)
    tid = table[0]["trace"]
    assert rows(client.predict(trace_contains="no such trace", api_name="/decisions")) == []
    html = client.predict(tid, api_name="/replay")
    assert html.count('class="e3rl-tok"') > 10
    # a bar no recorded score reaches: the recorded erasures would have been kept
    changes, line = client.predict(tid, policy="fixed", threshold_value=5.0, api_name="/what_if")
    changed, total = (int(x) for x in re.match(r"(\d+) of (\d+) recorded decisions would change", line).groups())
    assert total == len(table) and changed == sum(bool(r["changed"]) for r in rows(changes)) > 0
    assert "no trace 'nope'" in client.predict("nope", api_name="/replay")
    files = [Path(f) for f in client.predict(gzip_jsonl=True, api_name="/export_audit")]
    assert [f.name.split(".", 1)[1] for f in files] == ["csv", "jsonl.gz", "jsonl.gz"]
    other = Client(app_url, verbose=False)  # another session loads the exported traces
    msg, loaded, *_ = other.predict(handle_file(str(files[2])), api_name="/load_traces")
    assert msg.startswith("loaded 2 trace(s)") and len(rows(loaded)) == len(table)
    assert {r["source"] for r in rows(loaded)} == {"file"}


def test_a_bounded_deployment_clamps_steps_and_says_so(tmp_path):
    from app.tabs import Shared
    from app.tabs.train import start_run
    from app.training import TrainingManager

    class Recording(TrainingManager):
        def start(self, req, owner=None):
            self.request = req
            return self.root / "grpo-x"

    shared = Shared(store=None, trainer=Recording(tmp_path, max_steps=30), space=True, engine="thread",
                    default_model="checkpoints/arith-demo", shipped=["checkpoints/arith-demo"], audit_dir=tmp_path,
                    session_events=None, last_events=None)
    msg = start_run(shared, "checkpoints/arith-demo", "grpo", 100, 4, 5e-5, 0)
    assert msg == "started grpo-x (⚠️ steps lowered from 100 to 30, the most this deployment trains per run)"
    assert shared.trainer.request.steps == 30
    assert start_run(shared, "checkpoints/arith-demo", "grpo", 12, 4, 5e-5, 0) == "started grpo-x"


# ------------------------------------------------------------------ in Chromium
needs_chromium = pytest.mark.skipif(not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)),
                                    reason=f"no Chromium at {CHROMIUM}: ./run setup installs it with apt-get")


@needs_chromium
def test_audit_opens_filled_what_if_shows_recorded_and_the_filter_applies_while_typing(app_url):
    with chromium() as b:
        page = b.new_page(viewport={"width": 1400, "height": 1500})
        page.goto(app_url, wait_until="domcontentloaded")
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_selector("#e3rl-summary :text('finished:')", timeout=180_000)
        page.get_by_role("tab", name="Audit").click()  # no click on "refresh from this session"
        page.wait_for_function("document.querySelector('#e3rl-audit').innerText.includes('above_threshold')",
                               timeout=30_000)
        # the first trace replays, and the what-if lists its recorded decisions, none changed
        page.wait_for_selector("#e3rl-whatif :text('recorded decisions would change')", timeout=30_000)
        changed, total = (int(x) for x in re.findall(r"(\d+) of (\d+)", page.inner_text("#e3rl-whatif"))[0])
        assert changed == 0 and total > 0
        page.wait_for_selector("#e3rl-replay .e3rl-tok", timeout=30_000)
        # moving a control (typed into the slider's box) re-judges them: a far higher bar keeps erased segments
        kappa = page.locator(".block", has_text="κ").locator("input[type='number']").first
        kappa.fill("3")
        kappa.press("Enter")
        page.wait_for_function("/^[1-9]\\d* of \\d+ recorded/.test(document.querySelector('#e3rl-whatif').innerText)",
                               timeout=30_000)
        changed, again = (int(x) for x in re.findall(r"(\d+) of (\d+)", page.inner_text("#e3rl-whatif"))[0])
        assert changed > 0 and again == total
        box = page.get_by_label("trace id contains")
        box.press_sequentially("no such trace", delay=30)  # typed, no Enter
        page.wait_for_function("!document.querySelector('#e3rl-audit').innerText.includes('above_threshold')",
                               timeout=30_000)
        box.fill("")
        box.press_sequentially("-0-", delay=30)
        page.wait_for_function("document.querySelector('#e3rl-audit').innerText.includes('above_threshold')",
                               timeout=30_000)


@needs_chromium
def test_train_tab_shows_the_running_runs_settings_step_and_curves_after_a_reload(app_url):
    client = Client(app_url, verbose=False)
    started = client.predict("checkpoints/arith-demo", algo="grpo", steps=20, group_size=2, learning_rate=1e-4,
                             seed=3, prompts_per_step=4, eval_problems=3, api_name="/start_training")
    assert started.startswith("started grpo-"), started
    with chromium() as b:
        page = b.new_page(viewport={"width": 1400, "height": 1500})
        page.goto(app_url, wait_until="domcontentloaded")  # a page opened after the start: a reload
        page.get_by_role("tab", name="Train").click()
        status = page.locator("#e3rl-train-status")
        status.get_by_text("run settings: model").wait_for(timeout=30_000)
        text = status.inner_text()
        # the run's own settings, while the form shows its starting values (40 steps, 16 prompts per step)
        assert "· grpo · 20 steps · group size 2 · 4 prompts per step · learning rate 0.0001 · seed 3" in text
        assert re.search(r"grpo-\S+: (starting|running) — step \d+ of 20 \(running\)", text), text
        # steps counted from the log (before the run's first checkpoint too: test_training_manager.py)
        page.wait_for_function("/running — step [1-9]\\d* of 20 \\(running\\)/.test("
                               "document.querySelector('#e3rl-train-status').innerText)", timeout=300_000)
        page.wait_for_selector("#e3rl-train-rollout :text('Latest rollout of step')", timeout=60_000)
        titles = page.eval_on_selector_all(  # plotly's axis titles: class xtitle, x2title, ..., ytitle, ...
            "#e3rl-train-curves text", "els => els.filter(e => /^[xy]\\d*title$/.test(e.getAttribute('class')))"
                                       ".map(e => e.textContent)")
        assert titles.count("step") == 5 and {"reward", "loss"} <= set(titles), titles
        page.locator("#e3rl-train-stop").click()
        status.get_by_text("stopping").wait_for(timeout=10_000)
        page.wait_for_timeout(2500)  # a poll already under way when Stop was pressed
        # "stopping" stays on every poll until the run has ended, then its final status shows
        end = time.monotonic() + 300
        while "(running)" in (text := status.inner_text()):
            assert "stopping" in text, text
            assert time.monotonic() < end, "the run did not stop"
            page.wait_for_timeout(500)
        assert "stopping" not in text and re.search(r": stopped — step \d+ of 20", text), text
        # the 3 held-out problems were scored before the first step and after the stop
        assert re.search(r"held-out Avg@4 on synthetic:test\?n=3 .*: before training [\d.]+ → after step "
                         r"\d+ [\d.]+ \([+-][\d.]+\)", text), text


def test_picking_a_trace_draws_its_replay_once():
    """Picking a trace sets the replay slider (replay_range) and then draws the whole trace
    (replay); the slider's own handler follows the user's input only, so the programmatic set
    draws nothing more."""
    from app.ui import build

    demo = build()
    events = {getattr(fn.fn, "__name__", ""): [event for _, event in fn.targets] for fn in demo.fns.values()}
    assert events["replay_range"] == ["change"] and events["replay"] == ["then"]
    assert events["step_to"] == ["input"]
