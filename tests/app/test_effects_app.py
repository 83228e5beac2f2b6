"""The Audit tab's decision effects through the API (gradio_client on a launched app): a background job
over the session's decisions whose progress, aggregates and effect columns arrive while it runs; a
Space's bound and visitors kept apart; a decision's continuations side by side."""
from __future__ import annotations

import json
import os
import re

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from gradio_client import Client  # noqa: E402
from test_api_audit_train import rows, wait_until  # noqa: E402

from app.effects import EffectsManager, detail_html, progress_markdown  # noqa: E402
from app.ui import examples  # noqa: E402
from e3rl_core.errors import E3RLError  # noqa: E402


def test_session_decisions_measured_in_the_background(app_url):
    client = Client(app_url, verbose=False)
    assert client.predict(api_name="/effects_status")[0] == "no decision-effects job yet"
    msg = client.predict(scope="selected row", api_name="/start_effects")
    assert msg.startswith("⚠️ no row selected")
    q, g = examples()[0]
    client.predict(prompt=q, gold=g, group_size=2, seed=8, api_name="/generate")
    before = rows(client.predict(api_name="/decisions"))
    msg = client.predict(scope="all decisions", samples=2, api_name="/start_effects")
    assert msg.startswith("started effects-") and f"{len(before)} decisions × 2 × 2" in msg
    again = client.predict(scope="all decisions", samples=2, api_name="/start_effects")
    assert again.startswith("⚠️") and "running" in again  # one job at a time
    progress, summary, _ = wait_until(
        lambda: (lambda s: s if "finished" in s[0] else None)(client.predict(api_name="/effects_status")),
        timeout=600, every=2)
    assert f"{len(before)}/{len(before)} decisions (100%), finished" in progress
    assert "erasures:" in summary and "chance alone" in summary
    table = rows(client.predict(api_name="/decisions"))
    assert len(table) == len(before)
    assert {r["verdict"] for r in table} <= {"helps", "hurts", "none"} and all(r["verdict"] for r in table)
    assert all(-1 <= r["effect"] <= 1 and r["effect_low"] <= r["effect"] <= r["effect_high"] for r in table)
    # a local deployment (not a Space) shows its newest job to every session, as its training runs
    assert "finished" in Client(app_url, verbose=False).predict(api_name="/effects_status")[0]


def test_space_bound_and_visitors_kept_apart(tmp_path):
    manager = EffectsManager(tmp_path, visitors_apart=True, max_rows=64)
    with pytest.raises(E3RLError, match="at most 64"):
        manager.start([], [f"t/{i}/0" for i in range(5)], 8, "m", owner="a")
    manager.root.mkdir(parents=True)
    (manager.root / "active-effects.json").write_text(json.dumps({"pid": os.getpid(), "job": "x", "owner": "a"}))
    with pytest.raises(E3RLError, match="another visitor's"):
        manager.start([], ["t/0/0"], 2, "m", owner="b")
    assert manager.stop("b") == "no decision-effects job of yours is running"
    assert manager.jobs("b") == []


def test_detail_shows_keep_and_redraw_side_by_side():
    row = {"key": "t-0-0/2/0", "decision": "erase", "margin": 0.25, "effect": 0.5, "ci_low": 0.1, "ci_high": 0.8,
           "verdict": "helps", "gold": "10", "seed": 7, "keep_texts": ["x = <b>1</b>", "y"], "keep_answers": ["1", "2"],
           "keep_correct": 0, "keep_each": [0, 0], "redraw_texts": ["z", "w"], "redraw_answers": ["10", "10"],
           "redraw_correct": 2, "redraw_each": [1, 1]}
    html = detail_html(row)
    assert "keep (segment as written" in html and "redraw (segment drawn afresh): 2/2 correct" in html
    assert "&lt;b&gt;1&lt;/b&gt;" in html and html.count("✓") == 2 and html.count("✗") == 2
    assert re.search(r"effect \+0\.50 \[\+0\.10, \+0\.80\] → <b>helps</b>", html)
    record = {"done": 3, "total": 12, "status": "running", "seconds": 30.0}
    line = progress_markdown(object(), record, True)  # type: ignore[arg-type]
    assert "3/12 decisions (25%), running, about 2 min left" in line  # 9 left at 10 s each
