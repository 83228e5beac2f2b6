"""The Generate tab's programmatic API through gradio_client: named endpoints with named, defaulted
parameters, UI-only handlers hidden, and the README's snippet run as written."""
from __future__ import annotations

import os
import re
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from gradio_client import Client  # noqa: E402

from app.tabs.generate import GEN_FIELDS  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"
README_URL = "http://127.0.0.1:7860/"


def test_generate_and_counterfactual_have_named_parameters_and_ui_handlers_are_hidden(app_url):
    api = Client(app_url, verbose=False).view_api(print_info=False, return_format="dict")
    named = api["named_endpoints"]
    expected = {"/generate": ["colour_by", "rollout", *GEN_FIELDS], "/counterfactual": ["colour_by", *GEN_FIELDS]}
    for name, params in expected.items():
        got = named[name]["parameters"]
        assert [p["parameter_name"] for p in got] == params
        assert all(p["parameter_has_default"] for p in got)  # every one may be left out
    defaults = {p["parameter_name"]: p["parameter_default"] for p in named["/generate"]["parameters"]}
    assert defaults["colour_by"] == "entropy" and defaults["model"] == "checkpoints/arith-demo"
    assert [r["label"] for r in named["/generate"]["returns"]][:3] == ["heatmap", "summary", "group table"]
    # the tab's UI-only listeners (redraw, legend, Stop, examples) are not endpoints
    assert not set(named) & {"/draw", "/legend_html", "/stop_running", "/load_example"}
    assert not [n for n in named if n.startswith("/lambda")]
    assert not any(re.fullmatch(r"/param_\d+", p["parameter_name"] or "")
                   for ep in named.values() for p in ep["parameters"])
    assert not api.get("unnamed_endpoints")


def readme_snippet() -> str:
    """The README's python block that calls /generate."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    snippet = next(b for b in blocks if 'api_name="/generate"' in b)
    assert README_URL in snippet
    return snippet


def test_the_readme_snippet_runs_as_written(app_url, capsys):
    code = readme_snippet().replace(README_URL, app_url.rstrip("/") + "/")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the documented snippet, as a user runs it
    summary, on, off = scope["summary"], scope["on_summary"], scope["off_summary"]
    assert re.search(r"\*\*Answer:\*\* `[^`]*` [✓✗] \(gold 29\)", summary) and "tokens generated" in summary
    assert "erasures 0" in off and "Answer:" in on
    assert 'class="e3rl-tok"' in scope["heatmap"] and 'class="e3rl-tok"' in scope["off_heatmap"]
    printed = capsys.readouterr().out
    assert summary in printed and off in printed  # what the snippet prints is what it returned
