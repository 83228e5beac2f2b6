"""The launched app through gradio_client: streaming, forced erasures, audit export, two sessions."""
from __future__ import annotations

import os
import re
import threading

import pandas as pd
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from gradio_client import Client  # noqa: E402

from app.ui import examples  # noqa: E402


def gen_args(question: str, gold: str, **kw) -> list:
    p = dict(model="checkpoints/arith-demo", prompt=question, gold=gold, temperature=1.0, top_p=1.0,
             max_new_tokens=256, signal="surprisal", segment_mode="delimiter", segment_tokens=32, policy="e3rl",
             kappa=1.0, threshold_value=2.0, warmup_segments=2, erase_budget=3, erase=True, group_size=2, seed=0)
    p.update(kw)
    return ["entropy", 0, *p.values()]


def test_streamed_generation_with_forced_erasures_and_audit_export(app_url):
    client = Client(app_url, verbose=False)
    q, g = examples()[0]
    job = client.submit(*gen_args(q, g, policy="fixed", threshold_value=0.05), api_name="/generate")
    updates = list(job)
    assert len(updates) >= 2  # streamed, not one final answer
    html, summary = updates[-1][0], updates[-1][1]
    assert html.count('class="e3rl-tok"') > 10
    n = int(re.search(r"erasures (\d+)", summary).group(1))
    assert n >= 1 and 'class="e3rl-erased"' in html
    files = client.predict(False, "", "", False, api_name="/export_audit")
    csv = next(f for f in files if str(f).endswith(".csv"))
    jsonl = next(f for f in files if str(f).endswith(".jsonl"))
    a, b = pd.read_csv(csv), pd.read_json(jsonl, lines=True)
    assert len(a) == len(b) > 0 and (a["decision"] == "erase").sum() >= n
    assert list(a["score"]) == pytest.approx(list(b["score"]))


def test_two_sessions_at_once_each_see_their_own(app_url):
    (q1, g1), (q2, g2) = examples()[0], examples()[3]
    results: dict[int, list] = {}

    def run(i: int, q: str, g: str) -> None:
        results[i] = Client(app_url, verbose=False).predict(*gen_args(q, g, group_size=1, seed=i), api_name="/generate")

    threads = [threading.Thread(target=run, args=(1, q1, g1)), threading.Thread(target=run, args=(2, q2, g2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(results) == {1, 2}
    assert f"gold {g1}" in results[1][1] or f"`{g1}` ✓" in results[1][1]
    assert f"gold {g2}" in results[2][1] or f"`{g2}` ✓" in results[2][1]
    assert results[1][0] != results[2][0]


def test_bad_prompt_gives_a_message_not_a_traceback(app_url):
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="empty"):
        client.predict(*gen_args("   ", ""), api_name="/generate")


def test_space_mode_allows_only_listed_models(tmp_path):
    from conftest import free_port

    from app.main import launch

    demo, url = launch(port=free_port(), block=False, space=True, runs_root=str(tmp_path))
    try:
        client = Client(url, verbose=False)
        q, g = examples()[0]
        with pytest.raises(Exception, match="only the listed models|not in the list of choices"):
            client.predict(*gen_args(q, g, model=str(tmp_path)), api_name="/generate")
        out = client.predict(*gen_args(q, g, group_size=1), api_name="/generate")
        assert 'class="e3rl-tok"' in out[0]
        # (a bounded training request is clamped and says so: test_api_audit_train.py, without starting a run)
    finally:
        demo.close()


def test_counterfactual_shows_the_run_with_erasure_off_beside_it(app_url):
    client = Client(app_url, verbose=False)
    q, g = examples()[0]
    args = gen_args(q, g, group_size=4, seed=8)
    shown = client.predict(*args, api_name="/generate")
    on_html, on_md, off_html, off_md = client.predict(*args[:1], *args[2:], api_name="/counterfactual")
    assert on_html == shown[0]  # the erasure-on side is the run just shown
    assert "erasures 0" in off_md and "✓" in on_md and "✗" in off_md  # the default demo: healed vs not
