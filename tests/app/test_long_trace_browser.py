"""A 4,096-token generation through the browser with a random-init model and a byte-level BPE
tokenizer trained here: the heatmap streams as edits and ends equal to the full render, decided
segments fold to one line, the chart stays within its point budget. Saves screenshots of the long
trace, expanded and collapsed, to test-artifacts/."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from test_browser import ARTIFACTS, CHROMIUM, chromium, generate_with  # noqa: E402

from e3rl_core.models import byte_level_bpe  # noqa: E402

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)),
                                reason=f"no Chromium at {CHROMIUM}: ./run setup installs it with apt-get")

CORPUS = ["Let me think step by step. 12 + 7 = 19, so the answer is 19.\n\n",
          "First, compute the sum. Then check it: café, naïve, 東京, résumé.\n\n"] * 50


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    """A random-init Qwen3-shaped model saved with a byte-level BPE tokenizer (512 tokens) and no
    end-of-sequence token, so the rollout runs to its token budget."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fast = byte_level_bpe(CORPUS, 512, ["<pad>"], pad_token="<pad>")
    config = AutoConfig.for_model("qwen3", vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=8192, initializer_range=0.02, eos_token_id=None, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("models") / "bpe-qwen3"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_a_4096_token_trace_streams_and_folds(app_url, bpe_model):
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as b:
        page = generate_with(b, app_url, str(bpe_model), "Let me think step by step.\n\n",
                             {"#e3rl-max-new-tokens": "4096", "#e3rl-segment-tokens": "256", "#e3rl-group-size": "1"},
                             height=1600)
        page.wait_for_selector("#e3rl-heatmap .e3rl-tok", timeout=120_000)
        # while it streams, the heatmap grows by edits (the page's own count rises)
        first = page.locator("#e3rl-heatmap .e3rl-tok").count()
        page.wait_for_function(f"document.querySelectorAll('#e3rl-heatmap .e3rl-tok').length > {first + 50}",
                               timeout=120_000)
        page.wait_for_selector("#e3rl-summary :text('finished:')", timeout=600_000)
        summary = page.inner_text("#e3rl-summary")
        assert int(re.search(r"kept (\d+)", summary).group(1)) == 4096  # erased tokens come on top
        assert page.locator("#e3rl-heatmap .e3rl-seg").count() >= 8  # segments of at most 256 tokens
        page.locator("#e3rl-heatmap").screenshot(path=str(ARTIFACTS / "app-long-trace.png"))
        page.locator("#e3rl-collapse input").check()
        page.wait_for_function("document.querySelector('#e3rl-heatmap').classList.contains('e3rl-collapse')")
        heights = page.evaluate("() => [...document.querySelectorAll('#e3rl-heatmap .e3rl-seg.e3rl-decided')]"
                                ".map(e => e.getBoundingClientRect().height)")
        assert len(heights) >= 7 and max(heights) < 40  # each decided segment is one line
        page.locator("#e3rl-heatmap").screenshot(path=str(ARTIFACTS / "app-long-trace-collapsed.png"))
        # the chart's per-token series stay within the point budget (4,096 tokens -> at most 2,000)
        points = page.evaluate("() => { const g = document.querySelector('#e3rl-chart .js-plotly-plot');"
                               " return g.data.filter(t => t.xaxis === 'x2').map(t => t.x.length); }")
        assert points and max(points) <= 2000
